"""Generation through the front door for a query model with a diffusers decoder, and denoising
timesteps in activation stores: run_with_cache / capture_dataset / the CLI with mode="generate" on
tiny-diffusion-query (latents = denoise's with the same seed, rows tagged by step / timestep / branch,
latents in the shard files, not the JSON), a flow model's timesteps in a store, and stores written
before the timestep column existed still read and resume."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.cli import main
from uniprobe.hooks.diffusion import denoise
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.layout import ROLE_ID
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store import format as store_format

pytest.importorskip("diffusers")

PROMPTS = [[1, 5, 9, 12], [1, 7, 3, 12], [1, 7, 3], [1, 4, 4, 2, 6]]
POINTS = ["connector.out", "decoder.blocks.1", "decoder.out"]
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 2.0, "seed": 7}


@pytest.fixture(scope="module")
def loaded():
    import uniprobe as up

    return up.load_model("tiny-diffusion-query")


def _examples(n=4):
    return [{"input_ids": ids, "labels": {"k": i % 2}} for i, ids in enumerate(PROMPTS[:n])]


def _direct(loaded, examples, steps=3, guidance_scale=2.0, seed=7):
    """The plain reference: the model's forward, then denoise on its connector output."""
    model = loaded.model
    inputs = loaded.adapter.prepare(model, examples, mode="generation")
    with torch.no_grad():
        cond = loaded.adapter.run(model, inputs)[1]
        return denoise(
            model.decoder, model.scheduler, cond, model.latent_shape, steps=steps,
            guidance_scale=guidance_scale, seed=seed, **model.decoder_kwargs,
        )  # fmt: skip


def test_generate_equals_denoise_and_tags_rows(loaded):
    examples = _examples(2)
    latents, cap = loaded.run_with_cache(examples, POINTS, mode="generate", generate_kwargs=SETTINGS)
    assert latents.shape == (2, *loaded.model.latent_shape)
    torch.testing.assert_close(latents, _direct(loaded, examples), rtol=0, atol=0)
    schedule = [float(t) for t in loaded.model.scheduler.timesteps]
    assert cap.timesteps == dict(enumerate(schedule)) and len(schedule) == 3
    out = cap.rows("decoder.out")  # [cond; uncond] per step: rows (example, branch) per step
    assert out.step.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert out.branch.tolist() == [0, 0, 1, 1] * 3 and out.example.tolist() == [0, 1, 0, 1] * 3
    assert out.timestep.tolist() == [t for t in schedule for _ in range(4)]
    blocks = cap.rows("decoder.blocks.1", step=1, branch="uncond")
    assert len(blocks) == 2 * 16 and bool((blocks.role == ROLE_ID["image_gen"]).all())
    assert bool((blocks.timestep == schedule[1]).all())
    conn = cap.rows("connector.out")  # the backbone's one pass: no denoising timestep
    assert conn.step.tolist() == [0] * 8 and bool(torch.isnan(conn.timestep).all())
    # another seed, another sample; defaults (4 steps, no guidance) run too
    other, _ = loaded.run_with_cache(examples, "decoder.out", mode="generate", generate_kwargs={"seed": 8})
    torch.testing.assert_close(other, _direct(loaded, examples, steps=4, guidance_scale=1.0, seed=8))
    assert not torch.equal(other, _direct(loaded, examples, steps=4, guidance_scale=1.0, seed=7))


def test_unknown_generate_setting_names_the_accepted_ones(loaded):
    with pytest.raises(ValueError, match=r"takes no 'steps'.*num_inference_steps, guidance_scale, seed"):
        loaded.run_with_cache(_examples(1), "decoder.out", mode="generate", generate_kwargs={"steps": 2})


def test_capture_dataset_stores_timesteps_and_latents(loaded, tmp_path):
    examples = _examples()
    store = capture_dataset(
        loaded.model, examples, POINTS, tmp_path / "s", adapter=loaded.adapter, mode="generate",
        batch_size=2, shard_size=2, generate_kwargs=SETTINGS, progress=False,
    )  # fmt: skip
    schedule = [float(t) for t in loaded.model.scheduler.timesteps]
    assert store.timesteps("decoder.blocks.1") == store.timesteps("decoder.out") == dict(enumerate(schedule))
    assert store.timesteps("connector.out") == {}
    # rows round-trip: the same values and tags as a capture of each batch
    for start in (0, 2):
        _, cap = loaded.run_with_cache(
            examples[start : start + 2], POINTS, mode="generate", generate_kwargs=SETTINGS
        )
        for p in POINTS:
            want = cap.rows(p)
            got = store.rows(p).select(store.rows(p).example // 2 == start // 2)
            torch.testing.assert_close(got.values, want.values)
            torch.testing.assert_close(got.timestep, want.timestep, equal_nan=True)
            assert got.step.tolist() == want.step.tolist() and got.branch.tolist() == want.branch.tolist()
    # filters by timestep: the same rows as by step
    for step, t in enumerate(schedule):
        by_t, by_step = store.rows("decoder.blocks.1", timestep=t), store.rows("decoder.blocks.1", step=step)
        torch.testing.assert_close(by_t.values, by_step.values)
        m = store.matrix("decoder.blocks.1", timestep=t, reduce="mean")
        torch.testing.assert_close(
            m.values, store.matrix("decoder.blocks.1", step=step, reduce="mean").values
        )
    assert len(store.rows("decoder.out", timestep=[schedule[0], schedule[2]])) == 2 * 4 * 2
    with pytest.raises(ValueError, match=r"timestep 12345.*timesteps per step here"):
        store.matrix("decoder.out", timestep=12345)
    # the latents: in the shard files, equal to denoise's per batch, never in the JSON
    latents = store.generated()
    assert latents.shape == (4, *loaded.model.latent_shape)
    for start in (0, 2):
        torch.testing.assert_close(latents[start : start + 2], _direct(loaded, examples[start : start + 2]))
    torch.testing.assert_close(store.subset([1, 3]).generated(), latents[[1, 3]])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert all(ex["meta"] == {} for ex in manifest["examples"])
    assert [r["generated"] for r in manifest["shards"]] == [[4, 8, 8]] * 2
    assert manifest["identity"]["generate_kwargs"] == SETTINGS
    assert "generated latents per example: [4, 8, 8]" in store.summary()
    ActivationStore.open(tmp_path / "s", verify="full")  # sha256 and tensors checked


def test_resume_and_no_latents(loaded, tmp_path):
    kw = dict(adapter=loaded.adapter, mode="generate", batch_size=2, shard_size=2, progress=False)
    full = capture_dataset(
        loaded.model, _examples(), "decoder.out", tmp_path / "a", generate_kwargs=SETTINGS, **kw
    )
    # an interrupted capture (the first shard only) resumes to the same store
    capture_dataset(loaded.model, _examples(), "decoder.out", tmp_path / "b", generate_kwargs=SETTINGS, **kw)
    (tmp_path / "b" / "shard-00001.safetensors").unlink()
    with pytest.warns(UserWarning, match="rewritten"):
        resumed = capture_dataset(
            loaded.model,
            _examples(),
            "decoder.out",
            tmp_path / "b",
            generate_kwargs=SETTINGS,
            resume=True,
            **kw,
        )
    torch.testing.assert_close(resumed.generated(), full.generated())
    assert resumed.timesteps("decoder.out") == full.timesteps("decoder.out")
    # other generation settings are another capture: refused
    with pytest.raises(ValueError, match="generate_kwargs"):
        capture_dataset(
            loaded.model, _examples(), "decoder.out", tmp_path / "b", resume=True,
            generate_kwargs={**SETTINGS, "seed": 1}, **kw,
        )  # fmt: skip
    bare = capture_dataset(
        loaded.model,
        _examples(2),
        "decoder.out",
        tmp_path / "c",
        generate_kwargs=SETTINGS,
        save_latents=False,
        **kw,
    )
    assert len(bare.rows("decoder.out")) == 2 * 2 * 3
    with pytest.raises(ValueError, match="no generated latents.*save_latents=False"):
        bare.generated()
    with pytest.raises(ValueError, match="plain JSON settings.*model.scheduler"):
        capture_dataset(
            loaded.model,
            _examples(2),
            "decoder.out",
            tmp_path / "e",
            generate_kwargs={"scheduler": object()},
            **kw,
        )
    with pytest.raises(ValueError, match="apply to mode='generate'"):
        capture_dataset(loaded.model, _examples(2), "queries", tmp_path / "d", generate_kwargs={"seed": 1})


def test_stores_without_the_timestep_column_still_read_and_resume(loaded, tmp_path, monkeypatch):
    """A store written before timesteps were kept (shards without ``P/timestep``) reads as NaN."""
    kw = dict(adapter=loaded.adapter, batch_size=2, shard_size=2, progress=False)
    with monkeypatch.context() as m:
        m.setattr(store_format, "FLOAT_COLUMNS", ())  # write as the toolkit did before the column
        capture_dataset(loaded.model, _examples(), ["blocks.1.resid_post", "queries"], tmp_path / "old", **kw)
    (tmp_path / "old" / "shard-00001.safetensors").unlink()  # then interrupted
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old" / "shard-00000.safetensors"), framework="pt") as f:
        assert not any(k.endswith("/timestep") for k in f.keys())
    with pytest.warns(UserWarning, match="rewritten"):
        store = capture_dataset(
            loaded.model, _examples(), ["blocks.1.resid_post", "queries"], tmp_path / "old", resume=True, **kw
        )
    store = ActivationStore.open(tmp_path / "old", verify="full")
    rows = store.rows("queries")
    assert len(rows) == 4 * loaded.model.n_queries and bool(torch.isnan(rows.timestep).all())
    assert store.timesteps("queries") == {} and len(store.rows("queries", timestep=0.0)) == 0
    assert store.matrix("blocks.1.resid_post").values.shape == (4, 32)
    with pytest.raises(ValueError, match="no generated latents"):
        store.generated()


def test_flow_timesteps_reach_the_store(tmp_path):
    """The MoT sandbox's flow passes (CallLog.note_timestep) are stored with their timesteps too."""
    from uniprobe.experiments.sandbox import build_model

    torch.manual_seed(0)
    backbone = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }  # fmt: skip
    model = build_model("mot", backbone=backbone).eval()
    model.cfg_text_scale, model.n_steps = 3.0, 4
    examples = [{"prompt": "draw 2 red apple"}, {"prompt": "draw 4 green star"}]
    store = capture_dataset(
        model, examples, "blocks.1.resid_post", tmp_path / "mot", roles=["image_gen"], mode="generate",
        progress=False,
    )  # fmt: skip
    assert [round(t, 6) for t in store.timesteps("blocks.1.resid_post").values()] == [1.0, 0.75, 0.5, 0.25]
    r = store.rows("blocks.1.resid_post", timestep=0.5)
    assert (
        set(r.step.tolist()) == {2} and set(r.branch.tolist()) == {0, 1} and len(r) == 2 * 2 * model.n_cells
    )
    assert all(len(ex["meta"]["generated"]) == model.n_cells for ex in store.examples)  # tiles: tokens, JSON


def test_cli_capture_generate(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in PROMPTS[:2]))
    out = tmp_path / "s"
    args = ["capture", "--model", "tiny-diffusion-query", "--prompts", str(prompts), "--out", str(out)]
    gen = ["--points", "decoder.out", "--mode", "generate", "--num-inference-steps", "2", "--seed", "3"]
    assert main(args + gen) == 0
    assert "generated latents per example: [4, 8, 8]" in capsys.readouterr().out
    store = ActivationStore.open(out)
    assert store.generated().shape == (2, 4, 8, 8) and len(store.timesteps("decoder.out")) == 2
    assert store.identity["generate_kwargs"] == {"num_inference_steps": 2, "seed": 3}
    assert main([*args, "--overwrite", "--seed", "3"]) == 2
    assert "--seed set how images are generated: add --mode generate" in capsys.readouterr().err
    assert main([*args, "--overwrite", *gen, "--no-latents"]) == 0
    with pytest.raises(ValueError, match="no generated latents"):
        ActivationStore.open(out).generated()
    llama = ["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--out", str(tmp_path / "l")]
    assert main([*llama, "--mode", "generate"]) == 2
    assert "has no image generation" in capsys.readouterr().err
    assert issubclass(UsageError, ValueError)


def test_a_flow_models_three_branches_round_trip(tmp_path):
    """BAGEL's passes cond / uncond_text / uncond_image (branches 0, 1, 2) store and read by name."""
    from uniprobe.hooks.rows import Rows

    n = 6
    zeros = torch.zeros(n, dtype=torch.long)
    rows = Rows(
        values=torch.arange(n * 2, dtype=torch.float32).view(n, 2), example=zeros, pos=torch.arange(n) % 2,
        role=torch.full((n,), ROLE_ID["image_gen"]), step=zeros, branch=torch.arange(n) // 2,
        timestep=torch.full((n,), 0.75),
    )  # fmt: skip
    store = ActivationStore.create(tmp_path / "s", model={"m": 1}, points=["blocks.0.resid_post"])
    store.write_shard(0, {"blocks.0.resid_post": rows}, [{"id": "a", "layout": [ROLE_ID["image_gen"]] * 2}])
    store.finalize()
    store = ActivationStore.open(tmp_path / "s", verify="full")
    for name, b in (("cond", 0), ("uncond_text", 1), ("uncond_image", 2)):
        got = store.rows("blocks.0.resid_post", branch=name)
        torch.testing.assert_close(got.values, rows.values[rows.branch == b])
    assert store.timesteps("blocks.0.resid_post") == {0: 0.75}
    with pytest.raises(ValueError, match="unknown branch 'text'; branches are cond, uncond, uncond_text"):
        store.rows("blocks.0.resid_post", branch="text")
