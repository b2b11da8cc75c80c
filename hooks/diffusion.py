"""Diffusion decoders (diffusers models and schedulers): the lazy import, one denoising call, sampling.

A query-based model's decoder (MetaQuery, BLIP3-o, OpenUni) or GLM-Image's DiT is a diffusers model:
one ``forward`` is one denoising step, ``decoder(x_t, timestep=t, encoder_hidden_states=cond)`` →
prediction. This module is the only place uniprobe touches diffusers; it is imported lazily (the
``diffusion`` extra) and its absence is a :class:`~uniprobe.hooks.errors.MissingDependencyError`.

Sampling (:func:`denoise`) uses the scheduler's own ``set_timesteps`` / ``step``; only the loop is
written here, because diffusers' pipelines bundle text encoders and tokenizers a query model does
not have. With classifier-free guidance the decoder sees ``[cond; uncond]`` (rows ``0..B-1`` are
the conditional branch, as everywhere in uniprobe: diffusers' own pipelines put ``uncond`` first),
so a capture with ``cfg_batch=B`` tags the branches right.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.errors import MissingDependencyError, UniprobeError

INSTALL = "pip install 'uniprobe[diffusion]'"


def diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require_diffusers() -> Any:
    """The ``diffusers`` module, or a :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as err:
        raise MissingDependencyError(
            f"diffusion decoders need diffusers, which is not installed ({err}); install it with "
            f"{INSTALL} (uniprobe never installs packages at run time)"
        ) from err


class DecoderCallError(UniprobeError, TypeError):
    """A decoder whose forward does not look like a diffusers denoiser (names the diffusers version)."""


def prediction_type_of(scheduler: Any) -> str:
    """What the decoder predicts, from its scheduler: ``epsilon`` / ``v_prediction`` / ``sample`` /
    ``flow`` (flow-matching schedulers, ``FlowMatch*``)."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow"
    ptype = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if ptype in ("epsilon", "v_prediction", "sample"):
        return ptype
    raise UniprobeError(
        f"cannot tell what a decoder under {name} (diffusers {diffusers_version()}) predicts: its config has "
        f"prediction_type={ptype!r}; use a scheduler with config.prediction_type epsilon / v_prediction / "
        "sample, a FlowMatch* scheduler, or call denoising_loss with prediction_type= yourself"
    )


def _sample_arg(decoder: nn.Module) -> str:
    params = inspect.signature(decoder.forward).parameters
    for name in ("hidden_states", "sample"):
        if name in params:
            if "timestep" not in params or "encoder_hidden_states" not in params:
                break
            return name
    raise DecoderCallError(
        f"{type(decoder).__name__} (diffusers {diffusers_version()}): forward takes "
        f"({', '.join(params)}); a denoising decoder must take hidden_states or sample, timestep and "
        "encoder_hidden_states (diffusers UNet2DConditionModel, PixArtTransformer2DModel, ...)"
    )


def decoder_call(
    decoder: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """One denoising forward: ``x_t [n, C, H, W]``, ``timestep [n]`` (the model's own units),
    ``cond [n, N, d]`` → prediction ``[n, C, H, W]``; ``kwargs`` go to the decoder as they are."""
    sample = _sample_arg(decoder)
    out = decoder(**{sample: x_t}, timestep=timestep, encoder_hidden_states=cond, return_dict=False, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def decoder_predict(
    decoder: nn.Module, prediction_type: str, n_train_timesteps: int = 1000, **kwargs: Any
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t, t, cond) -> prediction`` for :class:`~uniprobe.probes.patching.denoising.DenoisingLoss`:
    flow times ``t ∈ [0, 1]`` become the model's timestep ``t · n_train_timesteps`` (diffusers'
    flow-matching convention); integer steps pass as they are."""

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        step = t * n_train_timesteps if prediction_type == "flow" else t
        return decoder_call(decoder, x_t, step, cond, **kwargs)

    return predict


@torch.no_grad()
def denoise(
    decoder: nn.Module,
    scheduler: Any,
    cond: torch.Tensor,
    shape: tuple[int, ...],
    steps: int = 4,
    guidance_scale: float = 1.0,
    uncond: torch.Tensor | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """Sample ``[B, *shape]`` latents from conditioning ``cond [B, N, d]`` in ``steps`` scheduler steps.

    ``guidance_scale > 1`` runs ``[cond; uncond]`` in one batch (``uncond`` defaults to zeros: the
    decoder's null condition) and mixes ``uncond + s·(cond − uncond)``. One decoder forward per step:
    a capture around this call tags step ``j`` with ``scheduler.timesteps[j]``. ``seed`` seeds the
    initial noise and every noise the scheduler's ``step`` draws (DDPM adds noise each step), so the
    same seed gives the same latents.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cond.shape[0], *shape, generator=gen).to(cond)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scheduler.set_timesteps(steps)
    # stochastic schedulers (DDPM) draw noise in step(): from our generator, not the global RNG
    step_kw = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    cfg = guidance_scale != 1.0
    if cfg:
        cond = torch.cat([cond, torch.zeros_like(cond) if uncond is None else uncond.to(cond)])
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        if hasattr(scheduler, "scale_model_input"):
            inp = scheduler.scale_model_input(inp, t)
        pred = decoder_call(decoder, inp, t.expand(inp.shape[0]).to(cond.device), cond, **kwargs)
        if cfg:
            c, u = pred.chunk(2)
            pred = u + guidance_scale * (c - u)
        x = scheduler.step(pred, t, x, return_dict=False, **step_kw)[0]
    return x
