"""The ``uniprobe probe`` and ``uniprobe lens`` commands (registered by ``uniprobe.experiments.cli``).

    uniprobe probe STORE --label KEY [--points GLOB] [--roles ROLE ...] [--reduce last]
                   [--group-by KEY] [--method logistic|ridge] --out DIR
    uniprobe lens --model SPEC --prompts FILE --answers TOKEN ... --out DIR [--tuned-steps N]

``probe`` writes results.json, results.csv, probe_map.png and directions.safetensors (+ .json);
``lens`` writes lens.json, lens_rows.csv, lens_map.png, lens_kl.png (and tuned_lens.safetensors).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from uniprobe.hooks.layout import ROLES


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
        "default: every role present",
    )
    p.add_argument(
        "--reduce", default="last", help="last, first, mean, or an int position among the role's rows"
    )
    p.add_argument(
        "--group-by", help="label key whose items stay on one side of the split (entity, template)"
    )
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
        res = _probe(probe_store, store, args, roles)
    files = res.save(args.out)
    meta = res.meta
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


def _probe(probe_store: Any, store: Any, args: argparse.Namespace, roles: list[list[str]] | None) -> Any:
    return probe_store(
        store,
        args.label,
        points=args.points,
        roles=roles,
        reduce=_reduce(args.reduce),
        group_by=args.group_by,
        method=args.method,
        folds=args.folds,
        seed=args.seed,
        test_size=args.test_size,
        step=args.step,
        branch=args.branch,
    )


def _f(v: float | None) -> str:
    return "  —" if v is None else f"{v:.3f}"


def add_lens_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``uniprobe lens``."""
    p = subparsers.add_parser("lens", help="logit lens (and tuned lens) of answer tokens per layer × role")
    p.add_argument("--model", required=True, help="built-in name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--prompts", required=True, help="JSON lines: {'text' or 'input_ids', 'roles', ...}")
    p.add_argument(
        "--answers", nargs="+", required=True, help="answer tokens: token ids, or words the tokenizer has"
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


def resolve_answers(loaded: Any, answers: list[str]) -> list[int]:
    """Token ids of ``answers``: integers are ids; words must be one token of the model's tokenizer."""
    vocab = _vocab_size(loaded)
    ids = []
    for a in answers:
        if a.lstrip("-").isdigit():
            tid = int(a)
        else:
            tid = _word_id(loaded, a)
        if tid < 0 or (vocab is not None and tid >= vocab):
            raise ValueError(
                f"answer token id {tid} is outside the vocabulary (0..{vocab - 1 if vocab else '?'})"
            )
        ids.append(tid)
    return ids


def _vocab_size(loaded: Any) -> int | None:
    from uniprobe.probes.lens import readout

    head = readout(loaded.model, loaded.adapter).head
    out = getattr(head, "out_features", None)
    return int(out) if out is not None else None


def _word_id(loaded: Any, word: str) -> int:
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(
            f"answer {word!r} is a word but model {loaded.spec!r} has no tokenizer; pass token ids"
        )
    if hasattr(tok, "convert_tokens_to_ids") and callable(tok):  # a transformers tokenizer
        unk = getattr(tok, "unk_token_id", None)
        tid = tok.convert_tokens_to_ids(word)
        if tid is not None and tid != unk:
            return int(tid)
        for variant in (word, " " + word):
            pieces = tok.encode(variant, add_special_tokens=False)
            if len(pieces) == 1:
                return int(pieces[0])
        raise ValueError(
            f"answer {word!r} is not one token of the tokenizer: it encodes to {pieces} "
            f"({tok.convert_ids_to_tokens(pieces)}); pass a single-token word or a token id"
        )
    pieces = tok.encode(word)
    if len(pieces) != 1:
        raise ValueError(f"answer {word!r} encodes to {len(pieces)} tokens {pieces}; pass one token")
    return int(pieces[0])


def _token_str(loaded: Any) -> Any:
    tok = loaded.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return None
    return lambda t: str(tok.convert_ids_to_tokens([t])[0])


def cmd_lens(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniprobe.experiments.models import load_model
    from uniprobe.experiments.prompts_file import read_prompts
    from uniprobe.probes.lens import DEFAULT_ROLES, LensResult, logit_lens
    from uniprobe.probes.tuned_lens import TunedLens, save_report, tuned_lens_from_capture

    loaded = load_model(args.model, args.adapter)
    model, adapter = loaded.model, loaded.adapter
    examples = read_prompts(args.prompts, loaded)
    answers = resolve_answers(loaded, args.answers)
    roles = args.roles or list(DEFAULT_ROLES)
    mode = "generation" if args.generate else "understanding"
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuned = TunedLens.load(args.tuned_lens) if args.tuned_lens else None
    if args.tuned_steps > 0:
        inputs = adapter.prepare(model, examples, mode=mode)
        tuned, report = tuned_lens_from_capture(
            model, inputs, adapter=adapter, points=args.points, roles=roles, generate=args.generate,
            steps=args.tuned_steps, seed=args.seed,
        )  # fmt: skip
        tuned.save(out / "tuned_lens.safetensors")
        save_report(report, out / "tuned_lens_report.json")
    rows: list[dict] = []
    kl: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for batch in batches:
        inputs = adapter.prepare(model, batch, mode=mode)
        res = logit_lens(
            model, inputs, answers, adapter=adapter, points=args.points, roles=roles, generate=args.generate,
            tuned=tuned, example_ids=[ex["id"] for ex in batch], token_str=_token_str(loaded),
        )  # fmt: skip
        rows += res.rows
        for r in res.kl:
            kl.setdefault((r["lens"], r["point"]), []).append((r["kl"], r["n"]))
    kl_rows = [
        {
            "lens": lens,
            "point": point,
            "layer": next(r["layer"] for r in rows if r["point"] == point),
            "kl": sum(k * n for k, n in v) / sum(n for _, n in v),
            "n": sum(n for _, n in v),
        }
        for (lens, point), v in kl.items()
    ]
    meta = {
        "model": args.model,
        "adapter": adapter.name,
        "answers": answers,
        "answer_words": args.answers,
        "roles": roles,
        "prompts": str(args.prompts),
        "title": f"{args.model}: lens on answers {', '.join(args.answers)}",
    }
    result = LensResult(rows, kl_rows, meta)
    files = result.save(out)
    print(f"lens of {args.model} on {len(examples)} prompts, answers {answers} ({' '.join(args.answers)})")
    print(f"  {'lens':<6} {'layer':>5} {'role':<10} {'token':>6} {'mean p':>8} {'mean rank':>9} {'top-1':>6}")
    for s in result.summary():
        print(
            f"  {s['lens']:<6} {s['layer']:>5} {s['role']:<10} {s['token']:>6} {s['mean_prob']:>8.4f} "
            f"{s['mean_rank']:>9.1f} {s['top1']:>6.2f}"
        )
    for name, path in files.items():
        print(f"  wrote {name}: {path}")
    return 0
