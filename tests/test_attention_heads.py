"""Head-level patching: sites over layer × head (× position or role) at blocks.{l}.attn.z through the batched
engine equal TransformerLens's get_act_patch_attn_head_out_all_pos / _by_pos on the same weights (tiny Llama),
and the engine's one-forward-per-site reference on Qwen2 (GQA), Emu3, Chameleon, Janus, query and the shipped
sandbox models; attribution over heads uses the per-head kernel and adds up to the whole-z estimate."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.sandbox import load_sandbox
from uniprobe.experiments.tiny import build_tiny, tiny_llama
from uniprobe.hooks.adapters import adapter_for
from uniprobe.probes.attention import head_grid, head_sites
from uniprobe.probes.patching import (
    GridLogProb,
    LogitDiff,
    PatchResult,
    PatchSite,
    attribution_patch,
    collect_states,
    logits_of,
    patch_sweep,
    run_sites_reference,
)
from uniprobe.probes.patching.metrics import second_output

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5


def _pair(name: str, info: dict) -> tuple[list[dict], list[dict]]:
    if name == "tiny-janus":
        img = [info["image_token_id"]] * info["num_image_tokens"]
        pix = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
        return (
            [{"input_ids": [1, 5, *img, 6, 7, 8], "pixel_values": pix}],
            [{"input_ids": [1, 5, *img, 9, 7, 8], "pixel_values": pix * 0.5}],
        )
    return [{"input_ids": [1, 5, 6, 7, 8, 9]}], [{"input_ids": [1, 5, 10, 7, 8, 9]}]


def _check_against_reference(model, adapter, clean, corrupted, metric, roles=None):
    grids = [head_sites(model, clean), head_sites(model, clean, by_position=True)]
    if roles:
        grids.append(head_sites(model, clean, roles=roles))
    for grid in grids:
        for direction in ("denoise", "noise"):
            res = patch_sweep(model, clean, corrupted, grid, metric, direction=direction, budget_bytes=20_000)
            src, tgt = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
            _, states = collect_states(model, adapter, src, [s.point for s in grid.sites])
            ref = run_sites_reference(model, adapter, tgt, grid.sites, states, metric)
            assert res.info["strategy"] == "resume" and res.info["chunks"] > 1
            assert float((res.values - ref).abs().max()) <= ATOL, (grid.columns[:3], direction)
    return res


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-emu3", "tiny-chameleon", "tiny-janus", "tiny-query"])
def test_head_sites_equal_one_forward_per_site(name: str) -> None:
    model, info = build_tiny(name, layers=2)
    adapter = adapter_for(model)
    c, r = _pair(name, info)
    clean, corrupted = adapter.prepare(model, c), adapter.prepare(model, r)
    if name == "tiny-query":
        with torch.no_grad():
            metric = GridLogProb(second_output(adapter.run(model, clean)).argmax(-1)[0])
        _check_against_reference(model, adapter, clean, corrupted, metric, roles=["text", "query"])
    else:
        _check_against_reference(model, adapter, clean, corrupted, LogitDiff(11, 12))


@pytest.mark.parametrize("name", ["sandbox-ar", "sandbox-query"])
def test_head_sites_on_the_shipped_sandbox_models(name: str) -> None:
    model = load_sandbox(name)
    adapter = adapter_for(model)
    clean, corrupted = (
        adapter.prepare(model, [{"prompt": p}], "generation") for p in ("what is 2 + 1 ?", "what is 3 + 1 ?")
    )
    with torch.no_grad():
        top = adapter.run(model, clean)
    if name == "sandbox-query":
        metric = GridLogProb(second_output(top).argmax(-1)[0])
    else:
        target, foil = (int(i) for i in logits_of(top)[0, -1].topk(2).indices)
        metric = LogitDiff(target, foil)
    res = _check_against_reference(model, adapter, clean, corrupted, metric)
    assert torch.isfinite(res.values).all()


def test_head_sites_equal_transformer_lens_on_the_same_weights() -> None:
    from transformer_lens import patching
    from uniprobe.hooks.backends.tl_backend import bridge_for

    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7, 8]}])
    metric = LogitDiff(11, 12)
    all_pos, by_pos = head_sites(model, clean), head_sites(model, clean, by_position=True)
    ours_all = head_grid(patch_sweep(model, clean, corrupted, all_pos, metric).values, all_pos)[..., 0]
    ours_pos = head_grid(patch_sweep(model, clean, corrupted, by_pos, metric).values, by_pos)  # [l, h, pos]
    bridge = bridge_for(model, adapter).eval()  # booting wraps the model's modules: after our runs

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, 11] - logits[0, -1, 12]

    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean.kwargs["input_ids"])
        tl_all = patching.get_act_patch_attn_head_out_all_pos(
            bridge, corrupted.kwargs["input_ids"], cache, tl_metric
        )
        tl_pos = patching.get_act_patch_attn_head_out_by_pos(
            bridge, corrupted.kwargs["input_ids"], cache, tl_metric
        )
    assert tl_all.shape == (2, 4) and tl_pos.shape == (2, 5, 4)  # [layer, head], [layer, pos, head]
    assert float((ours_all - tl_all).abs().max()) <= 1e-4
    assert float((ours_pos - tl_pos.permute(0, 2, 1)).abs().max()) <= 1e-4
    assert float(tl_all.abs().max()) > 1e-3  # the heads do matter here: the comparison is not of zeros


def test_head_attribution_adds_up_and_tracks_exact() -> None:
    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 5, 9, 7, 8]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7, 8]}, {"input_ids": [1, 5, 10, 7, 8]}])
    metric = LogitDiff(11, 12)
    grid = head_sites(model, clean, by_position=True)
    approx = attribution_patch(model, clean, corrupted, grid, metric)
    exact = patch_sweep(model, clean, corrupted, grid, metric)
    assert approx.info["kernel"] == "torch"
    whole = [PatchSite(f"blocks.{layer}.attn.z", (p,)) for layer in range(2) for p in range(5)]
    z = attribution_patch(model, clean, corrupted, whole, metric).values - approx.corrupted
    per_head = head_grid(approx.values - approx.corrupted, grid)  # [layer, head, pos]
    torch.testing.assert_close(per_head.sum(1).flatten(), z, atol=1e-5, rtol=1e-4)
    a, e = approx.values - approx.corrupted, exact.values - exact.corrupted
    assert torch.corrcoef(torch.stack([a, e]))[0, 1] > 0.9


def test_head_results_round_trip_and_bad_heads_are_named(tmp_path) -> None:
    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7, 8]}])
    grid = head_sites(model, clean, heads=[1, 3], positions=[1, 4], by_position=True)
    assert grid.columns == ["h1:1", "h1:4", "h3:1", "h3:4"] and grid.sites[0].head == 1
    res = patch_sweep(model, clean, corrupted, grid, LogitDiff(11, 12))
    res.save(tmp_path / "r")
    back = PatchResult.load(tmp_path / "r")
    assert [s.head for s in back.sites] == [s.head for s in res.sites] and torch.equal(
        back.values, res.values
    )
    with pytest.raises(ValueError, match=r"heads \[4\] are outside the attention \(0..3\)"):
        head_sites(model, clean, heads=[4])
    with pytest.raises(ValueError, match="a head site patches one head"):
        PatchSite("blocks.0.resid_pre", (1,), head=0)
    with pytest.raises(IndexError, match="the attention has 4 heads"):
        patch_sweep(model, clean, corrupted, [PatchSite("blocks.0.attn.z", (1,), head=7)], LogitDiff(11, 12))


def test_unchanged_positions_of_a_head_site_are_not_recomputed() -> None:
    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8, 9]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 6, 10, 8, 9]}])  # differs at position 3
    grid, metric = head_sites(model, clean), LogitDiff(11, 12)
    trimmed = patch_sweep(model, clean, corrupted, grid, metric)
    whole = patch_sweep(model, clean, corrupted, grid, metric, skip_noops=False)
    assert trimmed.info["work_fraction"] < whole.info["work_fraction"]  # positions 0..2 reused
    assert float((trimmed.values - whole.values).abs().max()) <= ATOL
    assert [s.positions for s in trimmed.sites] == [tuple(range(6))] * len(grid)  # reported as given


def test_head_sites_on_a_teacher_forced_janus_image_pass() -> None:
    from uniprobe.probes.patching import SequenceLogProb

    model, info = build_tiny("tiny-janus", layers=2)
    adapter = adapter_for(model)
    boi, image = info["boi_token_id"], torch.tensor([3, 1, 4, 1])
    clean, corrupted = (
        adapter.teacher_forced(adapter.prepare(model, [{"input_ids": ids}], mode="generation"), image)
        for ids in ([1, 5, 6, 7, boi], [1, 9, 6, 7, boi])
    )
    metric = SequenceLogProb(image, logits_fn=lambda out: out)

    def forward(m, x):
        return adapter.image_forward(m, x)

    grid = head_sites(model, clean, roles=["text", "image_gen"])  # each head at the prompt / the drawing
    res = patch_sweep(model, clean, corrupted, grid, metric, forward=forward)
    _, states = collect_states(model, adapter, clean, [s.point for s in grid.sites], forward)
    ref = run_sites_reference(model, adapter, corrupted, grid.sites, states, metric, forward=forward)
    assert float((res.values - ref).abs().max()) <= ATOL and res.clean != res.corrupted
