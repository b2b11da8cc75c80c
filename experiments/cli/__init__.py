"""The ``uniprobe`` command.

    uniprobe points  --model SPEC
    uniprobe capture --model SPEC --prompts FILE.jsonl --points GLOB [--roles ...] --out DIR
    uniprobe inspect DIR
    uniprobe demo

Every command exits with status 2 and a one-line ``uniprobe CMD: error: ...`` message on bad input
(unknown point, model family without an adapter, malformed prompt line, existing store); inputs
are checked before anything is written. Set ``UNIPROBE_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

import torch
from uniprobe.hooks.layout import ROLES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a batch size of 0 would fail only after the store is made)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; give 1 or more")
    return value


def cmd_points(args: argparse.Namespace) -> int:
    from uniprobe.experiments.models import load_model

    loaded = load_model(args.model, args.adapter)
    a = loaded.adapter
    print(
        f"{args.model}: {type(loaded.model).__name__}, adapter {a.name!r}, {a.n_layers(loaded.model)} blocks"
    )
    for p in a.points(loaded.model):
        site = a.site(loaded.model, p)
        print(f"  {p:<28} {site.io} of {site.module}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from uniprobe.experiments.models import load_model
    from uniprobe.experiments.prompts_file import read_prompts
    from uniprobe.hooks.pipeline import capture_dataset

    loaded = load_model(args.model, args.adapter, device_map=args.device_map)
    examples = read_prompts(args.prompts, loaded)  # every line checked before the store is created
    store = capture_dataset(
        loaded.model,
        examples,
        args.points,
        args.out,
        adapter=loaded.adapter,
        roles=args.roles,
        mode=args.mode,
        batch_size=args.batch_size,
        backend=args.backend,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
        resume=args.resume,
        model_info={"spec": args.model},
    )
    print(store.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from uniprobe.hooks.store import ActivationStore

    store = ActivationStore.open(args.store, verify="full" if args.verify else "lazy")
    print(store.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from uniprobe.experiments.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniprobe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("points", help="list a model's hook points")
    p.add_argument("--model", required=True, help="built-in name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("capture", help="capture activations over a prompts file into a store")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--prompts", required=True, help="JSON lines: {'text' or 'input_ids', 'labels', ...}")
    p.add_argument("--points", default="blocks.*.resid_post", help="names, globs or TransformerLens aliases")
    p.add_argument("--roles", nargs="+", choices=ROLES, help="keep only positions with these roles")
    p.add_argument(
        "--mode",
        choices=("understanding", "generation", "generate"),
        default="understanding",
        help="generation: teacher-forced image tokens; generate: run image generation, capture every step",
    )
    p.add_argument("--backend", choices=("torch", "nnsight", "transformer_lens"), default="torch")
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.add_argument(
        "--device-map",
        help="model folder only: transformers device_map ('auto', 'cpu', 'cuda:0', ...); needs accelerate",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted capture")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("inspect", help="summarise a store")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 now")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="run the built-in demo (writes artifacts/demo/report.md)")
    p.add_argument("--out", default="artifacts/demo")
    p.set_defaults(func=cmd_demo)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable]:
    from uniprobe.experiments.patch_commands import add_patch_parser
    from uniprobe.experiments.probe_commands import add_lens_parser, add_probe_parser
    from uniprobe.experiments.sandbox.commands import add_gap_parser, add_train_parser
    from uniprobe.experiments.seeds.commands import add_seeds_parser
    from uniprobe.experiments.sweep.commands import add_sweep_parser

    return [
        add_probe_parser,
        add_lens_parser,
        add_patch_parser,
        add_train_parser,
        add_gap_parser,
        add_seeds_parser,
        add_sweep_parser,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "interrupted; finished shards and runs are kept — re-run the same command to continue "
            "(add --resume for `uniprobe capture`)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, KeyError, TypeError, OSError, AttributeError, ImportError, RuntimeError) as err:
        if os.environ.get("UNIPROBE_DEBUG"):
            raise
        print(f"uniprobe {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes ``str`` adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    return re.sub(r"\s*\n\s*", " ", str(msg)).strip()


if __name__ == "__main__":
    sys.exit(main())
