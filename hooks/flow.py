"""Rectified-flow sampling: shifted timesteps, Euler steps, BAGEL's CFG combination, the implied x0.

BAGEL-style models (and the sandbox's ``sandbox-mot``) generate continuous latents by rectified
flow: ``x_t = (1 − t)·x0 + t·eps`` (``t = 0`` clean, ``t = 1`` pure noise), the model predicts the
velocity ``v = eps − x0``. That noising rule and target are written once, in
:func:`uniprobe.probes.patching.denoising.noised` (``prediction_type="flow"``), which the sandbox's
training and the flow metrics call; this module holds what sampling adds: Euler steps from
``t = 1`` to ``t = 0`` over shifted timesteps ``t' = s·t / (1 + (s − 1)·t)``, classifier-free
guidance combined as BAGEL does (text first, then image), and the clean latent a velocity implies.
Hand-written: a few lines of arithmetic no library ships as such.
"""

from __future__ import annotations

import torch

BRANCHES: tuple[str, ...] = ("cond", "uncond_text", "uncond_image")  # order of a step's CFG passes


def _per_row(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``t`` (scalar or ``[b]``) shaped to broadcast over ``like [b, ...]``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def predicted_clean(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The clean latent implied by a velocity: ``x0 = x_t − t·v``."""
    return x_t - _per_row(t, x_t) * v


def shifted_timesteps(n_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``n_steps + 1`` timesteps from 1 to 0, shifted: ``t' = s·t / (1 + (s − 1)·t)`` → ``[n_steps + 1]``."""
    if n_steps < 1 or shift <= 0:
        raise ValueError(f"n_steps must be >= 1 and shift > 0 (got n_steps={n_steps}, shift={shift})")
    t = torch.linspace(1.0, 0.0, n_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of ``dx/dt = v`` from ``t`` down to ``t_next``: ``x − (t − t_next)·v``."""
    return x_t - (t - t_next) * v


def guided_velocity(
    v_cond: torch.Tensor,
    v_uncond_text: torch.Tensor | None = None,
    text_scale: float = 1.0,
    v_uncond_image: torch.Tensor | None = None,
    image_scale: float = 1.0,
) -> torch.Tensor:
    """BAGEL's guidance order: ``v' = v_ut + s_t·(v_c − v_ut)``, then ``v'' = v_ui + s_i·(v' − v_ui)``."""
    v = v_cond
    if v_uncond_text is not None and text_scale != 1.0:
        v = v_uncond_text + text_scale * (v - v_uncond_text)
    if v_uncond_image is not None and image_scale != 1.0:
        v = v_uncond_image + image_scale * (v - v_uncond_image)
    return v
