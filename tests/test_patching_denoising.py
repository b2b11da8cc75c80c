"""The denoising-loss metric (probes/patching/denoising.py): equal to a hand-written training loss."""

from __future__ import annotations

import pytest
import torch
from uniprobe.hooks.errors import UsageError
from uniprobe.probes.patching.denoising import DenoisingLoss, denoising_loss, noised, seeded_draws


def _toy_predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, timestep-dependent denoiser (no diffusers needed)."""
    return 0.5 * x_t + 0.01 * t.float().view(-1, 1, 1, 1)


def _hand_loss(x0, timesteps, noises, ptype, abar=None):
    """The training loss written out per row, per timestep, per element (the reference)."""
    rows = []
    for b in range(x0.shape[0]):
        total = 0.0
        for j, t in enumerate(timesteps):
            eps = noises[j, min(b, noises.shape[1] - 1)]
            if ptype == "flow":
                x_t, target = (1 - t) * x0[b] + t * eps, eps - x0[b]
            else:
                a, s = abar[int(t)].sqrt(), (1 - abar[int(t)]).sqrt()
                x_t = a * x0[b] + s * eps
                target = {"epsilon": eps, "v_prediction": a * eps - s * x0[b], "sample": x0[b]}[ptype]
            pred = _toy_predict(x_t[None], torch.tensor([t]))[0]
            total += float(((pred - target) ** 2).mean())
        rows.append(total / len(timesteps))
    return torch.tensor(rows)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample", "flow"])
def test_denoising_loss_equals_hand_written(ptype):
    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0)
    timesteps, noises = seeded_draws((2, 4, 4), 5, ptype, n_train_timesteps=100, seed=3)
    got = denoising_loss(_toy_predict, x0, timesteps, noises, ptype, None if ptype == "flow" else abar)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _hand_loss(x0, timesteps, noises, ptype, abar), rtol=1e-5, atol=1e-6)


def test_flow_noising_is_rectified_flow():
    x0, eps = torch.ones(1, 2), torch.full((1, 2), 3.0)
    x_t, v = noised(x0, eps, torch.tensor([0.25]), "flow")
    torch.testing.assert_close(x_t, torch.full((1, 2), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(v, torch.full((1, 2), 2.0))


def test_seeded_draws_repeat_and_differ_by_seed():
    a, b, c = (seeded_draws((2, 3), 4, "epsilon", 50, seed=s) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[0].dtype == torch.long and int(a[0].max()) < 50
    t, _ = seeded_draws((2,), 8, "flow", seed=0)
    assert bool(((t > 0) & (t < 1)).all())


def test_bad_prediction_type_and_missing_schedule_are_named():
    x0 = torch.zeros(1, 2)
    with pytest.raises(UsageError, match="'eps'.*epsilon"):
        denoising_loss(_toy_predict, x0, torch.tensor([1]), torch.zeros(1, 1, 2), "eps")
    with pytest.raises(UsageError, match="alphas_cumprod"):
        denoising_loss(lambda x, t: x, x0, torch.tensor([1]), torch.zeros(1, 1, 2), "epsilon")


def test_metric_pairs_patched_rows_with_their_example():
    """n = m·B conditioning rows: row i·B + b is scored against x0[b] (as the patching engine lays rows)."""
    torch.manual_seed(1)
    x0 = torch.randn(2, 3)
    timesteps, noises = seeded_draws((3,), 3, "flow", seed=0)

    def predict(x_t, t, cond):
        return x_t * cond[:, :1] + t[:, None]

    metric = DenoisingLoss(predict, x0, timesteps, noises, "flow", cond_fn=lambda out: out)
    cond = torch.randn(6, 4)
    got = metric(cond)
    for r in range(6):
        ref = denoising_loss(
            lambda x, t, r=r: predict(x, t, cond[r : r + 1]), x0[r % 2 : r % 2 + 1], timesteps, noises, "flow"
        )
        torch.testing.assert_close(got[r : r + 1], ref)
