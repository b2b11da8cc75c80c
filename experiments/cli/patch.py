"""``uniprobe patch``: activation patching of one prompt pair (a layer × position heatmap).

    uniprobe patch --model SPEC --clean TEXT --corrupted TEXT --target TOKEN --foil TOKEN
                   [--points resid_pre attn_out mlp_out] [--method exact|attribution]
                   [--direction denoise|noise] [--align strict|end] --out DIR

TOKEN is a word of the model's tokenizer (``3`` is the word 3) or ``id:N`` for token id N.
Writes ``DIR/patch.json`` (grid, axes, baselines, metric, timing) and ``DIR/patch.png`` (layer ×
position heatmaps, token labels); the work is :func:`uniprobe.experiments.patching.patch_pair`.
"""

from __future__ import annotations

import argparse
from typing import Any

from uniprobe.experiments.cli._choices import PATCH_ALIGNS as ALIGNS
from uniprobe.experiments.cli._choices import PATCH_DIRECTIONS as DIRECTIONS
from uniprobe.experiments.cli._choices import PATCH_KINDS as KINDS
from uniprobe.experiments.cli._choices import PATCH_METHODS as METHODS


def add_patch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``patch``."""
    p = subparsers.add_parser("patch", help="activation patching sweep (layer × position heatmap)")
    p.add_argument("--model", required=True, help="built-in tiny name, sandbox name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--clean", required=True, help="prompt whose answer is the target token")
    p.add_argument("--corrupted", required=True, help="prompt that differs in the key detail")
    p.add_argument(
        "--target",
        required=True,
        help="answer of the clean prompt: one-token word (3 is the word 3), or id:N for token id N",
    )
    p.add_argument(
        "--foil",
        required=True,
        help="answer of the corrupted prompt: one-token word, or id:N for token id N",
    )
    p.add_argument(
        "--points", nargs="+", default=["resid_pre"], help=f"site kinds: {', '.join(KINDS)} (commas allowed)"
    )
    p.add_argument("--method", choices=METHODS, default="exact")
    p.add_argument("--direction", choices=DIRECTIONS, default="denoise")
    p.add_argument(
        "--align",
        choices=ALIGNS,
        default="strict",
        help="strict: prompts must have equal token lengths; end: align the prompts' last tokens",
    )
    p.add_argument("--budget-mb", type=float, default=512.0, help="activation memory per batched chunk")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_patch)
    return p


def run_patch(args: argparse.Namespace) -> int:
    """Handler of ``uniprobe patch``; returns the exit code."""
    from uniprobe.experiments.models import load_model
    from uniprobe.experiments.patching import patch_pair, site_kinds

    kinds = site_kinds(args.points)  # checked before the model loads
    loaded = load_model(args.model, args.adapter)
    res = patch_pair(
        loaded, args.clean, args.corrupted, args.target, args.foil, kinds=kinds, method=args.method,
        direction=args.direction, align=args.align, budget_mb=args.budget_mb, name=args.model,
    )  # fmt: skip
    files = res.write(args.out)
    result = res.result
    print(
        f"{args.method} patching of {len(result.sites)} sites in {res.data['timing']['seconds']:.2f}s; "
        f"baselines clean {result.clean:.4f}, corrupted {result.corrupted:.4f} "
        f"(logit {res.data['metric']['target']['text']!r} − {res.data['metric']['foil']['text']!r})"
    )
    for note in result.info.get("notes", []):
        print(f"note: {note}")
    if result.clean == result.corrupted:
        print(
            "warning: the clean and corrupted baselines are equal, so normalised values are undefined (null)"
        )
    strongest = res.strongest()
    if strongest is not None:
        kind, layer, column = strongest
        print(f"strongest site: {kind} layer {layer} at {column!r}")
    print(f"wrote {files['json']} and {files['png']}")
    return 0
