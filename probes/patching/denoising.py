"""The denoising loss: a diffusion (or flow) decoder's own training loss on a target image, as a metric.

A query-based model (MetaQuery, BLIP3-o, OpenUni) or GLM-Image draws by denoising, so "how well does
this run's conditioning produce *that* image?" is the decoder's training loss on the target, at a
fixed, seeded set of timesteps and noises (the same for every run compared, so differences come from
the conditioning alone). Per timestep ``t_j`` and noise ``ε_j``:

- ``"epsilon"``: ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, target ``ε``;
- ``"v_prediction"``: same ``x_t``, target ``v = √ᾱ_t·ε − √(1−ᾱ_t)·x0``;
- ``"sample"``: same ``x_t``, target ``x0``;
- ``"flow"`` (rectified flow, BAGEL / SD3 / GLM-Image): ``t ∈ [0, 1]``, ``x_t = (1−t)·x0 + t·ε``,
  target ``v = ε − x0``;

and the loss of a row is ``mean_j mean_features (predict(x_t, t_j) − target)²`` → ``[batch]``.
``ᾱ`` is the scheduler's ``alphas_cumprod`` (the formulas of diffusers' ``DDPMScheduler.add_noise`` /
``get_velocity``, written out here so the core needs no diffusers model: the mixture-of-transformers
sandbox's flow metric calls :func:`denoising_loss` with its own ``predict``).

:class:`DenoisingLoss` is the patching metric: ``outputs → [rows]``, the conditioning read from the
model's outputs (``cond_fn``, default ``outputs[1]``: a query model's connector output), the decoder
run on it. Lower is better; the sweeps' normalisation ``(patched − corrupted) / (clean − corrupted)``
still reads 1 as "the clean loss fully restored".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from uniprobe.hooks.errors import UsageError
from uniprobe.probes.patching.metrics import _Metric, second_output

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(
            f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)} "
            "(diffusers schedulers name it in config.prediction_type; flow matching is 'flow')"
        )
    return prediction_type


def noised(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)`` for clean ``x0 [b, *shape]``, ``noise [b, *shape]`` and timesteps ``t [b]``.

    ``t`` indexes ``alphas_cumprod [T]`` (integer steps) for ``epsilon`` / ``v_prediction`` /
    ``sample``; it is the flow time in ``[0, 1]`` for ``flow``.
    """
    check_prediction_type(prediction_type)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if prediction_type == "flow":
        s = t.to(x0.dtype).view(shape)
        return (1 - s) * x0 + s * noise, noise - x0
    if alphas_cumprod is None:
        raise UsageError(
            f"prediction type {prediction_type!r} needs the noise schedule: pass alphas_cumprod "
            "(a diffusers scheduler's .alphas_cumprod)"
        )
    abar = alphas_cumprod.to(x0.device)[t.long().to(x0.device)].to(x0.dtype).view(shape)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0 + s * noise
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction_type]
    return x_t, target


def denoising_loss(
    predict: Predict,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loss of every row → ``[batch]``.

    Args:
        predict: ``(x_t [batch, *shape], t [batch]) -> prediction [batch, *shape]`` (one call per timestep).
        x0: the clean target ``[batch, *shape]`` (latents or pixels).
        timesteps: ``[k]`` (integer steps, or flow times in ``[0, 1]`` for ``"flow"``).
        noises: ``[k, batch, *shape]`` or ``[k, 1, *shape]`` (one noise per timestep, shared by rows).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        alphas_cumprod: ``[T]`` the schedule (not needed for ``"flow"``).
    Returns:
        ``mean_j mean_features (predict(x_t_j, t_j) − target_j)²`` per row, float32 ``[batch]``.
    """
    if noises.dim() != x0.dim() + 1 or noises.shape[0] != len(timesteps):
        raise UsageError(
            f"noises must be [k={len(timesteps)}, batch, *shape] for x0 {tuple(x0.shape)}, "
            f"got {tuple(noises.shape)}"
        )
    total = x0.new_zeros(x0.shape[0], dtype=torch.float32)
    for j, t in enumerate(timesteps):
        noise = noises[j].to(x0).expand_as(x0)
        t_rows = t.expand(x0.shape[0])
        x_t, target = noised(x0, noise, t_rows, prediction_type, alphas_cumprod)
        err = (predict(x_t, t_rows).float() - target.float()) ** 2
        total = total + err.reshape(err.shape[0], -1).mean(1)
    return total / len(timesteps)


def seeded_draws(
    shape: tuple[int, ...], k: int, prediction_type: str, n_train_timesteps: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [k], noises [k, 1, *shape])`` from ``seed``: uniform integer steps in
    ``[0, n_train_timesteps)`` (flow: uniform times in ``(0, 1)``) and standard normal noises."""
    gen = torch.Generator().manual_seed(seed)
    if check_prediction_type(prediction_type) == "flow":
        timesteps = torch.rand(k, generator=gen).clamp(1e-3, 1 - 1e-3)
    else:
        timesteps = torch.randint(0, n_train_timesteps, (k,), generator=gen)
    return timesteps, torch.randn(k, 1, *shape, generator=gen)


class DenoisingLoss(_Metric):
    """The decoder's denoising loss on ``x0`` given each row's conditioning → ``[rows]`` (lower = better).

    Args:
        decoder_predict: ``(x_t [n, *shape], t [n], cond [n, ...]) -> prediction [n, *shape]``
            (for diffusers decoders :func:`uniprobe.hooks.diffusion.decoder_predict`).
        x0: target ``[B, *shape]`` (or ``[*shape]`` for one target); patched batches of ``n = m·B`` rows
            pair row ``i·B + b`` with ``x0[b]``.
        timesteps, noises, prediction_type, alphas_cumprod: as in :func:`denoising_loss`.
        cond_fn: model outputs → conditioning ``[n, ...]`` (default ``outputs[1]``: the connector output).
    """

    def __init__(
        self,
        decoder_predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        timesteps: torch.Tensor,
        noises: torch.Tensor,
        prediction_type: str,
        alphas_cumprod: torch.Tensor | None = None,
        cond_fn: Callable[[Any], torch.Tensor] = second_output,
    ) -> None:
        self.decoder_predict, self.cond_fn = decoder_predict, cond_fn
        self.x0 = x0 if x0.dim() == noises.dim() - 1 else x0.unsqueeze(0)
        self.timesteps, self.noises = torch.as_tensor(timesteps), noises
        self.prediction_type = check_prediction_type(prediction_type)
        self.alphas_cumprod = alphas_cumprod
        self.name = f"denoising_loss({prediction_type}, {len(self.timesteps)} timesteps)"

    @classmethod
    def from_scheduler(
        cls,
        decoder_predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        scheduler: Any,
        k: int = 4,
        seed: int = 0,
        cond_fn: Callable[[Any], torch.Tensor] = second_output,
    ) -> DenoisingLoss:
        """The metric with ``k`` seeded timesteps/noises and the prediction type of a diffusers scheduler."""
        from uniprobe.hooks.diffusion import prediction_type_of

        ptype = prediction_type_of(scheduler)
        shape = tuple(x0.shape[1:])
        n_train = int(scheduler.config.num_train_timesteps)
        timesteps, noises = seeded_draws(shape, k, ptype, n_train, seed)
        acp = None if ptype == "flow" else scheduler.alphas_cumprod
        return cls(decoder_predict, x0, timesteps, noises, ptype, acp, cond_fn)

    def __call__(self, outputs: Any) -> torch.Tensor:
        cond = self.cond_fn(outputs)
        n, b = cond.shape[0], self.x0.shape[0]
        if n % b:
            raise ValueError(f"{n} conditioning rows are not a whole number of {b}-example batches")
        x0 = self.x0.to(cond.device).repeat(n // b, *([1] * (self.x0.dim() - 1)))
        return denoising_loss(
            lambda x_t, t: self.decoder_predict(x_t, t, cond),
            x0,
            self.timesteps.to(cond.device),
            self.noises.to(cond.device),
            self.prediction_type,
            self.alphas_cumprod,
        )
