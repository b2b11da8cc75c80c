"""Large models: loading a folder through transformers' ``device_map`` (``uniprobe.experiments.models``).

No GPU here, so the placements tested are the ones a CPU can hold: ``"cpu"``, ``"auto"`` (all on
CPU) and a map that offloads one block to disk, which makes transformers dispatch the model with
accelerate's device hooks, as on several GPUs. Capture (torch and nnsight) and patching must read
the same numbers as the model loaded without a map.
"""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments import models
from uniprobe.experiments.cli import main
from uniprobe.experiments.models import has_accelerate, load_model
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.backends import run_capture
from uniprobe.probes.patching import LogitDiff, grid_sites, patch_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = "embed,blocks.*.resid_post,final_norm,lm_head.in"
EXAMPLES = [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 9, 10]}]
OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "llama"
    model, _ = build_tiny("tiny-llama")
    model.save_pretrained(path)
    return path


def _capture(loaded, backend="torch"):
    inputs = loaded.adapter.prepare(loaded.model, EXAMPLES)
    cap = run_capture(loaded.model, inputs, POINTS, adapter=loaded.adapter, backend=backend)
    return {p: cap.rows(p).values for p in cap.points}


@pytest.fixture(scope="module")
def reference(folder):
    return _capture(load_model(str(folder)))


def test_without_device_map_nothing_changes(folder, reference):
    loaded = load_model(str(folder))
    assert loaded.info == {}
    assert not hasattr(loaded.model, "hf_device_map") or loaded.model.hf_device_map is None
    assert getattr(loaded.model, "_hf_hook", None) is None
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    tiny, _ = build_tiny("tiny-llama")  # the weights saved to the folder
    inputs = loaded.adapter.prepare(tiny, EXAMPLES)
    direct = run_capture(tiny, inputs, POINTS)
    for p, values in reference.items():
        assert torch.equal(values, direct.rows(p).values), p


@pytest.mark.skipif(not has_accelerate(), reason="device_map needs accelerate")
@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_on_cpu_captures_the_same(folder, reference, device_map):
    loaded = load_model(str(folder), device_map=device_map)
    assert loaded.info["device_map"] == device_map
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    for backend in ("torch", "nnsight"):
        got = _capture(loaded, backend)
        assert got.keys() == reference.keys()
        for p, values in reference.items():
            torch.testing.assert_close(got[p], values, atol=1e-6, rtol=0, msg=f"{backend} {p}")


@pytest.mark.skipif(not has_accelerate(), reason="device_map needs accelerate")
def test_dispatched_model_with_disk_offload_captures_and_patches_the_same(folder, reference, tmp_path):
    """A map over several places: transformers dispatches with accelerate hooks (weights of block 1
    on disk, loaded at its forward); capture and patching go through those hooks unchanged."""
    loaded = load_model(str(folder), device_map=OFFLOAD_MAP, offload_folder=str(tmp_path / "offload"))
    assert loaded.info["hf_device_map"]["model.layers.1"] == "disk"
    assert getattr(loaded.model, "_hf_hook", None) is not None  # accelerate's dispatch
    for backend in ("torch", "nnsight"):
        got = _capture(loaded, backend)
        for p, values in reference.items():
            torch.testing.assert_close(got[p], values, atol=1e-6, rtol=0, msg=f"{backend} {p}")

    plain = load_model(str(folder))
    results = []
    for lm in (plain, loaded):
        clean = lm.adapter.prepare(lm.model, [{"input_ids": [1, 5, 6, 7]}])
        corrupted = lm.adapter.prepare(lm.model, [{"input_ids": [1, 9, 6, 7]}])
        sites = grid_sites(lm.adapter.n_layers(lm.model), 4, kinds=("resid_pre",))
        results.append(patch_sweep(lm.model, clean, corrupted, sites, LogitDiff(3, 4)))
    torch.testing.assert_close(results[1].values, results[0].values, atol=1e-5, rtol=0)


@pytest.mark.skipif(not has_accelerate(), reason="device_map needs accelerate")
def test_dtype_passes_through(folder):
    loaded = load_model(str(folder), device_map="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.info["dtype"] == "bfloat16"
    older = load_model(str(folder), torch_dtype=torch.float16)  # transformers' older name
    assert {p.dtype for p in older.model.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="not both"):
        load_model(str(folder), dtype="bfloat16", torch_dtype="float16")


def test_missing_accelerate_is_a_clear_error(folder, monkeypatch):
    monkeypatch.setattr(models, "has_accelerate", lambda: False)
    for device_map in ("auto", "cpu", {"": "cpu"}):
        with pytest.raises(ImportError, match="pip install accelerate"):
            load_model(str(folder), device_map=device_map)
    # without a device_map, accelerate is not needed
    assert load_model(str(folder)).model.training is False


def test_builtins_refuse_loading_options():
    for spec in ("tiny-llama", "sandbox-ar"):
        with pytest.raises(ValueError, match="device_map apply to transformers model folders"):
            load_model(spec, device_map="auto")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-janus", dtype="bfloat16")


@pytest.mark.skipif(not has_accelerate(), reason="device_map needs accelerate")
def test_cli_capture_device_map(folder, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_ids": [1, 5, 6, 7]}\n{"input_ids": [1, 9, 10]}\n')
    args = ["capture", "--model", str(folder), "--prompts", str(prompts), "--points", "blocks.*.resid_post"]
    assert main([*args, "--device-map", "cpu", "--out", str(tmp_path / "store")]) == 0
    monkeypatch.setattr(models, "has_accelerate", lambda: False)
    assert main([*args, "--device-map", "auto", "--out", str(tmp_path / "store2")]) == 2
    assert "pip install accelerate" in capsys.readouterr().err
