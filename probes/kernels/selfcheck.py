"""Check the Triton kernels against the torch reference on this machine; print one JSON report.

    python -m uniprobe.probes.kernels.selfcheck                       # CUDA tensors when available
    TRITON_INTERPRET=1 python -m uniprobe.probes.kernels.selfcheck    # CPU, through Triton's interpreter

``TRITON_INTERPRET`` must be set before triton is first imported in the process (triton builds its
standard library as compiled or interpreted functions at import), which is why the tests run this
in a fresh process. ``--patching`` adds an exact patching sweep of a tiny Llama with the Triton
scatter against the torch one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from uniprobe.probes import kernels
from uniprobe.probes.kernels import reference

ATTRIBUTION_SHAPES: tuple[tuple[int, ...], ...] = ((3, 5, 7), (2, 1, 17), (4, 33, 130), (2, 3, 2, 300))
HEAD_SHAPES: tuple[tuple[int, ...], ...] = ((2, 5, 4, 8), (1, 3, 7, 130), (3, 9, 2, 64))
SCATTER_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (4, 9, 37, 11),
    (1, 3, 5, 3),
    (7, 20, 200, 40),
    (3, 4, 8, 0),
)


def _scatter_case(seed: int, b: int, pos: int, d: int, m: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(b * pos, generator=g)[:m]  # distinct (row, position) pairs
    tensors = (torch.randn(b, pos, d, generator=g), torch.randn(m, d, generator=g), flat // pos, flat % pos)
    return tuple(t.to(device) for t in tensors)


def _attribution(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> float:
    g = torch.Generator().manual_seed(sum(shape))
    c, r, gr = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    got = kernels.attribution_scores(c, r, gr, force="triton")
    want = reference.attribution_scores(c, r, gr)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    return float((got - want).abs().max()) if got.numel() else 0.0


def _head_attribution(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, strided: bool = False
) -> float:
    g = torch.Generator().manual_seed(sum(shape) + 7)
    c, r, gr = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    if strided:  # a head view of a wider buffer (row and head strides ≠ h·d, d): read in place
        c, r, gr = (torch.cat([t, t], dim=-1)[..., : shape[-1]] for t in (c, r, gr))
    got = kernels.head_attribution_scores(c, r, gr, force="triton")
    want = reference.head_attribution_scores(c, r, gr)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    return float((got - want).abs().max()) if got.numel() else 0.0


def _scatter(case: tuple[int, int, int, int], device: str, strided: bool = False) -> float:
    dest, values, rows, positions = _scatter_case(sum(case), *case, device=device)
    want = reference.scatter_rows(dest.clone(), values, rows, positions)
    got = dest.transpose(0, 1).contiguous().transpose(0, 1) if strided else dest.clone()
    out = kernels.scatter_rows(got, values, rows, positions, force="triton")
    assert out is got, "scatter_rows must work in place"
    return float((got - want).abs().max())


def _patching() -> float:
    from transformers import LlamaConfig, LlamaForCausalLM
    from uniprobe.hooks.adapters import adapter_for
    from uniprobe.probes.patching import LogitDiff, grid_sites, patch_sweep

    # built here rather than by uniprobe.experiments.tiny.tiny_llama: probes never import experiments
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7]}])
    sites = grid_sites(2, 4, ("resid_pre", "attn_out"))
    runs = [
        patch_sweep(model, clean, corrupted, sites, LogitDiff(11, 12), force=f) for f in ("torch", "triton")
    ]
    return float((runs[0].values - runs[1].values).abs().max())


def run(device: str, patching: bool = False) -> dict[str, Any]:
    """All checks → ``{"checks": [{"name", "max_abs_diff", "tolerance", "ok"}], "ok": bool}``."""
    checks: list[tuple[str, Callable[[], float], float]] = []
    for shape in ATTRIBUTION_SHAPES:
        checks.append(
            (f"attribution {shape} float32", lambda s=shape: _attribution(s, torch.float32, device), 1e-4)
        )
    checks.append(
        ("attribution (6, 9, 64) float16", lambda: _attribution((6, 9, 64), torch.float16, device), 1e-3)
    )
    for shape in HEAD_SHAPES:
        checks.append(
            (
                f"head attribution {shape} float32",
                lambda s=shape: _head_attribution(s, torch.float32, device),
                1e-4,
            )
        )
    checks.append(
        (
            "head attribution (2, 6, 4, 16) strided heads",
            lambda: _head_attribution((2, 6, 4, 16), torch.float32, device, strided=True),
            1e-4,
        )
    )
    checks.append(
        (
            "head attribution (2, 5, 3, 32) float16",
            lambda: _head_attribution((2, 5, 3, 32), torch.float16, device),
            1e-3,
        )
    )
    for case in SCATTER_SHAPES:
        checks.append((f"scatter {case}", lambda c=case: _scatter(c, device), 0.0))
    checks.append(("scatter (3, 6, 10, 7) strided dest", lambda: _scatter((3, 6, 10, 7), device, True), 0.0))
    if patching:
        checks.append(("patch_sweep triton vs torch scatter", _patching, 1e-6))
    report = []
    for name, fn, tol in checks:
        try:
            diff, error = fn(), None
        except Exception as err:  # a report, not a crash: name the failing check
            diff, error = float("inf"), f"{type(err).__name__}: {err}"
        report.append(
            {"name": name, "max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol, "error": error}
        )
    return {
        "device": device,
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "checks": report,
        "ok": all(c["ok"] for c in report),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patching", action="store_true", help="also compare a whole patching sweep")
    args = parser.parse_args(argv)
    if not kernels.triton_available():
        print(json.dumps({"ok": False, "error": "triton is not importable"}))
        return 1
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print(json.dumps({"ok": False, "error": "no CUDA device: set TRITON_INTERPRET=1 to run on CPU"}))
        return 1
    report = run(device, args.patching)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
