"""``uniprobe seeds PROTOCOL --model sandbox-ar|sandbox-query --out DIR``: the papers' protocols."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

PROTOCOLS = ("gapeval", "r3")


def add_seeds_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "seeds", help="the papers' protocols on a sandbox model (GapEval gap score, R3 loop)"
    )
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--model", default="sandbox-ar", help="sandbox-ar, sandbox-query or a checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="test-suite and fit seed")
    p.add_argument("--rounds", type=int, default=3, help="R3: regeneration rounds")
    p.set_defaults(func=run_seeds)
    return p


def run_seeds(args: argparse.Namespace) -> int:
    from experiments.sandbox.checkpoint import load_sandbox
    from experiments.sandbox.evaluate import evaluate_items
    from experiments.seeds.gapeval import format_gap_score, plot_gap_score, sandbox_gap_score
    from experiments.tasks.suite import Suite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_sandbox(args.model)
    if args.protocol == "r3":
        from experiments.seeds.r3 import format_r3, r3_loop

        r3 = r3_loop(model, Suite(args.seed).items, rounds=args.rounds)
        md = format_r3(r3, title=f"{args.model}: R3 generate → understand → regenerate")
        (out / "r3.json").write_text(json.dumps(asdict(r3), indent=1))
        (out / "r3.md").write_text(md + "\n")
        print(md)
        return 0
    results = evaluate_items(model, Suite(args.seed).items, cot=False)
    score, rows = sandbox_gap_score(results)
    md = format_gap_score(score, rows, title=f"{args.model}: GapEval gap score")
    (out / "gapeval.json").write_text(
        json.dumps({"score": score, "categories": [asdict(r) for r in rows]}, indent=1)
    )
    (out / "gapeval.md").write_text(md + "\n")
    plot_gap_score(rows, score, str(out / "gapeval.png"), title=args.model)
    print(md)
    return 0
