"""GPU benchmark for a lent CUDA device: every kernel, a patching sweep and a knockout sweep, in < 5 minutes.

    python experiments/bench/gpu.py                    # on a machine with a CUDA device
    python experiments/bench/gpu.py --sizes small      # a quicker pass
    TRITON_INTERPRET=1 python experiments/bench/gpu.py --smoke   # CPU dry run of every stage (the tests)

1. **Kernels** (:mod:`uniprobe.probes.kernels`): ``attribution_scores``, ``head_attribution_scores`` and
   ``scatter_rows``, each with the Triton kernel and the torch reference on the same tensors:
   median time, achieved bandwidth (bytes the op must read and write / time, in GB/s), the speed-up of
   Triton over torch and the max abs difference.
2. **Patching sweeps** on the 12-layer d512 Llama of ``experiments/bench/patching.py`` (seeded, float32):
   the batched exact sweep (``resid_pre``, ``attn_out``, ``mlp_out`` × every layer × every position) with
   the Triton scatter vs the torch one, against the one-forward-per-site reference loop on a slice of the
   grid (its time scaled to the whole grid); head-level sites (every layer × head) when
   ``uniprobe.probes.attention.head_sites`` exists; attribution patching with both kernels.
3. **Knockout sweep**: ``experiments/bench/knockout.py``'s ``run`` when that file exists (else a note).

Without a CUDA device it prints why and exits 0 having measured nothing (``--smoke`` runs every stage
on CPU at toy sizes to prove the script works; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from uniprobe.probes import kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = {  # kernels: (rows, d) for attribution, (rows, heads, d_head), scatter (batch, pos, d, m); sweep seq
    "full": {"attr": (65536, 4096), "head": (65536, 32, 128), "scatter": (64, 1024, 4096, 16384), "seq": 48},
    "small": {"attr": (8192, 2048), "head": (8192, 16, 128), "scatter": (16, 512, 2048, 2048), "seq": 24},
    "smoke": {"attr": (64, 48), "head": (32, 4, 16), "scatter": (4, 8, 16, 6), "seq": 6},
}


def load_script(name: str) -> ModuleType | None:
    """``experiments/bench/{name}.py`` as a module (the bench scripts are not an installed package)."""
    path = HERE / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (device synchronised)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def kernel_row(
    name: str, bytes_moved: int, run: Callable[[str], torch.Tensor], device: str, repeats: int
) -> dict:
    """Time one kernel under both backends; print its line; return the figures."""
    want, got = run("torch"), run("triton")
    diff = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    t_torch = timed(lambda: run("torch"), device, repeats)
    t_triton = timed(lambda: run("triton"), device, repeats)
    row = {
        "kernel": name,
        "triton_s": t_triton,
        "torch_s": t_torch,
        "triton_GBps": bytes_moved / t_triton / 1e9,
        "torch_GBps": bytes_moved / t_torch / 1e9,
        "speedup": t_torch / t_triton,
        "max_abs_diff": diff,
    }
    print(
        f"  {name:28} triton {t_triton * 1e3:8.3f} ms {row['triton_GBps']:8.1f} GB/s | torch "
        f"{t_torch * 1e3:8.3f} ms {row['torch_GBps']:8.1f} GB/s | speed-up {row['speedup']:5.2f}x | "
        f"max diff {diff:.1e}"
    )
    return row


def bench_kernels(device: str, sizes: dict, repeats: int) -> list[dict]:
    """Stage 1: the three kernels, Triton vs torch, on float32 and bfloat16 tensors."""
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    print(f"\n== kernels (median of {repeats}; bandwidth = bytes read + written / time)")
    dtypes = (torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        size = torch.finfo(dtype).bits // 8
        n, d = sizes["attr"]
        c, r, gr = (torch.randn(n, d, generator=g).to(device, dtype) for _ in range(3))
        rows.append(
            kernel_row(
                f"attribution [{n}, {d}] {str(dtype)[6:]}",
                3 * n * d * size + n * 4,
                lambda f, c=c, r=r, gr=gr: kernels.attribution_scores(c, r, gr, force=f),
                device,
                repeats,
            )
        )
        n, h, dh = sizes["head"]
        c, r, gr = (torch.randn(n, h, dh, generator=g).to(device, dtype) for _ in range(3))
        rows.append(
            kernel_row(
                f"head attribution [{n}, {h}, {dh}] {str(dtype)[6:]}",
                3 * n * h * dh * size + n * h * 4,
                lambda f, c=c, r=r, gr=gr: kernels.head_attribution_scores(c, r, gr, force=f),
                device,
                repeats,
            )
        )
        b, p, dd, m = sizes["scatter"]
        dest = torch.randn(b, p, dd, generator=g).to(device, dtype)
        values = torch.randn(m, dd, generator=g).to(device, dtype)
        flat = torch.randperm(b * p, generator=g)[:m]
        ri, pi = (flat // p).to(device), (flat % p).to(device)
        rows.append(
            kernel_row(
                f"scatter [{b}, {p}, {dd}] <- {m} {str(dtype)[6:]}",
                2 * m * dd * size + 2 * m * 8,
                lambda f, dest=dest, values=values, ri=ri, pi=pi: kernels.scatter_rows(
                    dest, values, ri, pi, force=f
                ),
                device,
                repeats,
            )
        )
    return rows


def bench_patching(device: str, sizes: dict, layers: int, d_model: int, repeats: int) -> dict:
    """Stage 2: batched exact sweeps (Triton vs torch scatter) vs the per-site loop; attribution."""
    from uniprobe.hooks.adapters import adapter_for
    from uniprobe.probes.patching import LogitDiff, attribution_patch, grid_sites, logits_of, patch_sweep
    from uniprobe.probes.patching.engine import run_sites_reference

    patching = load_script("patching")
    model = patching.llama(layers, d_model, 2048).to(device)
    adapter = adapter_for(model)
    clean, corrupted = patching.random_inputs(model, adapter, sizes["seq"])
    for inputs in (clean, corrupted):
        inputs.kwargs.update({k: v.to(device) for k, v in inputs.kwargs.items() if torch.is_tensor(v)})
    with torch.no_grad():
        lc = logits_of(adapter.run(model, clean))[0, -1]
    target, foil = (int(i) for i in lc.topk(2).indices)
    metric = LogitDiff(target, foil)
    grid = grid_sites(layers, sizes["seq"], ("resid_pre", "attn_out", "mlp_out"))
    out: dict[str, Any] = {"sites": len(grid)}
    print(f"\n== patching: Llama {layers} layers, d_model {d_model}, {sizes['seq']} tokens on {device}")
    runs: dict[str, Any] = {}
    for force in ("triton", "torch"):

        def sweep(f: str = force) -> None:
            runs[f] = patch_sweep(model, clean, corrupted, grid, metric, force=f)

        t = out[f"exact_{force}_s"] = timed(sweep, device, repeats)
        chunks = runs[force].info["chunks"]
        print(f"  exact sweep, {len(grid)} sites, {force} scatter: {t:.3f} s ({chunks} chunks)")
    diff = float((runs["triton"].values - runs["torch"].values).abs().max())
    # the definition, one forward per site: timed on a slice, scaled to the whole grid
    part = grid.sites[:: max(1, len(grid) // 24)]
    src = {p: v for p, v in _states(model, adapter, clean, [s.point for s in part]).items()}
    t0 = time.perf_counter()
    run_sites_reference(model, adapter, corrupted, part, src, metric)
    sync(device)
    loop = (time.perf_counter() - t0) * len(grid) / len(part)
    out.update(
        {
            "reference_loop_s": loop,
            "exact_vs_loop": loop / out["exact_triton_s"],
            "triton_vs_torch_diff": diff,
        }
    )
    print(
        f"  one forward per site (timed on {len(part)} sites, scaled): {loop:.3f} s -> batched "
        f"{out['exact_vs_loop']:.1f}x faster; triton vs torch scatter max diff {diff:.1e}"
    )
    heads = _head_sweep(model, adapter, clean, corrupted, metric, device, repeats)
    if heads:
        out.update(heads)
    for force in ("triton", "torch"):
        t = timed(
            lambda f=force: attribution_patch(model, clean, corrupted, grid, metric, force=f), device, repeats
        )
        out[f"attribution_{force}_s"] = t
        print(f"  attribution patching, {force} kernel: {t:.3f} s")
    return out


def _states(model: Any, adapter: Any, inputs: Any, points: list[str]) -> dict[str, torch.Tensor]:
    from uniprobe.probes.patching import collect_states

    return collect_states(model, adapter, inputs, points)[1]


def _head_sweep(
    model: Any, adapter: Any, clean: Any, corrupted: Any, metric: Any, device: str, repeats: int
) -> dict:
    """Head sites (every layer × head, all positions) exact and attribution, when the library has them."""
    try:
        from uniprobe.probes.attention import head_sites
    except ImportError:
        print("  head-level sweep: skipped (uniprobe.probes.attention.head_sites is not in this version)")
        return {}
    from uniprobe.probes.patching import attribution_patch, patch_sweep

    grid = head_sites(model, clean, adapter=adapter)
    t_exact = timed(lambda: patch_sweep(model, clean, corrupted, grid, metric), device, repeats)
    t_attr = timed(lambda: attribution_patch(model, clean, corrupted, grid, metric), device, repeats)
    print(f"  head sweep, {len(grid)} sites: exact {t_exact:.3f} s, attribution {t_attr:.3f} s")
    return {"head_sites": len(grid), "head_exact_s": t_exact, "head_attribution_s": t_attr}


def bench_knockout(device: str, smoke: bool, repeats: int = 1) -> dict | None:
    """Stage 3: ``experiments/bench/knockout.py``'s ``run`` when present (its own printout)."""
    knockout = load_script("knockout")
    if knockout is None or not hasattr(knockout, "run"):
        print("\n== knockout: skipped (experiments/bench/knockout.py with a run() is not in this checkout)")
        return None
    print("\n== knockout (experiments/bench/knockout.py)")
    params = inspect.signature(knockout.run).parameters
    kwargs: dict[str, Any] = {}
    kwargs.update({k: v for k, v in {"device": device, "repeats": repeats}.items() if k in params})
    if smoke:  # toy sizes where the bench takes them
        kwargs.update({k: v for k, v in {"layers": 2, "d_model": 64, "seq": 8}.items() if k in params})
    return knockout.run(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=("full", "small"), default="full")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU dry run at toy sizes (needs TRITON_INTERPRET=1); no figures"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1 before starting",
                file=sys.stderr,
            )
            return 2
        device, sizes, layers, d_model, repeats = "cpu", SIZES["smoke"], 2, 64, 1
    else:
        if not torch.cuda.is_available():
            print(
                "experiments/bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                "nothing measured. Run it on a machine with an NVIDIA GPU and triton installed."
            )
            return 0
        if not kernels.triton_available():
            print("experiments/bench/gpu.py: triton is not importable; install it (pip install triton)")
            return 0
        device, sizes, layers, d_model, repeats = (
            "cuda",
            SIZES[args.sizes],
            args.layers,
            args.d_model,
            args.repeats,
        )
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    results = {"kernels": bench_kernels(device, sizes, repeats)}
    results["patching"] = bench_patching(device, sizes, layers, d_model, repeats)
    results["knockout"] = bench_knockout(device, args.smoke, repeats)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
