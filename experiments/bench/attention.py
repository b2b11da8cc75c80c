"""Benchmark: head-level patching (every layer × head, all positions and each position) against
TransformerLens on the same weights, then the knockout sweep of ``experiments/bench/knockout.py``.

    .venv/bin/python experiments/bench/attention.py [--layers 12 --d-model 512 --seq 24] [--repeats 1]

One process, one torch thread (``--threads``), float32, the seeded Llama of ``experiments/bench/patching.py``
(12 layers, d_model 512, 8 heads, 24 tokens by default), the logit difference of the clean and corrupted
top tokens at the last position:

- uniprobe: :func:`uniprobe.probes.patching.patch_sweep` over :func:`uniprobe.probes.attention.head_sites`
  (batched, resumed from each site's layer and position), its clean run included;
- TransformerLens: ``patching.get_act_patch_attn_head_out_all_pos`` / ``..._by_pos`` on a
  ``TransformerBridge`` of the same model (the clean ``run_with_cache`` included), one forward per site.

Prints each time, the speed-up and the max abs difference of the grids (target: ≥ 10× and ≤ 1e-4);
then calls ``experiments/bench/knockout.py``'s ``run`` when that file exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's sweep draws a progress bar per call

import torch  # noqa: E402
from uniprobe.hooks.adapters import adapter_for  # noqa: E402
from uniprobe.hooks.backends.tl_backend import bridge_for  # noqa: E402
from uniprobe.probes.attention import head_grid, head_sites  # noqa: E402
from uniprobe.probes.patching import LogitDiff, logits_of, patch_sweep  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_SPEEDUP = 10.0
TARGET_DIFF = 1e-4


def load_script(name: str) -> Any:
    """``experiments/bench/{name}.py`` as a module, or None (the benches are scripts, not a package)."""
    path = HERE / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heads_vs_transformer_lens(
    layers: int, d_model: int, seq: int, repeats: int = 1, vocab: int = 2048
) -> dict[str, Any]:
    """Time both head sweeps (all positions, by position) with uniprobe and TransformerLens; print them."""
    patching = load_script("patching")
    model = patching.llama(layers, d_model, vocab)
    adapter = adapter_for(model)
    clean, corrupted = patching.random_inputs(model, adapter, seq)
    with torch.no_grad():
        lc = logits_of(adapter.run(model, clean))[0, -1]
        lr = logits_of(adapter.run(model, corrupted))[0, -1]
    target = int(lc.argmax())
    foil = int(lr.argmax()) if int(lr.argmax()) != target else int(lc.topk(2).indices[1])
    metric = LogitDiff(target, foil)
    grids = {"all_pos": head_sites(model, clean), "by_pos": head_sites(model, clean, by_position=True)}
    patch_sweep(model, clean, corrupted, head_sites(model, clean, layers=[0], heads=[0]), metric)  # warm-up
    ours: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {
        k: [] for k in ("ours_all_pos", "ours_by_pos", "tl_all_pos", "tl_by_pos")
    }
    info: dict[str, Any] = {}
    for _ in range(repeats):
        for name, grid in grids.items():
            t0 = time.perf_counter()
            res = patch_sweep(model, clean, corrupted, grid, metric)
            times[f"ours_{name}"].append(time.perf_counter() - t0)
            ours[name] = head_grid(res.values, grid)  # [layer, head, column]
            info[name] = res.info
    from transformer_lens import patching as tl_patching

    bridge = bridge_for(model, adapter).eval()  # after our runs: booting wraps the model's modules
    ids_c, ids_r = clean.kwargs["input_ids"], corrupted.kwargs["input_ids"]

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, target] - logits[0, -1, foil]

    theirs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        _, short = bridge.run_with_cache(ids_c[:, :2])  # warm-up: a sweep over 2 tokens
        tl_patching.get_act_patch_attn_head_out_all_pos(bridge, ids_r[:, :2], short, tl_metric)
        for _ in range(repeats):
            for name, fn in (
                ("all_pos", tl_patching.get_act_patch_attn_head_out_all_pos),
                ("by_pos", tl_patching.get_act_patch_attn_head_out_by_pos),
            ):
                t0 = time.perf_counter()
                _, cache = bridge.run_with_cache(ids_c)
                theirs[name] = fn(bridge, ids_r, cache, tl_metric)
                times[f"tl_{name}"].append(time.perf_counter() - t0)
    theirs["all_pos"] = theirs["all_pos"][..., None]  # [layer, head] -> [layer, head, 1]
    theirs["by_pos"] = theirs["by_pos"].permute(0, 2, 1)  # [layer, pos, head] -> [layer, head, pos]
    n_heads = len(grids["all_pos"].meta["heads"])
    print(f"\n== head patching: Llama {layers} layers, d_model {d_model}, {n_heads} heads, {seq} tokens")
    out: dict[str, Any] = {"layers": layers, "d_model": d_model, "seq": seq, "heads": n_heads}
    ok_all = True
    for name, grid in grids.items():
        t_ours = statistics.median(times[f"ours_{name}"])
        t_tl = statistics.median(times[f"tl_{name}"])
        diff = float((ours[name] - theirs[name].detach().float()).abs().max())
        ratio = t_tl / t_ours
        fast, same = ratio >= TARGET_SPEEDUP, diff <= TARGET_DIFF
        ok_all &= fast and same
        i = info[name]
        print(
            f"  {name}: {len(grid)} sites; uniprobe {t_ours:.3f} s ({i['chunks']} chunks, suffix "
            f"{i['suffix']}, work {i['work_fraction']:.3f} of a forward per site) | TransformerLens "
            f"get_act_patch_attn_head_out_{name} {t_tl:.3f} s"
        )
        print(
            f"    speed-up {ratio:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {'met' if fast else 'MISSED'}); "
            f"max |grid diff| {diff:.2e} (target <= {TARGET_DIFF:.0e}: {'met' if same else 'MISSED'})"
        )
        out[name] = {
            "sites": len(grid),
            "ours": t_ours,
            "transformer_lens": t_tl,
            "ratio": ratio,
            "diff": diff,
        }
    out["targets_met"] = ok_all
    return out


def knockout_bench(**sizes: Any) -> Any:
    """``experiments/bench/knockout.py``'s ``run`` with the sizes it takes, or a printed note."""
    knockout = load_script("knockout")
    if knockout is None or not hasattr(knockout, "run"):
        print("\n== knockout: skipped (experiments/bench/knockout.py with a run() is not in this checkout)")
        return None
    params = inspect.signature(knockout.run).parameters
    return knockout.run(**{k: v for k, v in sizes.items() if k in params})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool (medians are printed)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--skip-knockout", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    heads_vs_transformer_lens(args.layers, args.d_model, args.seq, args.repeats)
    if not args.skip_knockout:
        knockout_bench(layers=args.layers, d_model=args.d_model, seq=args.seq, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
