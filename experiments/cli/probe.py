"""``uniprobe probe`` and ``uniprobe lens``: linear probes on a store, the lens of answer tokens.

    uniprobe probe STORE --label KEY [--points GLOB] [--roles ROLE ...] [--reduce last]
                   [--group-by KEY] [--method logistic|ridge] [--examples ID ... | FILE]
                   [--classes VALUE ...] --out DIR
    uniprobe lens --model SPEC --prompts FILE --answers TOKEN ... --out DIR [--tuned-steps N]

TOKEN is a word of the model's tokenizer (``3`` is the word 3) or ``id:N`` for token id N.

``probe`` writes results.json, results.csv, probe_map.png and directions.safetensors (+ .json);
``lens`` writes lens.json, lens_rows.csv, lens_map.png, lens_kl.png (and tuned_lens.safetensors);
its work is :func:`uniprobe.experiments.lensing.lens_prompts`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from uniprobe.experiments.cli._choices import ROLES


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``uniprobe probe``."""
    p = subparsers.add_parser("probe", help="train linear probes on a store: the layer × role probe map")
    p.add_argument("store", help="activation store directory (from uniprobe capture)")
    p.add_argument("--label", required=True, help="label key to predict (see uniprobe inspect STORE)")
    p.add_argument("--points", default="blocks.*.resid_post", help="points or globs of the store")
    p.add_argument(
        "--roles",
        nargs="+",
        help="role selections, one probe each; join roles read together with '+' (query+image_gen); "
        "default: every role present that every labelled example has (the others are named in a note)",
    )
    p.add_argument(
        "--reduce", default="last", help="last, first, mean, or an int position among the role's rows"
    )
    p.add_argument(
        "--group-by", help="label key whose items stay on one side of the split (entity, template)"
    )
    p.add_argument(
        "--examples", nargs="+", help="probe only these example ids (or a file of ids, one per line)"
    )
    p.add_argument("--classes", nargs="+", help="probe only examples whose label is one of these values")
    p.add_argument("--method", choices=("logistic", "ridge"), default="logistic")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for choosing C")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, nargs="+", help="generation step(s) to read (image_gen positions)")
    p.add_argument("--branch", default="cond", help="guidance branch: cond or uncond")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_probe)
    return p


def _reduce(value: str) -> str | int:
    try:
        return int(value)
    except ValueError:
        return value


def example_ids(values: list[str] | None) -> list[str] | None:
    """``--examples``: ids, where a value naming an existing file stands for the ids in it (one per
    line or separated by spaces)."""
    if values is None:
        return None
    from pathlib import Path

    out: list[str] = []
    for v in values:
        out += Path(v).read_text().split() if Path(v).is_file() else [v]
    return out


def cmd_probe(args: argparse.Namespace) -> int:
    import warnings

    from uniprobe.hooks.store import ActivationStore
    from uniprobe.hooks.store.errors import IncompleteStoreWarning
    from uniprobe.probes.linear import incomplete_message, probe_store

    store = ActivationStore.open(args.store)
    if not store.complete:  # said plainly on stderr, before the work, not as a Python warning
        print(f"uniprobe probe: warning: {incomplete_message(store)}", file=sys.stderr)
    roles = None if args.roles is None else [r.split("+") for r in args.roles]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStoreWarning)
        res = probe_store(
            store, args.label, points=args.points, roles=roles, reduce=_reduce(args.reduce),
            group_by=args.group_by, method=args.method, folds=args.folds, seed=args.seed,
            test_size=args.test_size, step=args.step, branch=args.branch,
            examples=example_ids(args.examples), classes=args.classes,
        )  # fmt: skip
    files = res.save(args.out)
    meta = res.meta
    for note in meta.get("notes", []):
        print(f"note: {note}")
    print(
        f"{len(res)} probes of {meta['label']!r} ({len(meta['classes'])} classes, {meta['method']}, "
        f"split by {meta['grouping']}: {meta['n_train']} train / {meta['n_test']} test)"
    )
    if not meta["store_complete"]:
        expected = meta["store_examples_expected"]
        of = f" of {expected}" if expected is not None else ""
        present, used = meta["store_examples"], meta["examples_used"]
        print(f"  INCOMPLETE store: {present}{of} examples present, {used} used")
    print(f"  {'point':<26} {'role':<12} {'acc':>6} {'95% CI':>13} {'control':>8} {'select':>7} {'C':>7}")
    for r in res.rows:
        ci = f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]"
        print(
            f"  {r['point']:<26} {r['role']:<12} {_f(r['accuracy']):>6} {ci:>13} {_f(r['control']):>8} "
            f"{_f(r['selectivity']):>7} {r['C']:>7g}"
        )
    for name, path in files.items():
        print(f"  wrote {name}: {path}")
    return 0


def _f(v: float | None) -> str:
    return "  —" if v is None else f"{v:.3f}"


def add_lens_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``uniprobe lens``."""
    p = subparsers.add_parser("lens", help="logit lens (and tuned lens) of answer tokens per layer × role")
    p.add_argument("--model", required=True, help="built-in name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--prompts", required=True, help="JSON lines: {'text' or 'input_ids', 'roles', ...}")
    p.add_argument(
        "--answers",
        nargs="+",
        required=True,
        help="answer tokens: one-token words (3 is the word 3), or id:N for token id N",
    )
    p.add_argument("--points", default="blocks.*.resid_post")
    p.add_argument("--roles", nargs="+", choices=ROLES, help="positions to decode (default: all but pad)")
    p.add_argument(
        "--generate", action="store_true", help="also decode the image positions the model generates"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tuned-steps", type=int, default=0, help="train a tuned lens on these prompts (0: off)")
    p.add_argument("--tuned-lens", help="a tuned lens saved before (tuned_lens.safetensors) to report beside")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_lens)
    return p


def cmd_lens(args: argparse.Namespace) -> int:
    from uniprobe.experiments.lensing import lens_prompts
    from uniprobe.experiments.models import load_model

    loaded = load_model(args.model, args.adapter)
    run = lens_prompts(
        loaded, args.prompts, args.answers, points=args.points, roles=args.roles, generate=args.generate,
        batch_size=args.batch_size, tuned_steps=args.tuned_steps, tuned_lens=args.tuned_lens, seed=args.seed,
        name=args.model,
    )  # fmt: skip
    files = run.write(args.out)
    print(
        f"lens of {args.model} on {run.n_examples} prompts, answers {run.answers} "
        f"({', '.join(run.result.meta['answer_tokens'])})"
    )
    print(f"  {'lens':<6} {'layer':>5} {'role':<10} {'token':>6} {'mean p':>8} {'mean rank':>9} {'top-1':>6}")
    for s in run.result.summary():
        print(
            f"  {s['lens']:<6} {s['layer']:>5} {s['role']:<10} {s['token']:>6} {s['mean_prob']:>8.4f} "
            f"{s['mean_rank']:>9.1f} {s['top1']:>6.2f}"
        )
    for name, path in files.items():
        print(f"  wrote {name}: {path}")
    return 0
