"""Metrics for continuous generation by rectified flow (BAGEL, ``sandbox-mot``), for patching and attribution.

A flow model has no image-token logits to measure; what it produces is a velocity at its image
latents. Two teacher-forced measures, deterministic and cheap, plus the judge:

- **flow loss** of a target image ``x0`` at a seeded set of ``(t_j, ε_j)``: the training loss
  ``mean (v(x_t_j, t_j) − (ε_j − x0))²`` with ``x_t = (1 − t)·x0 + t·ε`` — the formula of
  :func:`uniprobe.probes.patching.denoising.noised` (``prediction_type="flow"``), shared, not
  rewritten. :func:`flow_inputs` stacks the ``k`` timesteps as batch rows (row ``j·B + b`` is example
  ``b`` at ``t_j``), so one forward measures them all; :class:`FlowLoss` scores each row (lower is
  better; the sweeps' normalisation still reads 1 as "the clean loss fully restored").
  :func:`flow_loss` is the per-example form, one forward per timestep
  (:func:`~uniprobe.probes.patching.denoising.denoising_loss`).
- **velocity difference** to a reference run (:class:`VelocityDiff`): ``mean (v − v_ref)²`` per row,
  the reference set by ``prepare(clean_outputs)`` as for :class:`~.metrics.KLToClean`.
- **judge** on sampled drawings: :class:`~.metrics.JudgeRate` on the adapter's generated tiles
  (:func:`~uniprobe.probes.patching.generation.generation_effect`; patches apply to the ``cond``
  pass of the denoising steps they name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from uniprobe.hooks.adapters.base import ModelInputs
from uniprobe.probes.patching.denoising import denoising_loss, noised, seeded_draws
from uniprobe.probes.patching.engine import repeat_inputs
from uniprobe.probes.patching.metrics import _Metric

VelocityFn = Callable[[Any], torch.Tensor]


def velocity_of(outputs: Any) -> torch.Tensor:
    """``outputs.velocity`` (``[n, latents, c]``), else the outputs themselves when a tensor."""
    v = getattr(outputs, "velocity", None)
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise TypeError(f"cannot find a velocity in {type(outputs).__name__}; pass velocity_fn=...")


def flow_draws(shape: tuple[int, ...], k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(timesteps [k] in (0, 1), noises [k, 1, *shape])`` (:func:`~.denoising.seeded_draws`)."""
    return seeded_draws(shape, k, "flow", seed=seed)


def _rows(x0: torch.Tensor, timesteps: torch.Tensor, noises: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x_t, target, t)`` for the ``k·B`` rows (row ``j·B + b``: example ``b`` at ``t_j``)."""
    k, b = len(timesteps), x0.shape[0]
    if noises.dim() != x0.dim() + 1 or noises.shape[0] != k:
        raise ValueError(
            f"noises must be [k={k}, B or 1, *shape] for x0 {tuple(x0.shape)}, got {tuple(noises.shape)}"
        )
    eps = noises.to(x0).expand(k, b, *x0.shape[1:]).reshape(k * b, *x0.shape[1:])
    t = torch.as_tensor(timesteps, dtype=x0.dtype).repeat_interleave(b)
    x_t, target = noised(x0.repeat(k, *([1] * (x0.dim() - 1))), eps, t, "flow")
    return x_t, target, t


def flow_inputs(
    inputs: ModelInputs,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    latents_key: str = "latents",
    timesteps_key: str = "timesteps",
) -> ModelInputs:
    """Prepared drawing inputs (batch ``B``) → ``k·B`` rows, each teacher-forced at one ``(t_j, ε_j)``:
    the model's ``latents_key`` gets ``x_t [k·B, latents, c]`` and ``timesteps_key`` gets ``t [k·B]``.

    ``x0 [B, latents, c]`` is the target image's clean latents (the sandbox: ``model.tile_latents[tiles]``).
    """
    x_t, _, t = _rows(x0, timesteps, noises)
    rep = repeat_inputs(inputs, len(timesteps))
    rep.kwargs[latents_key], rep.kwargs[timesteps_key] = x_t, t
    rep.source = inputs.source
    return rep


class FlowLoss(_Metric):
    """Per row of :func:`flow_inputs`' batch: ``mean (v − (ε − x0))²`` → ``[n]`` (lower is better).

    A patched batch of ``n = m·k·B`` rows repeats the ``k·B`` targets ``m`` times.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        timesteps: torch.Tensor,
        noises: torch.Tensor,
        velocity_fn: VelocityFn = velocity_of,
    ) -> None:
        _, self.target, _ = _rows(x0, timesteps, noises)
        self.velocity_fn = velocity_fn
        self.name = f"flow_loss({len(timesteps)} timesteps)"

    def __call__(self, outputs: Any) -> torch.Tensor:
        v = self.velocity_fn(outputs)
        r = self.target.shape[0]
        if v.shape[0] % r:
            raise ValueError(
                f"{v.shape[0]} rows are not a whole number of the {r} flow rows (k timesteps × B)"
            )
        target = self.target.to(v).repeat(v.shape[0] // r, *([1] * (v.dim() - 1)))
        return (v.float() - target.float()).pow(2).flatten(1).mean(1)


class VelocityDiff(_Metric):
    """``mean (v − v_ref)²`` per row → ``[n]``; ``prepare(clean_outputs)`` sets the reference."""

    name = "velocity_diff"

    def __init__(self, velocity_fn: VelocityFn = velocity_of) -> None:
        self.velocity_fn = velocity_fn
        self.reference: torch.Tensor | None = None

    def prepare(self, clean_outputs: Any) -> None:
        self.reference = self.velocity_fn(clean_outputs).detach()

    def __call__(self, outputs: Any) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("VelocityDiff has no reference: call prepare(clean_outputs) first")
        v, ref = self.velocity_fn(outputs), self.reference
        if v.shape[0] % ref.shape[0]:
            raise ValueError(f"{v.shape[0]} rows are not a whole number of the reference's {ref.shape[0]}")
        ref = ref.to(v).repeat(v.shape[0] // ref.shape[0], *([1] * (v.dim() - 1)))
        return (v.float() - ref.float()).pow(2).flatten(1).mean(1)


def flow_loss(
    forward: Callable[[ModelInputs], Any],
    inputs: ModelInputs,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    velocity_fn: VelocityFn = velocity_of,
    latents_key: str = "latents",
    timesteps_key: str = "timesteps",
) -> torch.Tensor:
    """Per example (``[B]``): the flow loss averaged over the ``k`` timesteps, one forward per timestep
    (``forward(inputs)`` with ``latents_key`` / ``timesteps_key`` set), through
    :func:`~uniprobe.probes.patching.denoising.denoising_loss`."""

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kw = {**inputs.kwargs, latents_key: x_t, timesteps_key: t}
        return velocity_fn(forward(ModelInputs(kw, inputs.layout, inputs.source)))

    return denoising_loss(predict, x0, torch.as_tensor(timesteps), noises, "flow")
