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
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from uniprobe.experiments import demo_sections as sections
from uniprobe.experiments.demo_resume import SectionLog, timing_table, written_since
from uniprobe.experiments.models import load_model
from uniprobe.experiments.progress import bar
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


SECTIONS = ("gap", "capture", "probes", "lens", "patching", "stars", "r3")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes. Smaller than the protocols' own defaults so that the demo takes minutes; every
    number it reports means what the full protocol's does (``uniprobe seeds stars`` runs STARS with
    :class:`~uniprobe.experiments.seeds.stars.StarsSettings`' defaults, ``uniprobe seeds r3`` 3 rounds)."""

    stars_prompts_per_level: int = 16  # the protocol's default: 64
    stars_steps: int = 50  # the protocol's default: 150
    r3_rounds: int = 2  # `uniprobe seeds r3`: 3
    patch_items: int = 6


class _ModelSections:
    """The sections of one model, each returning its report text (``{key: markdown}``); the model is
    loaded (and its sha256 checked) only if some section has to run."""

    def __init__(self, name: str, arch: str, out: Path, suite: Suite, settings: DemoSettings) -> None:
        self.name, self.arch, self.out, self.suite, self.settings = name, arch, out, suite, settings
        self.items = suite.items
        self._model = None
        self._stores: dict | None = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.name).model  # verifies the checkpoint's sha256
        return self._model

    def run(self, section: str) -> dict[str, str]:
        torch.manual_seed(0)  # each section seeded alike, so a resumed demo equals an uninterrupted one
        return getattr(self, f"_{section}")()

    def _gap(self) -> dict[str, str]:
        gap = sections.run_gap(self.model, self.items, self.out, self.name)
        print(gap["markdown"])
        name, (_, _, gapeval_md) = self.name, gap["gapeval"]
        text = "\n".join(
            [
                gap_paragraph(name, gap["summary"]),
                "",
                gap["markdown"],
                "",
                f"![drawings](drawings-{name}.png)",
            ]
            + ["", gapeval_paragraph(gap["gapeval"]), "", gapeval_md, "", f"![gap score](gapeval-{name}.png)"]
        )
        return {"gap": text, "cot": cot_paragraph(gap["summary"])}

    def _capture(self) -> dict[str, str]:
        self._stores = sections.capture_stores(self.model, self.items, self.out, self.arch)
        return {}

    def _probes(self) -> dict[str, str]:
        if self._stores is None:  # captured by an earlier, interrupted run: reopen
            from uniprobe.hooks.store import ActivationStore

            self._stores = {
                run: ActivationStore.open(self.out / f"store-{self.arch}-{run}") for run in ("und", "gen")
            }
        return {"probes": probe_paragraph(self.arch, sections.run_probes(self._stores, self.arch, self.out))}

    def _lens(self) -> dict[str, str]:
        return {
            "lens": lens_paragraph(self.arch, sections.run_lens(self.model, self.items, self.arch, self.out))
        }

    def _patching(self) -> dict[str, str]:
        patch = sections.run_patching(
            self.model, self.items, self.arch, self.out, n_items=self.settings.patch_items
        )
        return {"patch": patch_paragraph(self.arch, patch)}

    def _stars(self) -> dict[str, str]:
        from uniprobe.experiments.seeds.stars import StarsSettings, run_stars
        from uniprobe.experiments.seeds.stars_report import format_stars, stars_paragraph

        s = self.settings
        settings = StarsSettings(maps=False, steps=s.stars_steps, prompts_per_level=s.stars_prompts_per_level)
        stars = run_stars(self.model, self.out / f"stars-{self.name}", settings, suite=self.suite)
        table = format_stars(stars, paragraph=False).split("\n", 2)[2]  # without its title
        return {"stars": "**STARS self-training.** " + stars_paragraph(stars) + "\n\n" + table}

    def _r3(self) -> dict[str, str]:
        r3 = r3_loop(self.model, self.items, rounds=self.settings.r3_rounds)
        (self.out / f"r3-{self.name}.json").write_text(json.dumps(asdict(r3), indent=1))
        return {"r3": "**R3.** " + r3_paragraph(r3) + "\n\n" + format_r3(r3)}


def model_report(name: str, arch: str, text: dict[str, str]) -> list[str]:
    """One model's part of the report, from its sections' text."""
    return [
        f"## {name}", "", "### 1. The gap", "", text["gap"], "",
        "### 2. Where the answer becomes readable (probes, logit lens)", "", text["probes"], text["lens"], "",
        f"![probe map](probe-map-{arch}.png) ![logit lens](lens-{arch}.png)", "",
        "### 3. Where it is used (patching)", "", text["patch"], "", f"![patching map](patch-{arch}.png)", "",
        "### 4. What CoT, STARS and R3 change", "", text["cot"], "", text["stars"], "",
        f"![STARS](stars-{name}/stars.png)", "", text["r3"], "",
        f"Stores: `store-{arch}-und` (understanding form of every item) and `store-{arch}-gen` "
        "(generation form: prompt and drawing positions); reopen with `uniprobe inspect`.", "",
    ]  # fmt: skip


def settings_paragraph(settings: DemoSettings) -> str:
    """The demo's sizes next to the full protocols'."""
    from uniprobe.experiments.seeds.stars import StarsSettings

    full = StarsSettings()
    return " ".join(
        [
            "The demo runs smaller protocols than the full ones: STARS on",
            f"{settings.stars_prompts_per_level} prompts per level for {settings.stars_steps} steps (the",
            f"full protocol, `uniprobe seeds stars`: {full.prompts_per_level} and {full.steps}), R3 for",
            f"{settings.r3_rounds} rounds (`uniprobe seeds r3`: 3), patching on {settings.patch_items} item",
            "pairs. Each number means what the full protocol's does.",
        ]
    )


def run_demo(
    out: str | Path = "artifacts/demo",
    stars_steps: int | None = None,
    settings: DemoSettings | None = None,
    progress: bool = True,
) -> int:
    """Run every section for both sandbox models; write ``report.md`` and ``report.html``; returns 0.

    Per model, in the order the report answers them: the gap table (and GapEval score); where the
    answer becomes readable (probe and logit-lens maps); where it is used (patching map); what CoT,
    STARS self-training and the R3 loop change. A section finished by an earlier run with the same
    ``out`` and settings is kept, not run again (:mod:`uniprobe.experiments.demo_resume`). The report
    ends with the seconds each section took. ``progress=False`` (or ``TQDM_DISABLE``) hides the bars.
    """
    from uniprobe.experiments.report_html import write_html

    settings = settings or DemoSettings()
    if stars_steps:
        settings = replace(settings, stars_steps=stars_steps)
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(0)
    log = SectionLog(out / "sections", identity=asdict(settings))
    records: dict[tuple[str, str], dict] = {}
    report = [
        "# uniprobe demo: does understanding flow into generation?",
        "",
        "Two tiny unified models trained on the sandbox world (`artifacts/sandbox`), "
        f"{len(suite.items)} test items, each asked as a question (understanding) and as a drawing prompt "
        "(generation, judged exactly). For each model: the gap; where the answer becomes readable; where "
        "it is used; what CoT, STARS and R3 change.",
        "",
    ]
    # the sections' bar only on a terminal: nested bars in a log are cursor codes; there, one line each
    lines = progress and not sys.stderr.isatty()
    with bar(
        total=len(MODELS) * len(SECTIONS), desc="demo", unit="section", progress=progress and not lines
    ) as pbar:
        for name, arch in MODELS:
            print(f"== {name}")
            run = _ModelSections(name, arch, out, suite, settings)
            text: dict[str, str] = {}
            for section in SECTIONS:
                pbar.set_description(f"demo: {name} {section}")
                if lines:
                    step = len(records) + 1
                    print(f"demo: {name} {section} ({step}/{len(MODELS) * len(SECTIONS)})", file=sys.stderr)
                record = log.get(name, section)
                if record is not None:
                    record["kept"] = True
                    pbar.write(f"{name} {section}: kept from an earlier run", file=sys.stderr)
                else:
                    since, w, c = time.time(), time.perf_counter(), time.process_time()
                    part = run.run(section)
                    spent = (time.perf_counter() - w, time.process_time() - c)
                    record = log.put(name, section, part, spent, written_since(out, since))
                records[(name, section)] = record
                text.update(record["text"])
                pbar.update(1)
            report += model_report(name, arch, text)
    kept = any(r.get("kept") for r in records.values())
    report += [
        "## Where the time went",
        "",
        settings_paragraph(settings),
        "",
        timing_table(records, [m for m, _ in MODELS], list(SECTIONS)),
        "",
        "Wall seconds measured in this run"
        + (" (`*`: a section kept from an earlier, interrupted run, with that run's seconds)" if kept else "")
        + f"; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"_Generated by `uniprobe demo` in {time.perf_counter() - t0:.0f} s "
        f"({time.process_time() - c0:.0f} s CPU)._",
    ]
    md = "\n".join(report) + "\n"
    (out / "report.md").write_text(md)
    write_html(md, out / "report.html", title="uniprobe demo")
    print(f"wrote {out / 'report.md'} and report.html ({time.perf_counter() - t0:.0f} s)")
    if kept:
        n = sum(1 for r in records.values() if r.get("kept"))
        print(f"{n} sections were kept from an earlier run; delete {out / 'sections'} to run them all again")
    return 0
