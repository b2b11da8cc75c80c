"""Attention knockout: the batched sweep equals one plain forward per configuration with an explicit mask."""

from __future__ import annotations

import pytest
import torch
from test_attention_hooks import eager_copy
from uniprobe.experiments.sandbox import load_sandbox
from uniprobe.experiments.sandbox.checkpoint import SHIPPED
from uniprobe.experiments.tasks import Suite
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.attention.knockout import Knockout, knockout_grid, knockout_reference, knockout_sweep
from uniprobe.probes.patching.metrics import KLToClean, LogitDiff, second_output
from uniprobe.probes.patching.results import PatchResult

ROLES = ["text"] * 3 + ["cot"] * 2 + ["image_gen"] * 3
GROUPS = {"question": ["text"], "cot": ["cot"], "bos": [0], "drawn": ["image_gen"]}


def tiny_inputs(name: str, pad: bool = False):
    model, _ = build_tiny(name, layers=3)
    adapter = adapter_for(model)
    ids = torch.randint(5, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = [r.tolist() for r in ids]
    inputs = adapter.prepare(model, [{"input_ids": r} for r in rows])
    roles = [list(ROLES) for _ in rows]
    if pad:  # left padding: the adapter's own mask, the layout says pad
        inputs.kwargs["attention_mask"][0, :2] = 0
        roles[0][:2] = ["pad", "pad"]
    if name == "tiny-query":  # the queries follow the prompt
        roles = [r + ["query"] * (inputs.layout.length - len(r)) for r in roles]
    inputs.layout = TokenLayout.from_names(roles, "image_gen")
    return model, adapter, inputs


def check_sweep(model, adapter, inputs, kos, grid, metric, **kw) -> PatchResult:
    res = knockout_sweep(model, inputs, (kos, grid) if grid is not None else kos, metric, **kw)
    ref = knockout_reference(model, inputs, kos, metric)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ref, torch.full_like(ref, res.clean))  # the knockouts do something
    return res


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-emu3", "tiny-chameleon", "tiny-janus"])
def test_sweep_equals_reference(name: str, pad: bool) -> None:
    model, adapter, inputs = tiny_inputs(name, pad)
    kos, grid = knockout_grid(model, GROUPS, query=["image_gen"])
    res = check_sweep(model, adapter, inputs, kos, grid, LogitDiff(5, 6))
    assert res.as_grid(False).shape == (1, 3, 4) and res.grid.columns == list(GROUPS)
    if not pad and name in ("tiny-llama", "tiny-qwen2"):  # plain causal LMs: blocks and positions reused
        assert res.info["strategy"] == "resume" and res.info["suffix"]
    every = Knockout((0, 1, 2), query_roles=["image_gen"], key_roles=["text", "cot", "image_gen"])
    union = knockout_reference(model, inputs, [every], LogitDiff(5, 6))
    assert res.corrupted == pytest.approx(float(union[0]), abs=1e-5)  # every group at every layer


def test_eager_and_sdpa_agree_and_heads_window_chunks() -> None:
    model, adapter, inputs = tiny_inputs("tiny-llama")
    kos, grid = knockout_grid(model, GROUPS, query=[5, 6, -1], window=2, heads=[1, 3])  # -1: the last
    assert kos[0].layers == (0, 1) and kos[-1].layers == (2,)
    metric = LogitDiff(7, 8)
    sdpa = check_sweep(
        model, adapter, inputs, kos, grid, metric, budget_bytes=1
    )  # one configuration per chunk
    assert sdpa.info["chunks"] >= len(kos)
    eager = check_sweep(eager_copy(model), adapter, inputs, kos, grid, metric)
    torch.testing.assert_close(eager.values, sdpa.values, atol=1e-5, rtol=1e-4)


def test_query_model_and_any_metric() -> None:
    model, adapter, inputs = tiny_inputs("tiny-query")
    kos, grid = knockout_grid(model, {"question": ["text"], "cot": ["cot"]}, query=["query"])
    check_sweep(model, adapter, inputs, kos, grid, KLToClean(logits_fn=second_output, position=None))
    check_sweep(model, adapter, inputs, kos, grid, LogitDiff(3, 4, logits_fn=second_output))


@pytest.mark.parametrize("name", list(SHIPPED))
def test_sandbox_models(name: str) -> None:
    model = load_sandbox(name)
    adapter = adapter_for(model)
    items = [it for it in Suite(0).items if it.category == "arithmetic"][:3]
    inputs = adapter.prepare(model, [{"prompt": it.draw_prompt} for it in items], "generation")
    last = inputs.layout.length - 1
    query = ["query"] if name == "sandbox-query" else [last]
    kos, grid = knockout_grid(model, {"prompt": ["text"], "bos": [0]}, query=query)
    logits = second_output if name == "sandbox-query" else None
    metric = KLToClean(logits_fn=logits, position=None) if logits else KLToClean()
    check_sweep(model, adapter, inputs, kos, grid, metric)


def test_save_load_pandas_heatmap(tmp_path) -> None:
    from uniprobe.probes.patching.plots import heatmap

    model, adapter, inputs = tiny_inputs("tiny-llama")
    res = knockout_sweep(model, inputs, knockout_grid(model, GROUPS), LogitDiff(5, 6))
    res.save(tmp_path)
    back = PatchResult.load(tmp_path)
    assert torch.equal(back.values, res.values) and back.method == "knockout"
    assert back.grid.meta["knockouts"][0]["key_roles"] == ["text"]
    frame = res.to_pandas()
    assert list(frame["column"][:4]) == list(GROUPS) and list(frame["layer"][::4]) == [0, 1, 2]
    assert heatmap(res, tmp_path / "ko.png", normalised=False).stat().st_size > 0


def test_bad_knockouts_are_named() -> None:
    model, adapter, inputs = tiny_inputs("tiny-llama")
    with pytest.raises(UsageError, match="choose the keys by key_roles or by key_positions"):
        Knockout((0,), query_roles=["image_gen"])
    with pytest.raises(ValueError, match="unknown role 'images'"):
        Knockout((0,), query_roles=["images"], key_roles=["text"])
    with pytest.raises(UsageError, match="remove no edge"):  # text queries never see later image keys
        knockout_sweep(
            model, inputs, [Knockout((0,), query_roles=["text"], key_roles=["image_gen"])], LogitDiff(5, 6)
        )
    with pytest.raises(UsageError, match=r"layers \[7\] are outside the model \(0..2\)"):
        knockout_grid(model, GROUPS, layers=[7])
