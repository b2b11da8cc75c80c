"""``uniprobe sweep CONFIG.yaml``: models × tasks × analyses from one YAML file (registered by the CLI).

    uniprobe sweep CONFIG.yaml [--out DIR] [--set KEY=VALUE ...] [--plan] [--restart] [--fail-fast]
                               [--allow-module-loaders]
    torchrun --nproc-per-node N -m uniprobe sweep CONFIG.yaml      # N ranks, one merged result

Exit status: 0 when every run is done, 1 when some run failed (it is in the index with its error;
--fail-fast stops there),
2 on a bad config (or prompts file), or a sweep directory made with another config or not by uniprobe,
with a one-line ``uniprobe sweep: error: ...`` message and nothing written.

``--restart`` deletes only what the sweep wrote (the run folders its ``sweep.json`` lists, the index,
``sweep.json``), and only in a directory whose ``sweep.json`` uniprobe wrote; else it refuses.
A model's ``loader`` runs code: ``FILE.py:function`` by default; ``package.module:function`` only
with ``--allow-module-loaders`` (a flag, so a YAML file alone cannot make the sweep import modules).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``uniprobe sweep``."""
    p = subparsers.add_parser(
        "sweep", help="models × tasks × analyses from one YAML file; resumable; shards with torchrun"
    )
    p.add_argument("config", help="sweep YAML file (examples: experiments/configs/)")
    p.add_argument("--out", help="sweep directory (default: the config's 'out', else artifacts/sweeps/NAME)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set models[0].path=/data/Janus-Pro-1B (VALUE is YAML)",
    )
    p.add_argument("--plan", action="store_true", help="validate, list the runs and their state, run nothing")
    p.add_argument(
        "--restart",
        action="store_true",
        help="delete the sweep's own runs and index first (only in a directory uniprobe made), then run",
    )
    p.add_argument(
        "--allow-module-loaders",
        action="store_true",
        help="accept models[].loader as package.module:function (imports it; default: FILE.py:function only)",
    )
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sweep.config import load_config, preflight
    from uniprobe.experiments.sweep.index import run_state
    from uniprobe.experiments.sweep.runner import FailFastError, run_sweep

    cfg = load_config(args.config, args.overrides, args.out, allow_module_loaders=args.allow_module_loaders)
    if args.plan:
        print(f"sweep {cfg.name!r} → {cfg.out}: {len(cfg.runs)} runs")
        for run in cfg.runs:
            state = run_state(cfg.out / "runs" / run["id"])["status"]
            print(f"  {run['id']:<40} {state:<8} {', '.join(run['analyses'])}")
        for problem in preflight(cfg):
            print(f"  to fix before running: {problem}")
        return 0
    try:
        entries = run_sweep(cfg, restart=args.restart, fail_fast=args.fail_fast)
    except FailFastError as err:  # a run failed (exit 1), not a bad input (exit 2)
        print(f"uniprobe sweep: {err}", file=sys.stderr)
        return 1
    return 1 if any(e["status"] == "failed" for e in entries) else 0
