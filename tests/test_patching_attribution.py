"""Attribution patching: exactly the first-order term of exact patching (a vanishing perturbation
matches it), and on a model with a real mechanism (a tiny Llama trained to copy a token) its
map correlates with exact patching — resid_pre, attn_out and mlp_out, both directions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from uniprobe.experiments.tiny import build_tiny, tiny_llama
from uniprobe.hooks.adapters import ModelInputs, adapter_for
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching import (
    GridLogProb,
    LogitDiff,
    attribution_patch,
    attribution_vs_exact,
    grid_sites,
    patch_sweep,
    point_sites,
    role_sites,
)

KINDS3 = ("resid_pre", "attn_out", "mlp_out")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def copier() -> tuple[Any, Any]:
    """A 2-layer Llama trained (~150 AdamW steps) to output the token at position 2 last.

    Clean ``[1 5 6 7 8 9]`` answers 6, corrupted ``[1 5 10 7 8 9]`` answers 10: the effect lives at
    position 2 early and moves to the last position through attention — not degenerate.
    """
    torch.manual_seed(0)
    model, _ = tiny_llama(layers=2, hidden=32, vocab=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        x = torch.randint(3, 32, (64, 6))
        x[:, 0] = 1
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, -1], x[:, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, adapter_for(model)


@pytest.mark.parametrize(("direction", "floor"), [("denoise", 0.8), ("noise", 0.6)])
def test_attribution_tracks_exact_on_a_copying_model(copier: tuple, direction: str, floor: float) -> None:
    model, adapter = copier
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7, 8, 9]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 10, 7, 8, 9]}])
    sites = grid_sites(2, 6, KINDS3)
    metric = LogitDiff(6, 10)
    exact = patch_sweep(model, clean, corrupted, sites, metric, direction=direction)
    approx = attribution_patch(model, clean, corrupted, sites, metric, direction=direction)
    assert exact.clean - exact.corrupted > 5  # the model answers: a real effect to localise
    assert approx.clean == exact.clean and approx.corrupted == exact.corrupted
    agree = attribution_vs_exact(approx, exact)
    print(f"attribution vs exact ({direction}): correlation {agree['correlation']:.3f}")
    assert agree["correlation"] > floor
    # where exact says nothing can happen (positions 0-1: identical states), attribution says 0 too
    unpatched = approx.corrupted if direction == "denoise" else approx.clean
    assert torch.allclose(
        approx.as_grid(normalised=False)[:, :, :2], torch.full((3, 2, 2), unpatched), atol=1e-6
    )
    assert approx.info == {"forwards": 2, "backwards": 1, "kernel": "torch"}


def _embeds_case() -> tuple[Any, Any, ModelInputs, ModelInputs]:
    model, _ = tiny_llama(layers=2)
    adapter = adapter_for(model)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights: attribution must still get activation gradients
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    base = model.get_input_embeddings()(ids).detach()
    layout = TokenLayout.uniform(1, 5)
    mask = torch.ones(1, 5, dtype=torch.long)
    corrupted = ModelInputs({"inputs_embeds": base, "attention_mask": mask}, layout)
    clean = ModelInputs(
        {"inputs_embeds": base + 1e-3 * torch.randn(base.shape, generator=g), "attention_mask": mask}, layout
    )
    return model, adapter, clean, corrupted


def test_a_vanishing_perturbation_makes_attribution_exact() -> None:
    model, adapter, clean, corrupted = _embeds_case()
    sites = grid_sites(2, 5, KINDS3)
    metric = LogitDiff(11, 12)
    exact = patch_sweep(model, clean, corrupted, sites, metric)
    approx = attribution_patch(model, clean, corrupted, sites, metric)
    effect_e, effect_a = exact.values - exact.corrupted, approx.values - approx.corrupted
    assert effect_e.abs().max() > 1e-5  # not all zero
    agree = attribution_vs_exact(approx, exact)
    assert agree["correlation"] > 0.99
    assert float((effect_a - effect_e).abs().max()) < 0.02 * float(effect_e.abs().max())


def test_attribution_on_roles_and_model_level_points_of_a_query_model() -> None:
    model, _ = build_tiny("tiny-query", layers=2)
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 5, 9, 7]}])
    sites = role_sites(2, clean.layout, ["text", "query"], KINDS3).sites + point_sites(
        "connector.out", [0, 1, 2, 3]
    )
    metric = GridLogProb([1, 2, 3, 4])
    exact = patch_sweep(model, clean, corrupted, sites, metric)
    approx = attribution_patch(model, clean, corrupted, sites, metric)
    assert torch.isfinite(approx.values).all()
    assert attribution_vs_exact(approx, exact)["correlation"] > 0.5


def test_attribution_checks_its_arguments() -> None:
    model, adapter, clean, corrupted = _embeds_case()
    with pytest.raises(ValueError, match="direction"):
        attribution_patch(model, clean, corrupted, grid_sites(2, 5), LogitDiff(1, 2), direction="both")
    short = ModelInputs(
        {
            "inputs_embeds": clean.kwargs["inputs_embeds"][:, :3],
            "attention_mask": torch.ones(1, 3, dtype=torch.long),
        },
        TokenLayout.uniform(1, 3),
    )
    with pytest.raises(ValueError, match="positions do not line up"):
        attribution_patch(model, clean, short, grid_sites(2, 3), LogitDiff(1, 2))
