"""Benchmark: an attention-knockout sweep (every layer × 4 key groups) — uniprobe's batched sweep vs a loop
of one forward per configuration with hooks (the nnsight / TransformerLens way).

    .venv/bin/python experiments/bench/knockout.py [--layers 12 --d-model 512 --seq 24 --drawn N]
                                                  [--repeats 3] [--threads 1]

The model is the 12-layer, d_model 512 Llama of ``experiments/bench/patching.py`` (random seeded weights,
float32, one torch thread by default). The prompt has a layout standing in for a unified model's drawing
prompt: ``text`` (the question), ``cot`` (its answer), then ``--drawn`` ``image_gen`` positions; the drawn
positions are the queries, and the 4 key groups are ``bos`` (position 0), ``question`` (text), ``cot``
and ``drawn`` (earlier image positions). The metric is the logit difference of the clean top-1 and
top-2 tokens at the last position.

- uniprobe: :func:`uniprobe.probes.attention.knockout.knockout_sweep` (clean run, the full-knockout
  baseline and every configuration, batched and resumed from each configuration's first layer and
  first query position);
- the loop: :func:`uniprobe.probes.attention.knockout.knockout_reference` — per configuration one plain
  forward whose knocked layer's attention gets the explicit 4-D mask from a forward pre-hook (what an
  nnsight or TransformerLens user writes), plus the clean forward.

Prints both times (median of ``--repeats``), the speed-up (goal ≥ 10×) and the largest difference of the
grids. ``run(...)`` returns the same numbers as a dict (``experiments/bench/attention.py`` calls it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.attention.knockout import knockout_grid, knockout_reference, knockout_sweep
from uniprobe.probes.patching import LogitDiff, logits_of

TARGET_SPEEDUP = 10.0
TARGET_DIFF = 1e-4
GROUPS = {"bos": [0], "question": ["text"], "cot": ["cot"], "drawn": ["image_gen"]}


def _patching_bench() -> Any:
    """The patching benchmark's module (its model builder), loaded by path: benches are scripts."""
    spec = importlib.util.spec_from_file_location("bench_patching", Path(__file__).with_name("patching.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drawing_prompt(model: torch.nn.Module, seq: int, drawn: int, seed: int = 1) -> Any:
    """Inputs of ``seq`` random tokens with roles text | cot (a quarter of the rest) | ``drawn`` image_gen."""
    adapter = adapter_for(model)
    if not 4 <= drawn + 3 <= seq:
        raise ValueError(f"--drawn {drawn} leaves no room for a question and its answer in --seq {seq}")
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, int(model.config.vocab_size), (seq - 1,), generator=g).tolist()
    inputs = adapter.prepare(model, [{"input_ids": ids}])
    n_cot = max(1, (seq - drawn) // 4)
    roles = ["text"] * (seq - drawn - n_cot) + ["cot"] * n_cot + ["image_gen"] * drawn
    inputs.layout = TokenLayout.from_names([roles], tail_role="image_gen")
    return inputs


def run(
    model: torch.nn.Module | None = None,
    *,
    layers: int = 12,
    d_model: int = 512,
    seq: int = 24,
    drawn: int | None = None,
    repeats: int = 3,
    device: str = "cpu",
    say: Any = print,
) -> dict[str, Any]:
    """Time the batched knockout sweep against the per-configuration loop; returns the numbers.

    ``drawn``: image positions at the end of the prompt (default a third of ``seq``).
    """
    if model is None:
        model = _patching_bench().llama(layers, d_model, 256)
    model = model.to(device)
    adapter = adapter_for(model)
    drawn = max(1, seq // 3) if drawn is None else drawn
    inputs = drawing_prompt(model, seq, drawn)
    inputs.kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()}
    with torch.no_grad():
        top = logits_of(adapter.run(model, inputs))[0, -1].topk(2).indices.tolist()
    metric = LogitDiff(top[0], top[1])
    kos, grid = knockout_grid(model, GROUPS, query=["image_gen"], adapter=adapter)
    ours, loop, res, ref = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = knockout_sweep(model, inputs, (kos, grid), metric, adapter=adapter)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            clean = float(metric(adapter.run(model, inputs)).mean())  # the loop's clean run
        ref = knockout_reference(model, inputs, kos, metric, adapter=adapter)
        loop.append(time.perf_counter() - t0)
    assert res is not None and ref is not None
    t_ours, t_loop = statistics.median(ours), statistics.median(loop)
    diff = float((res.values - ref).abs().max())
    out = {
        "configurations": len(kos),
        "layers": len(grid.layers),
        "groups": list(GROUPS),
        "seq": seq,
        "drawn": drawn,
        "seconds": t_ours,
        "loop_seconds": t_loop,
        "speedup": t_loop / t_ours,
        "diff": diff,
        "clean_diff": abs(res.clean - clean),
        "info": {k: res.info[k] for k in ("strategy", "suffix", "chunks", "rows")},
    }
    say(
        f"knockout sweep, {len(kos)} configurations ({len(grid.layers)} layers × {len(GROUPS)} key groups), "
        f"{seq} tokens ({drawn} drawn), threads {torch.get_num_threads()}, load {_load()}"
    )
    say(f"  uniprobe batched sweep  {t_ours:8.3f} s   {out['info']}")
    say(f"  loop, forward + hooks   {t_loop:8.3f} s")
    say(
        f"  speed-up {out['speedup']:.1f}× (goal ≥ {TARGET_SPEEDUP:.0f}×), grids differ by at most "
        f"{diff:.2e} (goal ≤ {TARGET_DIFF:.0e})"
    )
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--drawn", type=int, help="image positions at the end (default: a third of --seq)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(layers=args.layers, d_model=args.d_model, seq=args.seq, drawn=args.drawn, repeats=args.repeats)
    return 0 if res["diff"] <= TARGET_DIFF else 1


if __name__ == "__main__":
    sys.exit(main())
