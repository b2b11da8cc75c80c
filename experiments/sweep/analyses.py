"""The analyses a run can do, each a thin call into the toolkit's own functions.

    probe    uniprobe.probes.linear.probe_store on the run's store → probe/ (results.json/.csv, probe_map.png)
    lens     uniprobe.probes.lens.logit_lens_store on the store, each example's answer tokens → lens/
             (headline: at each example's last decoded position)
    patch    uniprobe.experiments.patching.patch_pair on pairs of the task's prompts → patch/pair-K/;
             ``across: true``: the demo's understanding → generation patching (sandbox arithmetic)
    attention  uniprobe.experiments.attention.attention_prompt on the task's first prompts →
             attention/prompt-K/ (patterns, mass query → key roles per layer × head, role-band maps)
    knockout uniprobe.experiments.attention.knockout_prompt (layers × key groups) → knockout/prompt-K/
    steer    uniprobe.experiments.steering.steer_prompt: each pair's corrupted prompt steered along the clean
             − corrupted state at points × alphas → steer/pair-K/
    gapeval  the GapEval gap score of the task's items (sandbox) → gapeval/
    r3       the R3 regenerate loop on the task's items (sandbox) → r3/

Capture lives in :mod:`uniprobe.experiments.sweep.runner` (it is the part shared between ranks). Each function
takes a :class:`RunContext` and returns its headline: a flat dict of numbers and short strings.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniprobe.experiments.models import LoadedModel
from uniprobe.experiments.tasks.prompts import Item


@dataclass
class RunContext:
    """What an analysis of one run sees.

    Attributes:
        run: the resolved run config (``id``, ``model``, ``task``, ``analyses``, sections).
        dir: the run directory.
        loaded: the model.
        examples: the task's examples, as captured.
        items: the sandbox items behind them (``None`` for a prompts task).
    """

    run: dict
    dir: Path
    loaded: LoadedModel
    examples: list[dict]
    items: list[Item] | None

    @property
    def store(self) -> Path:
        return self.dir / "store"


def probe(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.probes.linear import probe_store

    cfg = ctx.run["probe"]
    res = probe_store(
        ctx.store, cfg["label"], points=cfg["points"] or ctx.run["capture"]["points"],
        roles=None if cfg["roles"] is None else [r.split("+") for r in cfg["roles"]], reduce=cfg["reduce"],
        group_by=cfg["group_by"], method=cfg["method"], folds=cfg["folds"], seed=ctx.run["seed"],
        test_size=cfg["test_size"], n_boot=cfg["n_boot"], step=cfg["step"], branch=cfg["branch"],
    )  # fmt: skip
    res.save(ctx.dir / "probe")
    best = res.best()
    return {
        "probes": len(res),
        "best_accuracy": best["accuracy"],
        "best_point": best["point"],
        "best_role": best["role"],
        "best_selectivity": best.get("selectivity"),
    }


def lens(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.lensing import token_str
    from uniprobe.probes.lens import logit_lens_store

    cfg = ctx.run["lens"]
    answers = answer_ids(ctx, cfg["answers"])
    res = logit_lens_store(
        ctx.store, ctx.loaded.model, answers, adapter=ctx.loaded.adapter,
        points=cfg["points"] or ctx.run["capture"]["points"], roles=cfg["roles"], step=cfg["step"],
        branch=cfg["branch"], token_str=token_str(ctx.loaded),
    )  # fmt: skip
    res.meta["title"] = f"{ctx.run['id']}: logit lens on the answers"
    res.save(ctx.dir / "lens")
    return lens_headline(res.rows, ctx.store)


def lens_headline(rows: list[dict], where: Path) -> dict[str, Any]:
    """Logit lens at each example's last decoded position (latest step): the layer where the answer
    is most probable, and how probable / how often top-1 it is at the last layer."""
    last_pos: dict[Any, tuple[int, int]] = {}
    for r in rows:
        key = (r["step"], r["pos"])
        last_pos[r["example"]] = max(last_pos.get(r["example"], key), key)
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r["lens"] == "logit" and (r["step"], r["pos"]) == last_pos[r["example"]]:
            by_layer[r["layer"]].append(r)
    if not by_layer:
        raise ValueError(f"lens: no residual rows to decode in {where}")
    mean_prob = {layer: sum(r["prob"] for r in rr) / len(rr) for layer, rr in by_layer.items()}
    best, last = max(mean_prob, key=mean_prob.get), max(by_layer)
    return {
        "best_layer": best,
        "best_prob": mean_prob[best],
        "last_layer_prob": mean_prob[last],
        "last_layer_top1": sum(r["rank"] == 1 for r in by_layer[last]) / len(by_layer[last]),
    }


def answer_ids(ctx: RunContext, answers: str | list) -> list[list[int]] | list[int]:
    """Token ids the lens reports: from ``label:KEY`` (each example's own answer words) or a list.
    Words and ints are words (label ``3`` is the word 3); only ``id:N`` names a token id."""
    if isinstance(answers, list):
        return [i for a in answers for i in _word_ids(ctx.loaded, a)]
    key = answers.removeprefix("label:")
    out = []
    for ex in ctx.examples:
        value = ex.get("labels", {}).get(key)
        if value is None:
            raise ValueError(f"lens.answers: example {ex.get('id')!r} has no label {key!r}")
        out.append(_word_ids(ctx.loaded, value))
    return out


def _word_ids(loaded: LoadedModel, value: Any) -> list[int]:
    """An answer's token ids (:func:`uniprobe.experiments.tokens.parse_token`): a list is its items,
    a string one token per word (or ``id:N``), an int the word of that number (sandbox answers)."""
    from uniprobe.experiments.tokens import parse_token

    if isinstance(value, list):
        return [i for v in value for i in _word_ids(loaded, v)]
    return [parse_token(loaded, w) for w in str(value).split()]


# -- patching -------------------------------------------------------------------------------------
def patch(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.run["patch"]
    if cfg["across"]:
        return _patch_across(ctx, cfg)
    from uniprobe.experiments.patching import patch_pair

    pairs = cfg["pairs"] or auto_pairs(ctx, cfg["n_pairs"])
    peaks = []
    for k, pair in enumerate(pairs):
        res = patch_pair(
            ctx.loaded, pair["clean"], pair["corrupted"], pair["target"], pair["foil"], kinds=cfg["kinds"],
            method=cfg["method"], direction=cfg["direction"], budget_mb=cfg["budget_mb"],
        )  # fmt: skip
        res.write(ctx.dir / "patch" / f"pair-{k}")
        peaks.append(_peak(res.data.get("grid_normalised")))
    (ctx.dir / "patch" / "pairs.json").write_text(json.dumps(pairs, indent=1) + "\n")
    finite = [p for p in peaks if p is not None]
    return {"pairs": len(pairs), "peak_mean": sum(finite) / len(finite) if finite else None}


def _peak(grid: Any) -> float | None:
    """Largest finite value of a nested list (``None`` entries are undefined cells)."""
    flat: list[float] = []
    stack = [grid]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, int | float) and math.isfinite(x):
            flat.append(float(x))
    return max(flat) if flat else None


def auto_pairs(ctx: RunContext, n: int) -> list[dict[str, str]]:
    """Up to ``n`` clean/corrupted pairs from the task's prompts: equal token length, different
    one-token answers (label ``answer``). Prompts with images are skipped."""
    from uniprobe.experiments.models import encode
    from uniprobe.experiments.patching import token_id

    cands = []
    for text, ex in zip(prompt_texts(ctx), ctx.examples, strict=True):
        answer = ex.get("labels", {}).get("answer")
        if text is None or answer is None:
            continue
        try:
            token_id(ctx.loaded, str(answer))
        except (ValueError, KeyError):
            continue
        cands.append((text, str(answer), len(encode(ctx.loaded, text))))
    pairs = []
    for i, (text, answer, length) in enumerate(cands):
        for other, other_answer, other_length in cands[i + 1 :] + cands[:i]:
            if other_length == length and other_answer != answer:
                pairs.append({"clean": text, "corrupted": other, "target": answer, "foil": other_answer})
                break
        if len(pairs) == n:
            break
    if not pairs:
        raise ValueError(
            f"patch: no pair of prompts in task {ctx.run['task']['name']!r} with equal token lengths and "
            "different one-token answers; give patch.pairs explicitly ({clean, corrupted, target, foil})"
        )
    return pairs


def prompt_texts(ctx: RunContext) -> list[str | None]:
    """The text of each example's prompt (``None`` when it has images or only token ids)."""
    if ctx.items is not None:
        return [None if ex["prompt"].images else ex["prompt"].text for ex in ctx.examples]
    lines = [json.loads(x) for x in Path(ctx.run["task"]["prompts"]).read_text().splitlines() if x.strip()]
    return [line.get("text") for line in lines][: len(ctx.examples)]


def _patch_across(ctx: RunContext, cfg: dict) -> dict[str, Any]:
    from uniprobe.experiments.demo_sections import run_patching

    out = ctx.dir / "patch"
    out.mkdir(parents=True, exist_ok=True)
    arch = ctx.loaded.info["arch"]
    res = run_patching(ctx.loaded.model, ctx.items, arch, out, n_items=cfg["n_pairs"])
    return {
        "pairs": len(res["pairs"]),
        "across_peak": _peak(res["grid"]),
        "clean": res["clean"],
        "corrupted": res["corrupted"],
    }


# -- attention --------------------------------------------------------------------------------------
def _mode(ctx: RunContext, cfg: dict) -> str:
    return cfg["mode"] if cfg["mode"] != "auto" else (ctx.run["task"].get("form") or "understanding")


def _texts(ctx: RunContext, n: int, what: str) -> list[tuple[str, dict]]:
    texts = [(t, ex) for t, ex in zip(prompt_texts(ctx), ctx.examples, strict=True) if t is not None][:n]
    if not texts:
        raise ValueError(f"{what}: task {ctx.run['task']['name']!r} has no text prompts (only images or ids)")
    return texts


def attention(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.attention import attention_prompt

    cfg = ctx.run["attention"]
    masses = []
    for k, (text, _) in enumerate(_texts(ctx, cfg["n_prompts"], "attention")):
        run = attention_prompt(
            ctx.loaded, text, query_roles=cfg["query_roles"], key_roles=cfg["key_roles"],
            layers=cfg["layers"], mode=_mode(ctx, cfg), name=ctx.run["id"],
        )  # fmt: skip
        run.write(ctx.dir / "attention" / f"prompt-{k}")
        masses.append(run.table.values)
    mean = sum(masses) / len(masses)  # [layer, head]
    layer, head = divmod(int(mean.nan_to_num(-1).argmax()), mean.shape[1])
    return {"prompts": len(masses), "mass_mean": float(mean.nanmean()), "mass_peak": float(mean[layer, head]),
            "peak_layer": run.layers[layer], "peak_head": head}  # fmt: skip


def knockout(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.attention import knockout_prompt

    cfg = ctx.run["knockout"]
    changes = []
    for k, (text, ex) in enumerate(_texts(ctx, cfg["n_prompts"], "knockout")):
        target = cfg["target"]
        if target == "label:answer":
            target = ex.get("labels", {}).get("answer")
            if target is None:
                raise ValueError(f"knockout.target: example {ex.get('id')!r} has no label 'answer'")
        run = knockout_prompt(
            ctx.loaded, text, cfg["keys"], target=str(target), foil=cfg["foil"], query=cfg["query"],
            layers=cfg["layers"], window=cfg["window"], heads=cfg["heads"], mode=_mode(ctx, cfg),
            budget_mb=cfg["budget_mb"], name=ctx.run["id"],
        )  # fmt: skip
        run.write(ctx.dir / "knockout" / f"prompt-{k}")
        res = run.result
        grid = res.as_grid(False)[0] - res.clean  # [layer, group]: change from the unknocked run
        layer, col = divmod(int(grid.abs().nan_to_num(-1).argmax()), grid.shape[1])
        changes.append((float(grid[layer, col]), res.grid.layers[layer], res.grid.columns[col]))
    change, layer, group = max(changes, key=lambda c: abs(c[0]))
    return {"prompts": len(changes), "largest_change": change, "at_layer": layer, "key_group": group}


# -- sandbox protocols ------------------------------------------------------------------------------
def gapeval(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.seeds.protocols import gapeval_report

    score, _, results = gapeval_report(ctx.loaded.model, ctx.items, ctx.dir / "gapeval", title=ctx.run["id"])
    n = len(results)
    return {
        "score": score,
        "understanding": sum(r["understanding"] for r in results) / n,
        "generation": sum(r["generation"] for r in results) / n,
    }


def r3(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.seeds.protocols import r3_report

    res = r3_report(
        ctx.loaded.model, ctx.items, ctx.dir / "r3", rounds=ctx.run["r3"]["rounds"], title=ctx.run["id"]
    )
    return {
        "samples": len(res.items),
        "accuracy_start": res.rounds[0].accuracy,
        "accuracy_end": res.rounds[-1].accuracy,
    }


# -- steering -------------------------------------------------------------------------------------
def steer(ctx: RunContext) -> dict[str, Any]:
    from uniprobe.experiments.steering import steer_prompt

    cfg = ctx.run["steer"]
    try:
        pairs = cfg["pairs"] or auto_pairs(ctx, cfg["n_pairs"])
    except ValueError as err:
        raise ValueError(str(err).replace("patch", "steer")) from err
    gains = []
    for k, pair in enumerate(pairs):
        res = steer_prompt(
            ctx.loaded, pair["corrupted"], points=cfg["points"], alphas=cfg["alphas"], target=pair["target"],
            foil=pair["foil"], toward=pair["clean"], away=pair["corrupted"], role=cfg["role"],
            budget_mb=cfg["budget_mb"], name=ctx.run["id"],
        )  # fmt: skip
        res.write(ctx.dir / "steer" / f"pair-{k}")
        gains.append(float((res.result.values - res.result.plain).max()))
    (ctx.dir / "steer" / "pairs.json").write_text(json.dumps(pairs, indent=1) + "\n")
    return {"pairs": len(pairs), "gain_mean": sum(gains) / len(gains), "gain_max": max(gains)}


ANALYSIS_FUNCTIONS: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "probe": probe,
    "lens": lens,
    "patch": patch,
    "attention": attention,
    "knockout": knockout,
    "steer": steer,
    "gapeval": gapeval,
    "r3": r3,
}
