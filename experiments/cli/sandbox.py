"""``uniprobe train-sandbox`` and ``uniprobe gap``: train a sandbox model, its gap table.

uniprobe train-sandbox --arch ar|query|mot --out DIR [--steps N] [--seed S] [--time-budget SECONDS]
    [--data JSON]   (keys of Suite.training_examples over the recipe's: e.g. '{"reasoning_draw": 0.15}')
uniprobe train-sandbox --arch ar|query --chain CHAIN --out DIR [--seed S]   (staged.CHAINS)
    (mot: warm start from ``--source`` (default sandbox-query), then the generation path;
    ``mot_train.RECIPE``; ``--weight-decay X`` its AdamW decay, 0.01 by default)
uniprobe gap --model sandbox-ar|sandbox-query|DIR [--out DIR] [--no-verify]
uniprobe sandbox seeds --arch ar|query|mot --seeds 0 1 2 --out DIR [--steps N] [--time-budget SECONDS]
    [--chain CHAIN | --data JSON]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from uniprobe.experiments.cli._choices import SANDBOX_CHAINS
from uniprobe.hooks.errors import UsageError


def _add_chain_argument(p: argparse.ArgumentParser, stages_dir: str) -> None:
    p.add_argument(
        "--chain",
        choices=SANDBOX_CHAINS,
        default=None,
        help="ar/query: train the staged chain instead (staged.CHAINS; sandbox-ar ships from "
        "mix-first-longer-wd-remap-arith2-draw, ~113 min on one core, sandbox-query from "
        f"mix-first-consolidate-wd, ~113 min), its stages in {stages_dir}",
    )


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train-sandbox``."""
    p = subparsers.add_parser("train-sandbox", help="train a sandbox model on CPU (a few minutes)")
    p.add_argument("--arch", choices=("ar", "query", "mot"), required=True)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: ar/query 1400 (train.py DEFAULTS), mot 6000 (mot_train.RECIPE); a --chain its own",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="default: the recipe's (mot 1 and a --chain 0, as shipped; one-stage query 2, ar 0)",
    )
    p.add_argument(
        "--source",
        default=None,
        help="mot only: the understanding checkpoint to warm-start from (default sandbox-query)",
    )
    p.add_argument(
        "--time-budget", type=float, default=None, help="stop after this many seconds (schedule follows time)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="JSON object of Suite.training_examples keywords over the recipe's stream (mot: its drawing "
        "stream), e.g. '{\"reasoning_draw\": 0.15}' (the latent-CoT variant); not with --chain",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="mot only: AdamW's weight decay in every stage of the drawing path's training (default 0.01)",
    )
    _add_chain_argument(p, "OUT-stages/")
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


def add_sandbox_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sandbox seeds``: train several seeds, report every finding as mean and range."""
    p = subparsers.add_parser("sandbox", help="sandbox experiments over training seeds")
    sub = p.add_subparsers(dest="sandbox_command", required=True)
    s = sub.add_parser(
        "seeds",
        help="train one model per seed; gap table, best probe layer and patching peak as mean and range",
    )
    s.add_argument("--arch", choices=("ar", "query", "mot"), required=True)
    s.add_argument("--seeds", type=int, nargs="+", required=True, help="e.g. --seeds 0 1 2")
    s.add_argument("--out", required=True, help="folder for seed-*/ (checkpoint, maps), seeds.json, seeds.md")
    s.add_argument(
        "--steps", type=int, default=None,
        help="per seed; default: ar/query 1400 (train.py DEFAULTS), mot 6000 (mot_train.RECIPE), "
        "a --chain its own",
    )  # fmt: skip
    s.add_argument(
        "--time-budget", type=float, default=None, help="per seed, seconds (schedule follows time)"
    )
    s.add_argument(
        "--data",
        default=None,
        help="JSON object of Suite.training_examples keywords over the recipe's stream (mot: its drawing "
        "stream), e.g. '{\"portrait_share\": 0.5}'; recorded in each seed's request.json; not with --chain",
    )
    _add_chain_argument(s, "OUT/seed-*/checkpoint-stages/")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    s.set_defaults(func=run_sandbox_seeds)
    return p


def run_sandbox_seeds(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sandbox.multiseed import format_seed_table, seeds_report

    t0 = time.time()
    summary = seeds_report(
        args.arch,
        args.seeds,
        args.out,
        steps=args.steps,
        time_budget_s=args.time_budget,
        threads=args.threads,
        **({"chain": args.chain} if args.chain else {}),
        **({} if args.data is None else {"data": parse_stream_data(args.data)}),
    )
    print(format_seed_table(summary, title=f"sandbox-{args.arch} over seeds"))
    print(f"({time.time() - t0:.0f}s) → {args.out}/seeds.json, seeds.md")
    return 0


def parse_stream_data(text: str) -> dict:
    """``--data``: a JSON object whose keys are keywords of :meth:`Suite.training_examples`."""
    import inspect

    from uniprobe.experiments.tasks.suite import Suite

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--data is not JSON ({err}): give an object, e.g. '{{\"reasoning_draw\": 0.15}}'"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"--data must be a JSON object of stream keywords, not {type(data).__name__}")
    allowed = set(inspect.signature(Suite.training_examples).parameters) - {"self", "seed"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(
            f"--data keys {unknown} are not Suite.training_examples keywords: use {sorted(allowed)}"
        )
    return data


def run_train(args: argparse.Namespace) -> int:
    from uniprobe.experiments.sandbox.train import train_any

    if args.source is not None and args.arch != "mot":
        raise UsageError("--source is for --arch mot (the understanding checkpoint it starts from): drop it")
    if args.weight_decay is not None and args.arch != "mot":
        raise UsageError(
            "--weight-decay is for --arch mot (its drawing path's training); the ar / query chains set "
            "each stage's decay in staged.CHAINS: drop it"
        )
    extra = {} if args.data is None else {"data": parse_stream_data(args.data)}
    if args.weight_decay is not None:
        extra["weight_decay"] = args.weight_decay
    t0 = time.time()
    train_any(
        args.arch,
        args.out,
        steps=args.steps,
        seed=args.seed,
        time_budget_s=args.time_budget,
        threads=args.threads,
        source=args.source,
        chain=args.chain,
        **extra,
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
