"""``uniprobe steer``: add ``alpha × direction`` to one prompt's stream at points × alphas (batched).

    uniprobe steer --model SPEC --prompt TEXT --target TOKEN --foil TOKEN
                   (--toward TEXT --away TEXT | --probe DIR --probe-role ROLE --class VALUE | --stores A B)
                   [--points blocks.*.resid_pre] [--alphas 0 2 4 8] [--role ROLE | --positions P ...]
                   --out DIR

TOKEN is a word of the model's tokenizer or ``id:N``. Writes ``DIR/steer.json`` (values [point, alpha],
the plain run, prompt, metric, direction source and norms), ``DIR/steer.safetensors`` and ``DIR/steer.png``;
the work is :func:`uniprobe.experiments.steering.steer_prompt`.
"""

from __future__ import annotations

import argparse
from typing import Any

from uniprobe.experiments.cli._choices import ROLES


def add_steer_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``steer``."""
    p = subparsers.add_parser("steer", help="steering: add alpha × a direction at points × alphas (batched)")
    p.add_argument("--model", required=True, help="built-in tiny name, sandbox name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--prompt", required=True, help="the prompt to steer")
    p.add_argument("--target", required=True, help="token to push toward: one-token word, or id:N")
    p.add_argument("--foil", required=True, help="token to push away from: one-token word, or id:N")
    p.add_argument("--points", default="blocks.*.resid_pre", help="hook points or globs (commas allowed)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--role", choices=ROLES, help="steer the positions of this role (default: all)")
    where.add_argument("--positions", type=int, nargs="+", help="steer these positions (default: all)")
    p.add_argument("--toward", help="direction = state of this prompt − state of --away (last position)")
    p.add_argument("--away", help="see --toward")
    p.add_argument("--probe", help="direction from a saved probe result folder (uniprobe probe --out)")
    p.add_argument("--probe-role", choices=ROLES, help="the role the probe read")
    p.add_argument("--class", dest="cls", help="the probe class to steer toward")
    p.add_argument(
        "--stores", nargs=2, metavar=("A", "B"), help="direction = mean of store A − mean of store B"
    )
    p.add_argument("--store-role", choices=ROLES, help="role of the store rows to average (default: all)")
    p.add_argument("--budget-mb", type=float, default=512.0, help="activation memory per batched chunk")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_steer)
    return p


def run_steer(args: argparse.Namespace) -> int:
    """Handler of ``uniprobe steer``; returns the exit code."""
    from uniprobe.experiments.models import load_model
    from uniprobe.experiments.steering import steer_prompt

    loaded = load_model(args.model, args.adapter)
    res = steer_prompt(
        loaded, args.prompt, points=args.points, alphas=args.alphas, target=args.target, foil=args.foil,
        probe=args.probe, probe_role=args.probe_role, cls=args.cls, toward=args.toward, away=args.away,
        stores=args.stores, store_role=args.store_role, role=args.role, positions=args.positions,
        budget_mb=args.budget_mb, name=args.model,
    )  # fmt: skip
    files = res.write(args.out)
    r = res.result
    best = int((r.values - r.plain).abs().argmax())
    point, alpha = r.points[best // len(r.alphas)], r.alphas[best % len(r.alphas)]
    print(
        f"steered {len(r.points)} points × {len(r.alphas)} alphas in {r.seconds:.2f}s "
        f"({r.info['forwards']} forwards); plain run {r.plain:.4f} "
        f"(logit {res.data['target']['text']!r} − {res.data['foil']['text']!r})"
    )
    print(f"largest change: {point} at alpha {alpha:g}: {float(r.values.flatten()[best]):.4f}")
    print(f"wrote {files['json']} and {files['png']}")
    return 0
