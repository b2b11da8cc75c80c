"""The demo report's sentences, each computed from the statistic the figure beside it plots.

Two rules keep text and figures from disagreeing:

- **One definition of "readable"** (:data:`READABLE`), stated once in the report's opening
  (:func:`opening_paragraph`) and applied by every probe sentence through :func:`readable`; "best"
  is the highest *test accuracy* among readable probes (:func:`best_probe`) — the line the probe
  map draws — never a statistic the figure does not show (such as selectivity).
- **Every count and every measure says what it counts.** The gap table counts mapping items per A/B
  pair, GapEval per prompt; the gap table's "largest gap" is an understanding − generation accuracy
  difference per kind, GapEval's an IRT gap score per category. The sentences name both.

The functions take the numbers :mod:`uniprobe.experiments.demo_sections` returns (and writes beside
the report), so each sentence can be checked against its JSON file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

READABLE = (
    "**Readable** (used by every probe sentence below): a linear probe's 95% bootstrap interval of "
    "test accuracy has its lower end above both its *shuffled-label control* (the same probe trained "
    "on permuted labels: what it reaches without the answer; dashed in the probe maps) and the "
    "majority-class rate (dotted). **Best** is the layer with the highest test accuracy among the "
    "readable probes of a role — the solid line the probe maps draw."
)


def pct(x: float | None) -> str:
    """``0.523`` → ``"52%"``; ``None`` → ``"—"``."""
    return "—" if x is None else f"{100 * x:.0f}%"


# -- the opening: counts and the one definition ---------------------------------------------------
def item_counts(items: Sequence[Any]) -> dict[str, int]:
    """``{"prompts", "mapping_prompts", "mapping_pairs", "table"}`` for a list of test items.

    ``table`` is what the gap table's ``n`` column sums to: every item once, except mapping items,
    counted once per A/B pair (``group``) because a pair is right only if both its variants are.
    """
    mapping = [it for it in items if it.category == "mapping"]
    pairs = len({it.group for it in mapping})
    return {
        "prompts": len(items),
        "mapping_prompts": len(mapping),
        "mapping_pairs": pairs,
        "table": len(items) - len(mapping) + pairs,
    }


def opening_paragraph(items: Sequence[Any]) -> str:
    """The report's opening: what was run, how many test prompts of each category, and :data:`READABLE`."""
    c = item_counts(items)
    cats = Counter(it.category for it in items)
    per_cat = ", ".join(f"{n} {cat.replace('_', ' ')}" for cat, n in cats.items())
    return "\n\n".join(
        [
            "Two tiny unified models trained on the sandbox world (`artifacts/sandbox/RESULTS.md`), "
            f"{c['prompts']} test prompts ({per_cat}), each asked as a question (understanding) and "
            "as a drawing prompt (generation, judged exactly). For each model: the gap; where the "
            "answer becomes readable; where it is used; what CoT, STARS and R3 change.",
            f"Counts: the gap tables count the {c['mapping_prompts']} mapping prompts as "
            f"{c['mapping_pairs']} A/B pairs (a pair is right only if both variants are), so their n "
            f"column sums to {c['table']}; GapEval's tables count every prompt, mapping's "
            f"{c['mapping_prompts']} included.",
            READABLE,
        ]
    )


# -- 1. the gap ---------------------------------------------------------------------------------
def gap_paragraph(name: str, summary: dict) -> str:
    """The gap in words, from the per-kind summary (item-weighted accuracies of the gap table)."""
    d, r = summary["direct"], summary["reasoning"]
    kf, ki = summary["knowledge (forward)"], summary["knowledge (inverse)"]
    worst = min((r, kf, ki), key=lambda s: s["generation"] - s["understanding"])
    recovers = worst["generation_cot"] - worst["generation"] > 0.05
    diff = 100 * (worst["understanding"] - worst["generation"])
    return " ".join(
        [
            f"**{name}** draws {pct(d['generation'])} of direct prompts correctly.",
            f"Asked as questions, it answers {pct(kf['understanding'])} of forward and",
            f"{pct(ki['understanding'])} of inverse knowledge items, but draws them",
            f"{pct(kf['generation'])} and {pct(ki['generation'])} of the time; reasoning items",
            "(arithmetic and mapping together) are",
            f"understood {pct(r['understanding'])} and drawn {pct(r['generation'])}.",
            "The largest understanding − generation accuracy difference is on",
            f"{worst['kind']} ({pct(worst['understanding'])} understood vs {pct(worst['generation'])} drawn,",
            f"{diff:.0f} points);",
            f"explicit CoT {'recovers' if recovers else 'does not recover'} it",
            f"({pct(worst['generation'])} → {pct(worst['generation_cot'])}).",
        ]
    )


def gapeval_paragraph(gapeval: tuple) -> str:
    """GapEval's score in words, naming its measure so that it may rank categories differently."""
    score, cats, _ = gapeval
    worst = max(cats, key=lambda c: c.gap)
    best = min(cats, key=lambda c: c.gap)
    return " ".join(
        [
            "Fitting GapEval's two-dimensional IRT model to the joint outcomes (per category — arithmetic",
            "and mapping apart, where the table above pools them as reasoning — over every prompt) gives",
            f"a gap score of {score:.3f} (0 = no gap, mean over {len(cats)} categories).",
            "This measures the gap differently from the accuracy difference above: it scores",
            "δ = θ_text − θ_image between fitted text and image abilities, raised when both answers are",
            "often wrong and lowered when both are often right, so its largest category need not be the",
            "one with the largest accuracy difference.",
            f"Its largest category gap is on {worst.category} (gap score {worst.gap:.3f}: δ =",
            f"{worst.delta:+.2f}, {pct(worst.rates['10'])} of its {worst.n} prompts right in text only,",
            f"{pct(worst.rates['00'])} wrong both ways) and its smallest on {best.category}",
            f"({best.gap:.3f}).",
        ]
    )


# -- 2. where the answer becomes readable -------------------------------------------------------
def readable(r: dict) -> bool:
    """:data:`READABLE` for one probe row (``ci_low``, ``control``, ``chance``; ``None`` = unknown)."""
    lo = r.get("ci_low")
    if lo is None or r.get("control") is None:
        return False
    return lo > max(r["control"], r.get("chance") or 0.0)


def best_probe(rows: Sequence[dict]) -> tuple[dict, bool]:
    """``(row, is_readable)``: the readable row of highest test accuracy, or, when none is readable,
    the row of highest accuracy (what the figure's peak shows). Ties go to the earlier layer."""
    ok = [r for r in rows if readable(r)]
    pool = ok or [r for r in rows if r.get("accuracy") is not None] or list(rows)
    top = max(pool, key=lambda r: (r.get("accuracy") or 0.0, -(r.get("layer") or 0)))
    return top, bool(ok)


def _probe_phrase(r: dict) -> str:
    return (
        f"layer {r['layer']}: {pct(r['accuracy'])} (95% CI {pct(r['ci_low'])}–{pct(r['ci_high'])}; "
        f"shuffled-label control {pct(r['control'])}, majority class {pct(r.get('chance'))})"
    )


def _role_sentence(rows: Sequence[dict], where: str) -> str:
    top, ok = best_probe(rows)
    layers = sorted(r["layer"] for r in rows if readable(r) and r.get("layer") is not None)
    if ok:
        at = "layer" if len(layers) == 1 else "layers"
        return f"readable {where} — at {at} {', '.join(map(str, layers))}; best at {_probe_phrase(top)}"
    return f"not readable {where} at any layer — highest accuracy at {_probe_phrase(top)}"


def probe_paragraph(arch: str, rows: list[dict], gen_role: str | None = None) -> str:
    """Where the arithmetic answer is readable (:data:`READABLE`), per (run, role) of the probe map."""
    gen_role = gen_role or {"ar": "image_gen", "query": "query", "mot": "image_gen"}[arch]
    by_role: dict[str, list[dict]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r)
    return " ".join(
        [
            "Linear probes for the arithmetic answer (split grouped by drawn object): in the",
            "understanding run it is",
            _role_sentence(by_role["und:text"], "at the last prompt position") + ".",
            "In the generation run it is",
            _role_sentence(by_role["gen:text"], "at the prompt's last position") + ", and",
            _role_sentence(by_role[f"gen:{gen_role}"], f"at the {gen_role} positions where the model draws")
            + ".",
        ]
    )


def lens_paragraph(arch: str, summary: list[dict]) -> str:
    """Where the logit lens sees the answer word in generation runs (the peak of the lens figure)."""
    parts = []
    for group in ("arithmetic", "knowledge"):
        rows = [s for s in summary if s["group"] == group]
        if not rows:
            continue
        top = max(rows, key=lambda s: s["mean_prob"])
        parts.append(
            f"for {group} prompts the answer word is most visible at {top['role']} positions of layer "
            f"{top['layer']} (mean p = {top['mean_prob']:.2f}, top-1 at {pct(top['top1'])} of positions)"
        )
    return "Through the logit lens on the generation runs, " + "; ".join(parts) + "."


# -- 3. where it is used -------------------------------------------------------------------------
def patch_paragraph(arch: str, result: dict) -> str:
    """Which layers and positions carry the understood answer into the drawing (the heatmap's cells)."""
    from uniprobe.experiments.demo_sections import patch_peak

    grid = np.asarray(result["grid"], dtype=float)
    cols = result["columns"]
    tokens = result.get("tokens") or cols
    peak = patch_peak(result)
    layer, col = peak["layer"], cols.index(peak["column"])
    slot = grid[:, cols.index("answer slot")]
    carries = float(np.nanmax(slot)) > 0.5
    where = cols[col] if tokens[col] == cols[col] else f"{cols[col]} (`{tokens[col]}` in the first pair)"
    return " ".join(
        [
            "Understanding-run states written into generation runs of another expression (mean over",
            f"{len(result['pairs'])} item pairs; {result['metric']}: corrupted {result['corrupted']:.2f},",
            f"direct-prompt reference {result['clean']:.2f}). The largest normalised effect",
            "((patched − corrupted) / (clean − corrupted)) is",
            f"{grid[layer, col]:+.2f} at layer {layer}, position {where}.",
            "Writing the understanding run's <answer> state over <boi> has a largest effect of",
            f"{np.nanmax(slot):+.2f} (1 = the direct prompt's drawing): the understood answer",
            f"{'does' if carries else 'does not'} carry into the drawing from there.",
        ]
    )


# -- 4. what CoT and R3 change ---------------------------------------------------------------------
def cot_paragraph(summary: dict) -> str:
    """What writing the answer first (CoT) changes, per kind, from the gap summary."""
    parts = [
        f"{kind} {pct(summary[kind]['generation'])} → {pct(summary[kind]['generation_cot'])}"
        for kind in ("reasoning", "knowledge (forward)", "knowledge (inverse)")
        if kind in summary
    ]
    return (
        "With CoT (the model writes its own answer, then draws), drawing accuracy goes "
        + "; ".join(parts)
        + "."
    )


def r3_paragraph(r3: Any) -> str:
    """What the R3 loop changed, from its rounds (an :class:`~uniprobe.experiments.seeds.r3.R3Result`)."""
    first, last, one = r3.rounds[0], r3.rounds[-1], r3.rounds[1]
    later = r3.rounds[2:]
    still = all(r.improved == 0 and r.worse == 0 for r in later)
    tail = "later rounds change nothing" if later and still else "later rounds keep changing samples"
    return " ".join(
        [
            "The model judges its own drawing with its understanding and redraws when they disagree:",
            f"accuracy goes from {pct(first.accuracy)} to {pct(last.accuracy)} over",
            f"{len(r3.rounds) - 1} rounds ({pct(one.improved)} of samples improved and {pct(one.worse)}",
            f"got worse in round 1; {tail}).",
        ]
    )
