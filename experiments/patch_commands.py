"""argparse subcommand ``patch`` (the ``uniprobe`` CLI registers it with :func:`add_patch_parser`).

    uniprobe patch --model SPEC --clean TEXT --corrupted TEXT --target TOKEN --foil TOKEN
                   [--points resid_pre attn_out mlp_out] [--method exact|attribution]
                   [--direction denoise|noise] [--align strict|end] --out DIR

Writes ``DIR/patch.json`` (grid, axes, baselines, metric, timing) and ``DIR/patch.png`` (layer ×
position heatmaps, token labels). The metric is the logit difference target − foil at the last
prompt position. Clean and corrupted prompts of different token lengths are an error unless
``--align end`` (right-aligned positions; only the shared tail is patched).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from uniprobe.probes.patching.sites import KINDS

METHODS = ("exact", "attribution")


def add_patch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``patch``."""
    p = subparsers.add_parser("patch", help="activation patching sweep (layer × position heatmap)")
    p.add_argument("--model", required=True, help="built-in tiny name, sandbox name or local model folder")
    p.add_argument("--adapter", help="adapter spec file (JSON/YAML) for a query-based checkpoint")
    p.add_argument("--clean", required=True, help="prompt whose answer is the target token")
    p.add_argument("--corrupted", required=True, help="prompt that differs in the key detail")
    p.add_argument("--target", required=True, help="answer token of the clean prompt (one token)")
    p.add_argument("--foil", required=True, help="answer token of the corrupted prompt (one token)")
    p.add_argument(
        "--points", nargs="+", default=["resid_pre"], help=f"site kinds: {', '.join(KINDS)} (commas allowed)"
    )
    p.add_argument("--method", choices=METHODS, default="exact")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    p.add_argument(
        "--align",
        choices=("strict", "end"),
        default="strict",
        help="strict: prompts must have equal token lengths; end: align the prompts' last tokens",
    )
    p.add_argument("--budget-mb", type=float, default=512.0, help="activation memory per batched chunk")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_patch)
    return p


def _kinds(raw: list[str]) -> list[str]:
    kinds = [k.strip() for item in raw for k in item.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown --points {bad}; choose from {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def _token_id(loaded: Any, text: str) -> int:
    """The single token id of ``text``, without the special tokens the tokenizer adds to prompts."""
    from uniprobe.experiments.models import WordTokenizer, encode

    tok = loaded.tokenizer
    if tok is not None and callable(tok) and not isinstance(tok, WordTokenizer):
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        ids = encode(loaded, text)
        try:
            prefix = encode(loaded, "")  # e.g. a <bos> the tokenizer always prepends
        except (ValueError, KeyError):
            prefix = []
        if prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix) :]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens {ids}; --target/--foil must be exactly one token")
    return int(ids[0])


def _labels(loaded: Any, ids: list[int]) -> list[str]:
    """One label per id (the token's text when the tokenizer can say)."""
    tok = loaded.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return [str(i) for i in ids]
    out = []
    for i in ids:
        names = tok.convert_ids_to_tokens([i])
        out.append(str(names[0]) if names else str(i))
    return out


def example(loaded: Any, text: str) -> dict[str, Any]:
    """A prompt as the model's adapter takes it: ``{"prompt": text}`` for models that build their own
    batches from text (the sandbox), else ``{"input_ids": ...}`` from the tokenizer."""
    from uniprobe.experiments.models import encode

    if loaded.info.get("text_prompts"):
        return {"prompt": text}
    return {"input_ids": encode(loaded, text)}


def _ids(inputs: Any) -> list[int]:
    """Token ids of a prepared single-example batch (its real positions)."""
    ids = inputs.kwargs["input_ids"][0]
    mask = inputs.kwargs.get("attention_mask")
    return (
        ids[mask[0].bool()].tolist()
        if mask is not None and mask.shape == inputs.kwargs["input_ids"].shape
        else ids.tolist()
    )


def run_patch(args: argparse.Namespace) -> int:
    """Handler of ``uniprobe patch``; returns the exit code."""
    from uniprobe.experiments.models import load_model
    from uniprobe.probes.patching import (
        LogitDiff,
        align_end,
        attribution_patch,
        grid_sites,
        heatmap,
        patch_sweep,
    )

    kinds = _kinds(args.points)
    loaded = load_model(args.model, args.adapter)
    model, adapter = loaded.model, loaded.adapter
    target, foil = _token_id(loaded, args.target), _token_id(loaded, args.foil)
    clean = adapter.prepare(model, [example(loaded, args.clean)])
    corrupted = adapter.prepare(model, [example(loaded, args.corrupted)])
    clean_ids, corrupted_ids = _ids(clean), _ids(corrupted)
    source_ids, target_ids = (
        (clean_ids, corrupted_ids) if args.direction == "denoise" else (corrupted_ids, clean_ids)
    )
    target_inputs = corrupted if args.direction == "denoise" else clean
    layout = target_inputs.layout
    n_layers = adapter.n_layers(model)
    answer_pos = max(layout.positions(0, ["text", "image_und", "cot"]))
    tokens = _labels(loaded, target_ids)
    if len(clean_ids) == len(corrupted_ids):  # mark the positions where the prompts differ: "clean/corrupted"
        pairs = zip(_labels(loaded, clean_ids), _labels(loaded, corrupted_ids))
        tokens = [c if c == r else f"{c}/{r}" for c, r in pairs]
    extra = layout.names(0)[len(target_ids) :]  # positions past the prompt (query tokens)
    labels = tokens + [f"{role[0]}{i}" for i, role in enumerate(extra)]
    if len(clean_ids) != len(corrupted_ids):
        if args.align != "end":
            raise ValueError(
                f"clean prompt has {len(clean_ids)} tokens, corrupted has {len(corrupted_ids)}: positions "
                "do not line up, so a position-by-position patch would be meaningless. Make the prompts "
                "the same length, or pass --align end to align their last tokens"
            )
        if layout.length != len(target_ids):
            raise ValueError("--align end works on plain prompts (no appended query tokens)")
        align = align_end(len(source_ids), len(target_ids))
        sites = align.sites(n_layers, kinds)
        sites.columns = [labels[t] for t, _ in align.pairs]
    else:
        sites = grid_sites(n_layers, layout.length, kinds, labels=labels)
    # -1 when the answer is read at the end: lets the engine skip recomputing earlier positions
    metric = LogitDiff(target, foil, position=-1 if answer_pos == layout.length - 1 else answer_pos)
    t0 = time.perf_counter()
    if args.method == "exact":
        result = patch_sweep(
            model, clean, corrupted, sites, metric, direction=args.direction, adapter=adapter,
            budget_bytes=int(args.budget_mb * 2**20),
        )  # fmt: skip
    else:
        result = attribution_patch(
            model, clean, corrupted, sites, metric, direction=args.direction, adapter=adapter
        )
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    data["model"] = args.model
    data["metric"] = {
        "name": "logit_diff",
        "target": {"text": args.target, "id": target},
        "foil": {"text": args.foil, "id": foil},
        "position": answer_pos,
    }
    data["prompts"] = {
        "clean": {"text": args.clean, "ids": clean_ids, "tokens": _labels(loaded, clean_ids)},
        "corrupted": {"text": args.corrupted, "ids": corrupted_ids, "tokens": _labels(loaded, corrupted_ids)},
    }
    data["axes"]["position_tokens"] = sites.columns
    data["timing"]["seconds"] = seconds
    (out / "patch.json").write_text(json.dumps(data, indent=1))
    png = heatmap(result, out / "patch.png", title=f"{args.model}: {args.method} patching ({args.direction})")
    grid = result.as_grid()
    print(
        f"{args.method} patching of {len(result.sites)} sites in {seconds:.2f}s; baselines clean "
        f"{result.clean:.4f}, corrupted {result.corrupted:.4f} (logit {args.target} − {args.foil})"
    )
    for note in result.info.get("notes", []):
        print(f"note: {note}")
    if result.clean == result.corrupted:
        print(
            "warning: the clean and corrupted baselines are equal, so normalised values are undefined (null)"
        )
    if grid.isfinite().any():
        flat = int(grid.nan_to_num(float("-inf")).argmax())
        k, rest = divmod(flat, grid.shape[1] * grid.shape[2])
        layer, col = divmod(rest, grid.shape[2])
        print(f"strongest site: {sites.kinds[k]} layer {sites.layers[layer]} at {sites.columns[col]!r}")
    print(f"wrote {out / 'patch.json'} and {png}")
    return 0
