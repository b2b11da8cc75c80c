"""The built-in demo: what ``make demo`` runs (a few minutes on 2 cores after install).

For both shipped sandbox models (sha256-verified): the gap table (understanding vs generation vs
generation with CoT, judged exactly) and GapEval score, drawings beside their prompts, activation
stores of every test item in both forms, the probe map and the logit-lens map of the answer, a
patching map from understanding runs into generation runs, STARS self-training (on a copy) and the
R3 loop. Everything lands in ``artifacts/demo/`` with ``report.md`` and ``report.html``; each
sentence of the report is computed from the numbers beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from uniprobe.experiments import demo_sections as sections
from uniprobe.experiments.models import load_model
from uniprobe.experiments.seeds.r3 import R3Result, format_r3, r3_loop
from uniprobe.experiments.tasks.suite import Suite

MODELS = (("sandbox-ar", "ar"), ("sandbox-query", "query"))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def gap_paragraph(name: str, summary: dict) -> str:
    """The gap in words, from the per-kind summary."""
    d, r = summary["direct"], summary["reasoning"]
    kf, ki = summary["knowledge (forward)"], summary["knowledge (inverse)"]
    worst = min((r, kf, ki), key=lambda s: s["generation"] - s["understanding"])
    recovers = worst["generation_cot"] - worst["generation"] > 0.05
    return " ".join(
        [
            f"**{name}** draws {pct(d['generation'])} of direct prompts correctly.",
            f"Asked as questions, it answers {pct(kf['understanding'])} of forward and",
            f"{pct(ki['understanding'])} of inverse knowledge items, but draws them",
            f"{pct(kf['generation'])} and {pct(ki['generation'])} of the time; reasoning items are",
            f"understood {pct(r['understanding'])} and drawn {pct(r['generation'])}.",
            f"The largest gap is on {worst['kind']} ({pct(worst['understanding'])} understood vs",
            f"{pct(worst['generation'])} drawn);",
            f"explicit CoT {'recovers' if recovers else 'does not recover'} it",
            f"({pct(worst['generation'])} → {pct(worst['generation_cot'])}).",
        ]
    )


def gapeval_paragraph(gapeval: tuple) -> str:
    """The GapEval score in words: its value and the category that drives it."""
    score, cats, _ = gapeval
    worst = max(cats, key=lambda c: c.gap)
    best = min(cats, key=lambda c: c.gap)
    return " ".join(
        [
            "Fitting GapEval's two-dimensional IRT model to the joint outcomes gives",
            f"a gap score of {score:.3f}",
            f"(0 = no gap). It is largest on {worst.category} (gap {worst.gap:.3f}: δ = θ_text − θ_image =",
            f"{worst.delta:+.2f}, {pct(worst.rates['10'])} of items right in text only) and smallest on",
            f"{best.category} ({best.gap:.3f}).",
        ]
    )


def r3_paragraph(r3: R3Result) -> str:
    """What the R3 loop changed, from its rounds."""
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


def _readable(r: dict) -> bool:
    """Above its shuffled-label control and the majority-class rate, with the CI's lower end."""
    return r["ci_low"] > max(r["control"], r.get("chance", 0.0))


def _probe_phrase(r: dict) -> str:
    return (
        f"layer {r['layer']}: {pct(r['accuracy'])} (95% CI {pct(r['ci_low'])}–{pct(r['ci_high'])}; "
        f"control {pct(r['control'])}, majority class {pct(r.get('chance', 0.0))})"
    )


def probe_paragraph(arch: str, rows: list[dict]) -> str:
    """Where the arithmetic answer becomes readable, and whether it is at the drawing positions."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["role"] not in best or r["selectivity"] > best[r["role"]]["selectivity"]:
            best[r["role"]] = r
    und, prompt = best["und:text"], best["gen:text"]
    draw_role = f"gen:{sections.GEN_ROLE[arch]}"
    draw = best[draw_role]
    return " ".join(
        [
            "Linear probes for the arithmetic answer (split grouped by drawn object):",
            f"in the understanding run it is {'readable' if _readable(und) else 'not reliably readable'}",
            f"at the last prompt position, best at {_probe_phrase(und)}.",
            f"In the generation run it is {'readable' if _readable(prompt) else 'not readable'} at the",
            f"prompt's last position (best at {_probe_phrase(prompt)}) and",
            f"{'readable' if _readable(draw) else 'not readable'} at the {draw_role[4:]} positions where the",
            f"model draws (best at {_probe_phrase(draw)}).",
        ]
    )


def lens_paragraph(arch: str, summary: list[dict]) -> str:
    """Where the logit lens sees the answer word in generation runs."""
    parts = []
    for group in ("arithmetic", "knowledge"):
        rows = [s for s in summary if s["group"] == group]
        top = max(rows, key=lambda s: s["mean_prob"])
        parts.append(
            f"for {group} prompts the answer word is most visible at {top['role']} positions of layer "
            f"{top['layer']} (mean p = {top['mean_prob']:.2f}, top-1 at {pct(top['top1'])} of positions)"
        )
    return "Through the logit lens on the generation runs, " + "; ".join(parts) + "."


def patch_paragraph(arch: str, result: dict) -> str:
    """Which layers and positions carry the understood answer into the drawing."""
    grid = np.asarray(result["grid"])
    cols = result["columns"]
    layer, col = np.unravel_index(np.nanargmax(grid), grid.shape)
    slot = grid[:, cols.index("answer slot")]
    carries = float(np.nanmax(slot)) > 0.5
    return " ".join(
        [
            "Understanding-run states written into generation runs of another expression (mean over",
            f"{len(result['pairs'])} item pairs; {result['metric']}: corrupted {result['corrupted']:.2f},",
            f"direct-prompt reference {result['clean']:.2f}). The largest normalised effect is",
            f"{grid[layer, col]:+.2f} at layer {layer}, position {cols[col]}.",
            "Writing the understanding run's <answer> state over <boi> has a largest effect of",
            f"{np.nanmax(slot):+.2f} (1 = the direct prompt's drawing): the understood answer",
            f"{'does' if carries else 'does not'} carry into the drawing from there.",
        ]
    )


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


def run_demo(out: str | Path = "artifacts/demo", stars_steps: int | None = None) -> int:
    """Run every section for both sandbox models; write ``report.md`` and ``report.html``; returns 0.

    Per model, in the order the report answers them: the gap table (and GapEval score); where the
    answer becomes readable (probe and logit-lens maps); where it is used (patching map); what CoT,
    STARS self-training and the R3 loop change.
    """
    from uniprobe.experiments.report_html import write_html
    from uniprobe.experiments.seeds.stars import StarsSettings, run_stars
    from uniprobe.experiments.seeds.stars_report import format_stars, stars_paragraph

    t0 = time.time()
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(0)
    items = suite.items
    report = [
        "# uniprobe demo: does understanding flow into generation?",
        "",
        f"Two tiny unified models trained on the sandbox world (`artifacts/sandbox`), {len(items)} test "
        "items, each asked as a question (understanding) and as a drawing prompt (generation, judged "
        "exactly). For each model: the gap; where the answer becomes readable; where it is used; what "
        "CoT, STARS and R3 change.",
        "",
    ]
    for name, arch in MODELS:
        print(f"== {name}")
        loaded = load_model(name)  # verifies the checkpoint's sha256
        model = loaded.model
        gap = sections.run_gap(model, items, out, name)
        print(gap["markdown"])
        stores = sections.capture_stores(model, items, out, arch)
        probes = sections.run_probes(stores, arch, out)
        lens = sections.run_lens(model, items, arch, out)
        patch = sections.run_patching(model, items, arch, out, n_items=12)
        settings = StarsSettings(maps=False, **({"steps": stars_steps} if stars_steps else {}))
        stars = run_stars(model, out / f"stars-{name}", settings, suite=suite, progress=False)
        r3 = r3_loop(model, items, rounds=2)
        (out / f"r3-{name}.json").write_text(json.dumps(asdict(r3), indent=1))
        report += [
            f"## {name}",
            "",
            "### 1. The gap",
            "",
            gap_paragraph(name, gap["summary"]),
            "",
            gap["markdown"],
            "",
            f"![drawings](drawings-{name}.png)",
            "",
            gapeval_paragraph(gap["gapeval"]),
            "",
            gap["gapeval"][2],
            "",
            f"![gap score](gapeval-{name}.png)",
            "",
            "### 2. Where the answer becomes readable (probes, logit lens)",
            "",
            probe_paragraph(arch, probes),
            lens_paragraph(arch, lens),
            "",
            f"![probe map](probe-map-{arch}.png) ![logit lens](lens-{arch}.png)",
            "",
            "### 3. Where it is used (patching)",
            "",
            patch_paragraph(arch, patch),
            "",
            f"![patching map](patch-{arch}.png)",
            "",
            "### 4. What CoT, STARS and R3 change",
            "",
            cot_paragraph(gap["summary"]),
            "",
            "**STARS self-training.** " + stars_paragraph(stars),
            "",
            format_stars(stars, paragraph=False).split("\n", 2)[2],  # without its title
            "",
            f"![STARS](stars-{name}/stars.png)",
            "",
            "**R3.** " + r3_paragraph(r3),
            "",
            format_r3(r3),
            "",
            f"Stores: `store-{arch}-und` (understanding form of every item) and `store-{arch}-gen` "
            "(generation form: prompt and drawing positions); reopen with `uniprobe inspect`.",
            "",
        ]
    report.append(f"_Generated by `uniprobe demo` in {time.time() - t0:.0f} s._")
    md = "\n".join(report) + "\n"
    (out / "report.md").write_text(md)
    write_html(md, out / "report.html", title="uniprobe demo")
    print(f"wrote {out / 'report.md'} and report.html ({time.time() - t0:.0f} s)")
    return 0
