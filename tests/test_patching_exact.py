"""Exact batched patching equals one plain forward per site (max abs diff ≤ 1e-5, float32) on tiny
Llama, Qwen2, query and Janus models — with every reuse on, and with each one turned off —
in both directions, for batches of prompt pairs, and under a memory budget that forces chunks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import ModelInputs, adapter_for
from uniprobe.hooks.adapters.base import get_module
from uniprobe.probes.patching import (
    KINDS,
    GridLogProb,
    LogitDiff,
    PatchSite,
    collect_states,
    grid_sites,
    patch_sweep,
    point_sites,
    role_sites,
    run_sites_reference,
)
from uniprobe.probes.patching.metrics import second_output

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(name: str, info: dict) -> tuple[list[dict], list[dict]]:
    """Clean and corrupted examples of one length, differing in the middle."""
    if name == "tiny-janus":
        img = [info["image_token_id"]] * info["num_image_tokens"]
        g = torch.Generator().manual_seed(0)
        pix = torch.randn(3, 32, 32, generator=g)
        return (
            [{"input_ids": [1, 5, *img, 6, 7, 8], "pixel_values": pix}],
            [{"input_ids": [1, 5, *img, 9, 7, 8], "pixel_values": pix * 0.5}],
        )
    return [{"input_ids": [1, 5, 6, 7, 8, 9]}], [{"input_ids": [1, 5, 10, 7, 8, 9]}]


class Case:
    """A tiny model, clean/corrupted inputs, a metric and a site list covering every kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model, self.info = build_tiny(name, layers=2)
        self.adapter = adapter_for(self.model)
        c, r = _pair(name, self.info)
        self.clean: ModelInputs = self.adapter.prepare(self.model, c)
        self.corrupted: ModelInputs = self.adapter.prepare(self.model, r)
        n_layers = self.adapter.n_layers(self.model)
        if name == "tiny-query":
            grid = role_sites(n_layers, self.clean.layout, ["text", "query"], KINDS)
            self.sites = grid.sites + grid_sites(n_layers, 10, KINDS, positions=[2, 5, 9]).sites
            self.sites += point_sites("connector.out", [0, 3]) + point_sites("connector.out", n=4)
            self.metric: Any = GridLogProb([1, 2, 3, 4], second_output)
        else:
            self.sites = grid_sites(n_layers, self.clean.layout.length, KINDS).sites
            self.metric = LogitDiff(11, 12)

        self._refs: dict[str, torch.Tensor] = {}

    def reference(self, direction: str = "denoise") -> torch.Tensor:
        """One plain forward per site (cached per direction)."""
        if direction not in self._refs:
            src, tgt = (
                (self.clean, self.corrupted) if direction == "denoise" else (self.corrupted, self.clean)
            )
            _, states = collect_states(self.model, self.adapter, src, [s.point for s in self.sites])
            self._refs[direction] = run_sites_reference(
                self.model, self.adapter, tgt, self.sites, states, self.metric
            )
        return self._refs[direction]


@pytest.fixture(scope="module")
def case() -> Callable[[str], Case]:
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = Case(name)
        return cache[name]

    return get


NAMES = ["tiny-llama", "tiny-qwen2", "tiny-query", "tiny-janus"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_equals_one_forward_per_site(case: Callable, name: str, direction: str) -> None:
    c = case(name)
    ref = c.reference(direction)
    res = patch_sweep(c.model, c.clean, c.corrupted, c.sites, c.metric, direction=direction)
    assert res.info["strategy"] == "resume" and res.info["chunks"] < len(c.sites)
    assert float((res.values - ref).abs().max()) <= ATOL
    assert res.values.std() > 0  # the sweep measured something
    if name in ("tiny-llama", "tiny-qwen2"):
        assert res.info["suffix"], res.info["suffix_reason"]
    else:
        assert not res.info["suffix"] and res.info["suffix_reason"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "options",
    [{"resume": False}, {"suffix": False}, {"skip_noops": False}, {"budget_bytes": 1}],
    ids=["no-resume", "no-suffix", "no-noop-skip", "one-site-per-chunk"],
)
def test_each_reuse_is_exact_on_its_own(case: Callable, name: str, options: dict) -> None:
    c = case(name)
    res = patch_sweep(c.model, c.clean, c.corrupted, c.sites, c.metric, **options)
    assert float((res.values - c.reference()).abs().max()) <= ATOL
    if options.get("resume") is False:
        assert res.info["strategy"] == "full" and "resume=False" in res.info["reason"]
    if "budget_bytes" in options:
        assert res.info["chunks"] == len(c.sites) - res.info["noops"]


def test_baselines_and_sanity_of_the_grid(case: Callable) -> None:
    c = case("tiny-llama")
    res = patch_sweep(c.model, c.clean, c.corrupted, grid_sites(2, 6, KINDS), c.metric)
    with torch.no_grad():
        clean = float(c.metric(c.model(**c.clean.kwargs)))
        corrupted = float(c.metric(c.model(**c.corrupted.kwargs)))
    assert res.clean == pytest.approx(clean, abs=1e-6) and res.corrupted == pytest.approx(corrupted, abs=1e-6)
    grid = res.as_grid()  # [kind, layer, position], normalised
    assert grid.shape == (4, 2, 6)
    resid_pre = grid[KINDS.index("resid_pre")]
    # before the differing token nothing differs: patching there is a no-op (0); the last
    # position's final-block output decides the answer alone (1)
    assert torch.allclose(grid[:, :, :2], torch.zeros(4, 2, 2), atol=1e-5)
    assert resid_pre[0, 2] == pytest.approx(1.0, abs=1e-4)  # the only differing embedding
    assert grid[KINDS.index("resid_post"), 1, 5] == pytest.approx(1.0, abs=1e-4)
    assert res.info["noops"] >= 4 * 2 * 2


def test_batch_of_prompt_pairs_averages_rows(case: Callable) -> None:
    c = case("tiny-qwen2")
    ad, m = c.adapter, c.model
    clean = ad.prepare(m, [{"input_ids": [1, 5, 6, 7, 8]}, {"input_ids": [1, 20, 21, 22, 23]}])
    corrupted = ad.prepare(m, [{"input_ids": [1, 5, 9, 7, 8]}, {"input_ids": [1, 20, 30, 22, 23]}])
    sites = grid_sites(2, 5, ("resid_pre", "mlp_out"))
    res = patch_sweep(m, clean, corrupted, sites, c.metric)
    _, states = collect_states(m, ad, clean, [s.point for s in sites.sites])
    ref = run_sites_reference(m, ad, corrupted, sites.sites, states, c.metric)
    assert float((res.values - ref).abs().max()) <= ATOL
    singles = []
    for i in range(2):
        one = patch_sweep(
            m, ad.prepare(m, [{"input_ids": clean.kwargs["input_ids"][i].tolist()}]),
            ad.prepare(m, [{"input_ids": corrupted.kwargs["input_ids"][i].tolist()}]), sites, c.metric,
        )  # fmt: skip
        singles.append(one.values)
    assert torch.allclose(res.values, (singles[0] + singles[1]) / 2, atol=ATOL)


def test_blocks_that_run_twice_fall_back_to_full_forwards(case: Callable) -> None:
    c = case("tiny-llama")

    def twice(model: Any, inputs: ModelInputs) -> Any:  # e.g. a model that re-reads its own output
        model(**inputs.kwargs)
        return model(**inputs.kwargs)

    sites = grid_sites(2, 6, ("attn_out",))
    res = patch_sweep(c.model, c.clean, c.corrupted, sites, c.metric, forward=twice)
    assert res.info["strategy"] == "full" and "ran [2, 2] times" in res.info["reason"]
    assert res.info["notes"]
    _, states = collect_states(c.model, c.adapter, c.clean, [s.point for s in sites.sites], twice)
    ref = run_sites_reference(c.model, c.adapter, c.corrupted, sites.sites, states, c.metric, forward=twice)
    assert float((res.values - ref).abs().max()) <= ATOL


def test_suffix_forwards_run_final_mlp_and_head_on_the_last_position_only(case: Callable) -> None:
    c = case("tiny-llama")
    mlp = get_module(c.model, f"{c.adapter.blocks}.1.{c.adapter.mlp}")
    seen_mlp: list[int] = []
    seen_head: list[int] = []

    def mlp_hook(m: Any, a: tuple) -> None:
        seen_mlp.append(a[0].shape[1])

    handles = [child.register_forward_pre_hook(mlp_hook) for child in mlp.children()]
    handles.append(
        get_module(c.model, c.adapter.lm_head).register_forward_pre_hook(
            lambda m, a: seen_head.append(a[0].shape[1])
        )
    )
    try:
        res = patch_sweep(c.model, c.clean, c.corrupted, c.sites, c.metric)
    finally:
        for h in handles:
            h.remove()
    n = c.clean.layout.length
    assert res.info["suffix"] and res.info["chunks"] >= 1
    # the clean and the target run see every position; each patched forward the last one only
    assert set(seen_mlp) == {1, n} and seen_head.count(n) == 2 and set(seen_head) == {1, n}
    assert float((res.values - c.reference()).abs().max()) <= ATOL


def test_model_level_points_on_the_suffix_path(case: Callable) -> None:
    c = case("tiny-llama")  # patches at the head's input keep every position of the head
    sites = point_sites("lm_head.in", [0, 3, 5]) + point_sites("final_norm", [0, 5])
    sites += point_sites("embed", [2]) + grid_sites(2, 6, ("resid_pre", "mlp_out")).sites
    _, states = collect_states(c.model, c.adapter, c.clean, [s.point for s in sites])
    ref = run_sites_reference(c.model, c.adapter, c.corrupted, sites, states, c.metric)
    res = patch_sweep(c.model, c.clean, c.corrupted, sites, c.metric)
    assert res.info["suffix"] and float((res.values - ref).abs().max()) <= ATOL


def test_hooks_and_block_forwards_are_restored(case: Callable) -> None:
    c = case("tiny-llama")
    before = c.model(**c.corrupted.kwargs).logits
    patch_sweep(c.model, c.clean, c.corrupted, c.sites, c.metric)
    for mod in c.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert "forward" not in mod.__dict__
    assert torch.equal(c.model(**c.corrupted.kwargs).logits, before)


def test_errors_name_the_problem(case: Callable) -> None:
    c = case("tiny-llama")
    short = c.adapter.prepare(c.model, [{"input_ids": [1, 5, 6]}])
    with pytest.raises(ValueError, match="clean run has 6 positions but the corrupted run has 3.*align"):
        patch_sweep(c.model, c.clean, short, grid_sites(2, 3), c.metric)
    with pytest.raises(ValueError, match="one value per batch row"):
        patch_sweep(c.model, c.clean, c.corrupted, grid_sites(2, 6), lambda out: out.logits.sum())
    with pytest.raises(IndexError, match="source positions \\[9\\]"):
        patch_sweep(c.model, c.clean, c.corrupted, [PatchSite("blocks.0.resid_pre", (1,), (9,))], c.metric)
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(c.model, c.clean, c.corrupted, grid_sites(2, 6), c.metric, direction="sideways")
    with pytest.raises(ValueError, match="outside the sequence"):
        grid_sites(2, 6, positions=[7])
    with pytest.raises(ValueError, match="unknown site kind 'resid_mid'"):
        grid_sites(2, 6, ("resid_mid",))
    with pytest.raises(ValueError, match="role 'query' has no positions"):
        role_sites(2, c.clean.layout, ["query"])
    with pytest.raises(ValueError, match="repeats a target position"):
        PatchSite("blocks.0.resid_pre", (1, 1))
