"""``uniprobe seeds PROTOCOL --model sandbox-ar|sandbox-query --out DIR``: the papers' protocols.

``gapeval`` (gap score) and ``r3`` (generate → understand → regenerate) evaluate a checkpoint;
``inject`` (knowledge injection) and ``stars`` (self-training) fine-tune copies of it (the checkpoint
on disk is never changed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PROTOCOLS = ("gapeval", "r3", "inject", "stars")


def add_seeds_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "seeds",
        help="the papers' protocols on a sandbox model (GapEval, R3, knowledge injection, STARS)",
    )
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--model", default="sandbox-ar", help="sandbox-ar, sandbox-query or a checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="gapeval/r3: test-suite and fit seed; inject/stars: the protocol's seed (suite seed stays 0)",
    )
    p.add_argument("--rounds", type=int, default=3, help="R3: regeneration rounds")
    p.add_argument("--steps", type=int, default=None, help="inject/stars: fine-tuning steps (default 150)")
    p.add_argument("--no-maps", action="store_true", help="inject/stars: skip the probe and patching maps")
    p.set_defaults(func=run_seeds)
    return p


def run_seeds(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sandbox.checkpoint import load_sandbox
    from uniprobe.experiments.seeds.protocols import gapeval_report, r3_report
    from uniprobe.experiments.tasks.suite import Suite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_sandbox(args.model)
    if args.protocol in ("inject", "stars"):
        return _run_finetuning(args, model, out)
    if args.protocol == "r3":
        title = f"{args.model}: R3 generate → understand → regenerate"
        r3_report(
            model,
            Suite(args.seed).items,
            out,
            rounds=args.rounds,
            title=title,
            plot_title=f"{args.model}: R3",
        )
        print((out / "r3.md").read_text().rstrip("\n"))
        return 0
    title = f"{args.model}: GapEval gap score"
    gapeval_report(model, Suite(args.seed).items, out, title=args.model, md_title=title)
    print((out / "gapeval.md").read_text().rstrip("\n"))
    return 0


def _run_finetuning(args: argparse.Namespace, model: object, out: Path) -> int:
    """Knowledge injection or STARS: each fine-tunes copies of ``model`` and writes json, md and figures."""
    if args.protocol == "inject":
        from uniprobe.experiments.seeds.inject import InjectSettings, run_inject

        settings = InjectSettings(seed=args.seed)
        if args.steps:
            settings.steps = args.steps
        result = run_inject(model, out, settings, maps=not args.no_maps)
    else:
        from uniprobe.experiments.seeds.stars import StarsSettings, run_stars

        settings = StarsSettings(seed=args.seed, maps=not args.no_maps)
        if args.steps:
            settings.steps = args.steps
        result = run_stars(model, out, settings)
    print(result["markdown"])
    print(f"wrote {out}/")
    return 0
