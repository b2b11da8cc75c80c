"""Torch reference implementations of the patching kernels (CPU, and any device without Triton).

Both functions define the semantics the Triton kernels must match:

- :func:`attribution_scores`: ``einsum("...d,...d->...", clean - corrupted, grad)`` accumulated in
  float32; leading dims are anything (``[layer, pos]``, ``[layer, batch, pos]``, ...).
- :func:`head_attribution_scores`: ``einsum("...hd,...hd->...h", clean - corrupted, grad)`` in float32:
  the per-head score of head-level attribution patching (``[*lead, heads, d_head] → [*lead, heads]``).
- :func:`scatter_rows`: ``dest[rows[i], positions[i], :] = values[i, :]`` in place; the
  ``(row, position)`` pairs must be distinct (a later duplicate would win in torch, but the
  Triton kernel gives no order guarantee).
"""

from __future__ import annotations

import torch
from einops import einsum


def attribution_scores(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(clean − corrupted) · grad`` reduced over the last dim.

    Args:
        clean, corrupted, grad: ``[*lead, d]`` (same shape).
    Returns:
        ``[*lead]`` float32.
    """
    _check_same_shape(clean, corrupted, grad)
    diff = clean.float() - corrupted.float()
    return einsum(diff, grad.float(), "... d, ... d -> ...")


def head_attribution_scores(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(clean − corrupted) · grad`` reduced over ``d_head``, one score per head.

    Args:
        clean, corrupted, grad: ``[*lead, heads, d_head]`` (same shape; any strides).
    Returns:
        ``[*lead, heads]`` float32.
    """
    _check_heads(clean, corrupted, grad)
    diff = clean.float() - corrupted.float()
    return einsum(diff, grad.float(), "... h d, ... h d -> ... h")


def scatter_rows(
    dest: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Write site rows into a batched stream, in place.

    Args:
        dest: ``[batch, pos, d]`` the batched stream (modified and returned).
        values: ``[m, d]`` the rows to write.
        rows, positions: ``[m]`` int64 — batch row and position of each value.
    Returns:
        ``dest``.
    """
    _check_scatter(dest, values, rows, positions)
    dest.index_put_((rows.to(dest.device), positions.to(dest.device)), values.to(dest.dtype))
    return dest


def _check_same_shape(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"attribution_scores needs clean, corrupted and grad of one shape, got {shapes}")
    if tensors[0].dim() < 1:
        raise ValueError("attribution_scores needs tensors with a feature dim [..., d]")


def _check_heads(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(
            f"head_attribution_scores needs clean, corrupted and grad of one shape, got {shapes}"
        )
    if tensors[0].dim() < 2:
        raise ValueError(
            "head_attribution_scores needs tensors [..., heads, d_head]; split the heads first "
            f"(uniprobe.hooks.attention.split_heads), got shape {tuple(tensors[0].shape)}"
        )


def _check_scatter(
    dest: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> None:
    if dest.dim() != 3:
        raise ValueError(f"scatter_rows: dest must be [batch, pos, d], got shape {tuple(dest.shape)}")
    m = values.shape[0]
    if values.dim() != 2 or values.shape[1] != dest.shape[2]:
        raise ValueError(
            f"scatter_rows: values must be [m, {dest.shape[2]}] to fit dest {tuple(dest.shape)}, "
            f"got {tuple(values.shape)}"
        )
    if rows.shape != (m,) or positions.shape != (m,):
        raise ValueError(
            f"scatter_rows: rows and positions must be [{m}], "
            f"got {tuple(rows.shape)} and {tuple(positions.shape)}"
        )
    if m and (int(rows.min()) < 0 or int(rows.max()) >= dest.shape[0]):
        raise IndexError(f"scatter_rows: row index out of range 0..{dest.shape[0] - 1}")
    if m and (int(positions.min()) < 0 or int(positions.max()) >= dest.shape[1]):
        raise IndexError(f"scatter_rows: position out of range 0..{dest.shape[1] - 1}")
