"""uniprobe.probes.kernels: the hot reductions of patching, Triton on a CUDA device, torch elsewhere.

    from uniprobe.probes.kernels import attribution_scores, scatter_rows
    scores = attribution_scores(clean, corrupted, grad)      # [*lead, d] x3 -> [*lead]
    heads = head_attribution_scores(clean, corrupted, grad)  # [*lead, h, d_head] x3 -> [*lead, h]
    scatter_rows(stream, values, rows, positions)            # stream[rows, positions] = values

One dispatcher (:func:`backend_for`): ``force=None`` picks Triton when every tensor is on a
CUDA device and ``triton`` imports, else the torch reference (:mod:`uniprobe.probes.kernels.reference`);
``force="torch"`` / ``force="triton"`` choose explicitly (``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported — the tests do this).
Triton is imported lazily, so a machine without it never notices. ``python -m
uniprobe.probes.kernels.selfcheck`` compares the Triton kernels with the reference on this machine.
"""

from __future__ import annotations

from types import ModuleType

import torch
from uniprobe.probes.kernels import reference

BACKENDS: tuple[str, ...] = ("torch", "triton")


def _triton_kernels() -> ModuleType:
    """The Triton kernel module; ImportError when triton is absent."""
    import triton  # noqa: F401 — the import statement is the availability check
    from uniprobe.probes.kernels import triton_kernels

    return triton_kernels


def triton_available() -> bool:
    """Whether ``triton`` (and so the Triton kernels) import on this machine."""
    try:
        _triton_kernels()
    except ImportError:
        return False
    return True


def backend_for(*tensors: torch.Tensor, force: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for these tensors (see the module docstring)."""
    if force is not None:
        if force not in BACKENDS:
            raise ValueError(f"unknown kernel backend {force!r}; choose one of {', '.join(BACKENDS)} or None")
        if force == "triton" and not triton_available():
            raise RuntimeError(
                "force='triton' but triton is not importable here; install triton or use force=None/'torch'"
            )
        return force
    if tensors and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "torch"


def attribution_scores(
    clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor, *, force: str | None = None
) -> torch.Tensor:
    """``einsum("...d,...d->...", clean − corrupted, grad)`` in float32.

    Shapes: ``[*lead, d]`` ×3 → ``[*lead]``, e.g. ``[layer, pos, d] → [layer, pos]``.
    """
    if backend_for(clean, corrupted, grad, force=force) == "triton":
        reference._check_same_shape(clean, corrupted, grad)
        return _triton_kernels().attribution_scores(clean, corrupted, grad)
    return reference.attribution_scores(clean, corrupted, grad)


def head_attribution_scores(
    clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor, *, force: str | None = None
) -> torch.Tensor:
    """``einsum("...hd,...hd->...h", clean − corrupted, grad)`` in float32: per-head attribution.

    Shapes: ``[*lead, heads, d_head]`` ×3 → ``[*lead, heads]``, e.g. ``[batch, pos, h, d] → [batch, pos, h]``.
    The Triton kernel reads strided head views (e.g. ``z.view(b, p, h, d)`` of a larger buffer) in place.
    """
    if backend_for(clean, corrupted, grad, force=force) == "triton":
        reference._check_heads(clean, corrupted, grad)
        return _triton_kernels().head_attribution_scores(clean, corrupted, grad)
    return reference.head_attribution_scores(clean, corrupted, grad)


def scatter_rows(
    dest: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    *,
    force: str | None = None,
) -> torch.Tensor:
    """In place ``dest[rows[i], positions[i]] = values[i]``: ``dest [b, pos, d]``, ``values [m, d]``."""
    if backend_for(dest, values, force=force) == "triton":
        reference._check_scatter(dest, values, rows, positions)
        return _triton_kernels().scatter_rows(dest, values, rows, positions)
    return reference.scatter_rows(dest, values, rows, positions)


__all__ = [
    "BACKENDS",
    "attribution_scores",
    "backend_for",
    "head_attribution_scores",
    "scatter_rows",
    "triton_available",
]
