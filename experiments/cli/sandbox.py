"""``uniprobe train-sandbox`` and ``uniprobe gap``: train a sandbox model, its gap table.

uniprobe train-sandbox --arch ar|query --out DIR [--steps N] [--seed S] [--time-budget SECONDS]
uniprobe gap --model sandbox-ar|sandbox-query|DIR [--out DIR] [--no-verify]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train-sandbox``."""
    p = subparsers.add_parser("train-sandbox", help="train a sandbox model on CPU (a few minutes)")
    p.add_argument("--arch", choices=("ar", "query"), required=True)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=None, help="default: 1400 (train.py DEFAULTS)")
    p.add_argument("--seed", type=int, default=None, help="default: the shipped checkpoint's (ar 0, query 2)")
    p.add_argument(
        "--time-budget", type=float, default=None, help="stop after this many seconds (schedule follows time)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run_train)
    return p


def add_gap_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gap``."""
    p = subparsers.add_parser("gap", help="understanding vs generation gap table of a sandbox model")
    p.add_argument(
        "--model", default="sandbox-ar", help="sandbox-ar, sandbox-query, or a checkpoint directory"
    )
    p.add_argument("--out", default=None, help="directory for gap.json and gap.md")
    p.add_argument("--no-cot", action="store_true", help="skip generation with CoT")
    p.add_argument("--no-verify", action="store_true", help="do not check the checkpoint's sha256")
    p.set_defaults(func=run_gap)
    return p


def run_train(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sandbox.train import train_sandbox

    t0 = time.time()
    train_sandbox(
        args.arch,
        args.out,
        steps=args.steps,
        seed=args.seed,
        time_budget_s=args.time_budget,
        threads=args.threads,
    )
    print(f"trained {args.arch} in {time.time() - t0:.0f}s → {args.out}")
    return 0


def run_gap(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sandbox.checkpoint import load_sandbox
    from uniprobe.experiments.sandbox.evaluate import format_gap_table, gap_table, summarize

    model = load_sandbox(args.model, verify=not args.no_verify)  # ChecksumError: a one-line error
    t0 = time.time()
    rows = gap_table(model, cot=not args.no_cot)
    md = format_gap_table(rows, title=f"gap table: {args.model}")
    print(md)
    print(f"({time.time() - t0:.0f}s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gap.json").write_text(
            json.dumps({"model": str(args.model), "rows": rows, "summary": summarize(rows)}, indent=1)
        )
        (out / "gap.md").write_text(md)
    return 0
