"""Flow metrics (probes/patching/flow.py) on sandbox-mot: the flow loss equals a hand-written training
loss, patching and attribution run on it, the velocity difference, and judged patched sampling."""

from __future__ import annotations

import pytest
import torch
from uniprobe.experiments.sandbox import build_model
from uniprobe.experiments.sandbox.adapter import prepare
from uniprobe.experiments.tasks import world
from uniprobe.probes.patching import attribution_patch, grid_sites, patch_sweep
from uniprobe.probes.patching.flow import FlowLoss, VelocityDiff, flow_draws, flow_inputs, flow_loss
from uniprobe.probes.patching.generation import StepPatch, generation_effect

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("mot", backbone=TINY).eval()
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    m.n_steps = 3
    return m


def _target(model, text="draw 3 red apple"):
    tiles = world.encode(world.count_grid(3, world.object_tile("apple", "red")))
    return model.tile_latents[torch.tensor([tiles])], tiles


def test_flow_loss_equals_a_hand_written_training_loss(model) -> None:
    x0, _ = _target(model)
    inputs = prepare(model, [{"prompt": "draw 3 red apple"}], "generation")
    ts, noises = flow_draws(tuple(x0.shape[1:]), k=3, seed=5)
    hand = []
    with torch.no_grad():
        for j, t in enumerate(ts):
            eps = noises[j, 0]
            x_t = (1 - t) * x0[0] + t * eps  # rectified flow, written out
            v = model(**inputs.kwargs, latents=x_t[None], timesteps=t[None]).velocity[0]
            hand.append(((v - (eps - x0[0])) ** 2).mean())
        rows = FlowLoss(x0, ts, noises)(model(**flow_inputs(inputs, x0, ts, noises).kwargs))
        per_example = flow_loss(lambda i: model(**i.kwargs), inputs, x0, ts, noises)
    torch.testing.assert_close(rows, torch.stack(hand), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_example, torch.stack(hand).mean()[None], rtol=1e-5, atol=1e-6)


def test_patching_and_attribution_with_the_flow_loss(model) -> None:
    x0, _ = _target(model)
    ts, noises = flow_draws(tuple(x0.shape[1:]), k=2, seed=1)
    clean = flow_inputs(prepare(model, [{"prompt": "draw 3 red apple"}], "generation"), x0, ts, noises)
    corrupt = flow_inputs(prepare(model, [{"prompt": "draw 1 red apple"}], "generation"), x0, ts, noises)
    length = clean.kwargs["input_ids"].shape[1]
    assert corrupt.kwargs["input_ids"].shape[1] == length
    sites = grid_sites(2, length, ("resid_pre", "mlp_out"))
    metric = FlowLoss(x0, ts, noises)
    exact = patch_sweep(model, clean, corrupt, sites, metric)
    with torch.no_grad():
        want = float(metric(model(**clean.kwargs)).mean())
    assert exact.clean == pytest.approx(want, rel=1e-5)
    count = (clean.kwargs["input_ids"] != corrupt.kwargs["input_ids"])[0].nonzero().squeeze(-1).tolist()
    assert count, "the prompts differ at the count word"
    # patching the clean residual at layer 0 at the differing position restores the clean run exactly
    vals = exact.normalised.reshape(2, 2, length)  # [kind, layer, position]
    assert float(vals[0, 0, count[0]]) == pytest.approx(1.0, abs=1e-4)
    approx = attribution_patch(model, clean, corrupt, sites, metric)
    assert torch.isfinite(approx.values).all() and approx.values.shape == exact.values.shape


def test_velocity_difference_is_zero_on_the_reference(model) -> None:
    inputs = prepare(model, [{"prompt": "draw 2 blue cup"}, {"prompt": "draw 4 red ball"}], "generation")
    metric = VelocityDiff()
    with pytest.raises(ValueError, match="prepare"):
        metric(torch.zeros(2, 9, 16))
    with torch.no_grad():
        out = model(**inputs.kwargs)
        metric.prepare(out)
        assert torch.equal(metric(out), torch.zeros(2))
        other = model(**prepare(model, [{"prompt": "draw 1 blue cup"}] * 2, "generation").kwargs)
    assert bool((metric(other) > 0).all())


def test_patched_sampling_is_judged(model) -> None:
    """Patching every layer-0 input of the clean prompt into the corrupted one at every denoising step
    reproduces the clean drawing; JudgeRate reads the tiles."""
    clean = prepare(model, [{"prompt": "draw 3 red apple"}], "generation")
    corrupt = prepare(model, [{"prompt": "draw 1 red apple"}], "generation")
    with torch.no_grad():
        clean_tiles = model.generate_image(["draw 3 red apple"])[0].reshape(-1).tolist()
    length = clean.kwargs["input_ids"].shape[1]
    states = model.language_model.model.embed_tokens(clean.kwargs["input_ids"])[0].detach()
    prompt_pos = list(range(length - model.n_cells))
    patches = [
        StepPatch("blocks.0.resid_pre", k, prompt_pos, states[prompt_pos]) for k in range(model.n_steps)
    ]
    effect = generation_effect(model, clean, corrupt, patches, lambda t: t.tolist() == clean_tiles)
    assert effect.clean == 1.0 and effect.patched == 1.0
    assert effect.tokens[0].tolist() == clean_tiles
    assert all(p.applied == 1 for p in patches)  # the cond pass of each step only
