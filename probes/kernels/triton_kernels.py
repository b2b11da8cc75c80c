"""Triton kernels for patching (imported only when Triton is used).

- ``_attribution_kernel``: each program reduces ``BLOCK_R`` rows of ``[rows, d]`` views of clean,
  corrupted and grad, looping over ``d`` in ``BLOCK_D`` tiles and accumulating
  ``(clean − corrupted) * grad`` in float32 registers — the difference never reaches memory.
- ``_head_attribution_kernel``: a 2-D grid (row blocks × heads); each program reduces ``BLOCK_R`` rows
  of one head over ``d_head``, reading each tensor through its own row and head strides (a head view of
  a wider or permuted buffer is read in place, not copied).
- ``_scatter_kernel``: each program copies ``BLOCK_M`` site rows of ``values [m, d]`` to
  ``dest[rows[i], positions[i], :]`` (any strides of ``dest``), ``BLOCK_D`` features at a time.

On CPU these run only under ``TRITON_INTERPRET=1`` (set before importing triton); that is how the
tests check them against :mod:`uniprobe.probes.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attribution_kernel(
    clean_ptr,
    corrupted_ptr,
    grad_ptr,
    out_ptr,
    n_rows,
    d,
    BLOCK_R: tl.constexpr,  # noqa: N803 — Triton constexpr naming
    BLOCK_D: tl.constexpr,  # noqa: N803
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < d)
        off = rows[:, None].to(tl.int64) * d + cols[None, :]
        c = tl.load(clean_ptr + off, mask=m, other=0.0).to(tl.float32)
        r = tl.load(corrupted_ptr + off, mask=m, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum((c - r) * g, axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@triton.jit
def _head_attribution_kernel(
    clean_ptr,
    corrupted_ptr,
    grad_ptr,
    out_ptr,
    n_rows,
    n_heads,
    d,
    c_sr,
    c_sh,
    r_sr,
    r_sh,
    g_sr,
    g_sh,
    BLOCK_R: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr,  # noqa: N803
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < d)
        c = tl.load(clean_ptr + r64[:, None] * c_sr + head * c_sh + cols[None, :], mask=m, other=0.0)
        r = tl.load(corrupted_ptr + r64[:, None] * r_sr + head * r_sh + cols[None, :], mask=m, other=0.0)
        g = tl.load(grad_ptr + r64[:, None] * g_sr + head * g_sh + cols[None, :], mask=m, other=0.0)
        acc += tl.sum((c.to(tl.float32) - r.to(tl.float32)) * g.to(tl.float32), axis=1)
    tl.store(out_ptr + r64 * n_heads + head, acc, mask=row_ok)


@triton.jit
def _scatter_kernel(
    dest_ptr,
    values_ptr,
    rows_ptr,
    pos_ptr,
    m,
    d,
    stride_b,
    stride_p,
    stride_d,
    BLOCK_M: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr,  # noqa: N803
):
    pid = tl.program_id(0)
    idx = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = idx < m
    r = tl.load(rows_ptr + idx, mask=ok, other=0).to(tl.int64)
    p = tl.load(pos_ptr + idx, mask=ok, other=0).to(tl.int64)
    base = r * stride_b + p * stride_p
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        msk = ok[:, None] & (cols[None, :] < d)
        v = tl.load(values_ptr + idx[:, None].to(tl.int64) * d + cols[None, :], mask=msk, other=0.0)
        tl.store(dest_ptr + base[:, None] + cols[None, :] * stride_d, v, mask=msk)


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(max(d, 16)))


def attribution_scores(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`uniprobe.probes.kernels.reference.attribution_scores`
    → ``[*lead]`` float32."""
    lead, d = clean.shape[:-1], clean.shape[-1]
    c, r, g = (t.contiguous().reshape(-1, d) for t in (clean, corrupted, grad))
    n_rows = c.shape[0]
    out = torch.empty(n_rows, dtype=torch.float32, device=clean.device)
    if n_rows:
        block_r = 16
        _attribution_kernel[(triton.cdiv(n_rows, block_r),)](
            c, r, g, out, n_rows, d, BLOCK_R=block_r, BLOCK_D=_block_d(d)
        )
    return out.reshape(lead)


def _rows_heads(t: torch.Tensor) -> torch.Tensor:
    """``[*lead, h, d] → [rows, h, d]`` with a unit ``d`` stride: a view when the strides allow,
    else a copy (the kernel itself takes any row and head strides)."""
    h, d = t.shape[-2:]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, h, d)
    except RuntimeError:  # leading dims not mergeable into one row stride
        return t.reshape(-1, h, d)


def head_attribution_scores(clean: torch.Tensor, corrupted: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`uniprobe.probes.kernels.reference.head_attribution_scores`
    → ``[*lead, heads]`` float32."""
    lead, (h, d) = clean.shape[:-2], clean.shape[-2:]
    c, r, g = (_rows_heads(t) for t in (clean, corrupted, grad))
    n_rows = c.shape[0]
    out = torch.empty(n_rows, h, dtype=torch.float32, device=clean.device)
    if n_rows and h:
        block_r = 16
        _head_attribution_kernel[(triton.cdiv(n_rows, block_r), h)](
            c, r, g, out, n_rows, h, d, c.stride(0), c.stride(1), r.stride(0), r.stride(1),
            g.stride(0), g.stride(1), BLOCK_R=block_r, BLOCK_D=_block_d(d),
        )  # fmt: skip
    return out.reshape(*lead, h)


def scatter_rows(
    dest: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Triton version of :func:`uniprobe.probes.kernels.reference.scatter_rows` (in place on ``dest``)."""
    m, d = values.shape
    if m == 0:
        return dest
    vals = values.to(dest.dtype).contiguous()
    r = rows.to(device=dest.device, dtype=torch.int64).contiguous()
    p = positions.to(device=dest.device, dtype=torch.int64).contiguous()
    block_m = 16
    _scatter_kernel[(triton.cdiv(m, block_m),)](
        dest, vals, r, p, m, d, *dest.stride(), BLOCK_M=block_m, BLOCK_D=_block_d(d)
    )
    return dest
