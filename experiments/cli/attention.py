"""``uniprobe attention`` and ``uniprobe knockout``: attention of one prompt.

    uniprobe attention --model SPEC --prompt TEXT [--mode understanding|generation]
                       [--query-roles ROLE ...] [--key-roles ROLE ...] [--layers N ...] --out DIR
    uniprobe knockout  --model SPEC --prompt TEXT --keys NAME=ROLE[,ROLE]|NAME=POS[,POS] ...
                       --target TOKEN [--foil TOKEN] [--query ROLE ...|POS ...] [--window N]
                       [--heads H ...] [--layers N ...] [--mode ...] --out DIR

``attention`` writes every layer's pattern (``patterns.safetensors`` ``[layer, head, query, key]``),
the attention mass from the query roles to the key roles per layer × head (``mass.json``), the maps
with role bands on both axes (``attention.png``) and the mass heatmap (``mass.png``). ``knockout``
removes the query → key-group edges at each layer (a batched sweep; ``patch.json`` is a PatchResult,
``knockout.png`` its layer × group heatmap). The work is :mod:`uniprobe.experiments.attention`.
"""

from __future__ import annotations

import argparse
from typing import Any

from uniprobe.experiments.cli._args import positive_int
from uniprobe.experiments.cli._choices import ROLES

MODES: tuple[str, ...] = ("understanding", "generation")  # uniprobe.experiments.attention.MODES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in tiny name, sandbox name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--prompt", required=True, help="the prompt (text)")
    p.add_argument("--mode", choices=MODES, default="understanding", help="how the adapter builds the batch")
    p.add_argument("--layers", nargs="+", type=int, help="blocks to look at (default: all)")
    p.add_argument("--out", required=True, help="output directory")


def add_attention_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``attention``."""
    p = subparsers.add_parser("attention", help="attention patterns and attention mass of one prompt")
    _common(p)
    p.add_argument(
        "--query-roles", nargs="+", choices=ROLES, help="query roles (default: the last position's)"
    )
    p.add_argument("--key-roles", nargs="+", choices=ROLES, help="key roles (default: every role present)")
    p.set_defaults(func=run_attention)
    return p


def add_knockout_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``knockout``."""
    p = subparsers.add_parser("knockout", help="attention knockout sweep: layers × key groups")
    _common(p)
    p.add_argument("--keys", nargs="+", required=True, help="key groups NAME=ROLE[,ROLE] or NAME=POS[,POS]")
    p.add_argument(
        "--query",
        nargs="+",
        default=["image_gen"],
        help="query roles or positions (-1 = last; default image_gen)",
    )
    p.add_argument("--target", required=True, help="answer token: a one-token word, or id:N")
    p.add_argument(
        "--foil", help="foil token: the metric is then logit(target) − logit(foil), else p(target)"
    )
    p.add_argument(
        "--window", type=positive_int, default=1, help="layers knocked out together from each layer"
    )
    p.add_argument("--heads", nargs="+", type=int, help="knock out only these heads (default: all)")
    p.add_argument("--budget-mb", type=float, default=512.0, help="activation memory per batched chunk")
    p.set_defaults(func=run_knockout)
    return p


def run_attention(args: argparse.Namespace) -> int:
    """Handler of ``uniprobe attention``; returns the exit code."""
    from uniprobe.experiments.attention import attention_prompt
    from uniprobe.experiments.models import load_model

    loaded = load_model(args.model, args.adapter)
    run = attention_prompt(
        loaded, args.prompt, query_roles=args.query_roles, key_roles=args.key_roles, layers=args.layers,
        mode=args.mode, name=args.model,
    )  # fmt: skip
    files = run.write(args.out)
    t = run.table
    layer, head = divmod(int(t.values.nan_to_num(-1).argmax()), t.values.shape[1])
    print(
        f"attention of {len(run.roles)} positions over {len(run.layers)} layers; mass "
        f"{'+'.join(t.query_roles)} → {'+'.join(t.key_roles)}: mean {float(t.values.nanmean()):.3f}, "
        f"highest {float(t.values[layer, head]):.3f} at layer {t.layers[layer]} head {head}"
    )
    print(f"wrote {files['patterns']}, {files['mass']}, {files['png']} and {files['mass_png']}")
    return 0


def run_knockout(args: argparse.Namespace) -> int:
    """Handler of ``uniprobe knockout``; returns the exit code."""
    from uniprobe.experiments.attention import knockout_prompt, parse_groups, parse_selection
    from uniprobe.experiments.models import load_model

    groups, query = parse_groups(args.keys), parse_selection(args.query)  # checked before the model loads
    loaded = load_model(args.model, args.adapter)
    run = knockout_prompt(
        loaded, args.prompt, groups, target=args.target, foil=args.foil, query=query, layers=args.layers,
        window=args.window, heads=args.heads, mode=args.mode, budget_mb=args.budget_mb, name=args.model,
    )  # fmt: skip
    files = run.write(args.out)
    res = run.result
    grid = res.as_grid(False)[0]  # [layer, group]
    drop = (grid - res.clean).abs()
    layer, col = divmod(int(drop.nan_to_num(-1).argmax()), grid.shape[1])
    print(
        f"knockout of {len(res.sites)} configurations in {res.seconds:.2f}s ({res.info['chunks']} chunk(s)); "
        f"{res.metric}: unknocked {res.clean:.4f}, every group at every layer {res.corrupted:.4f}"
    )
    print(
        f"largest change: group {res.grid.columns[col]!r} at layer {res.grid.layers[layer]} "
        f"({float(grid[layer, col]):.4f})"
    )
    print(f"wrote {files['json']} and {files['png']}")
    return 0
