"""The built-in demo: what ``make demo`` runs (a few minutes on 2 cores after install).

For each shipped sandbox model (sha256-verified; AR, query-based, MoT; ``models`` picks some): the
gap table (understanding vs generation vs generation with CoT, judged exactly) and GapEval score,
drawings beside their prompts, activation stores of the test items in both forms, the probe map and
the logit-lens map of the answer, a patching map from understanding runs into generation runs, how
the answer travels (attention mass, knockout, steering: :mod:`uniprobe.experiments.demo_attention`),
STARS self-training (on a copy) and the R3 loop. Everything lands in ``artifacts/demo/`` with
``report.md`` and ``report.html``; each sentence of the report is computed from the numbers beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from uniprobe.experiments import demo_sections as sections
from uniprobe.experiments.demo_resume import SectionLog, timing_table, written_since
from uniprobe.experiments.demo_text import (
    cot_paragraph,
    gap_paragraph,
    gapeval_paragraph,
    lens_paragraph,
    opening_paragraph,
    patch_paragraph,
    probe_paragraph,
    r3_paragraph,
)
from uniprobe.experiments.models import load_model
from uniprobe.experiments.progress import bar
from uniprobe.experiments.seeds.r3 import format_r3, r3_loop
from uniprobe.experiments.tasks.suite import Suite
from uniprobe.hooks.errors import UsageError

MODELS = (("sandbox-ar", "ar"), ("sandbox-query", "query"), ("sandbox-mot", "mot"))


SECTIONS = ("gap", "capture", "probes", "lens", "patching", "attention", "stars", "r3")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes. Smaller than the protocols' own defaults so that the demo takes minutes; every
    number it reports means what the full protocol's does (``uniprobe seeds stars`` runs STARS with
    :class:`~uniprobe.experiments.seeds.stars.StarsSettings`' defaults, ``uniprobe seeds r3`` 3 rounds)."""

    stars_prompts_per_level: int = 16  # the protocol's default: 64
    stars_steps: int = 50  # the protocol's default: 150
    r3_rounds: int = 2  # `uniprobe seeds r3`: 3
    patch_items: int = 6
    attention_items: int = 4  # "How does the answer travel?": understood level-2 arithmetic items
    # sandbox-mot draws by flow: 8 Euler steps × 2 CFG passes, each a full forward over both experts,
    # so one drawing costs ~16 of the AR model's cached steps; its gap table, stores, logit lens and
    # R3 run on every arithmetic item (the probe map's) and every `mot_item_stride`-th item of each
    # other category (patching, attention, STARS
    # pick their own items as for the other models). Each number means what it does for the others;
    # only n is smaller.
    mot_item_stride: int = 3


WHOLE = ("arithmetic",)  # the probe map's items: 4 folds need every answer class several times


def thin(items: list, stride: int, whole: tuple[str, ...] = WHOLE) -> list:
    """Every ``stride``-th item group of each category (an item alone, or a mapping A/B pair — the
    gap table counts a pair as one), in the suite's order; every category is kept, and every item of
    the categories in ``whole``."""
    if not isinstance(stride, int) or stride < 1:
        raise UsageError(f"mot_item_stride={stride!r}: use a whole number of at least 1 (1: every item)")
    groups: dict[str, list[str]] = {}
    for it in items:
        seen = groups.setdefault(it.category, [])
        if it.group not in seen:
            seen.append(it.group)
    keep = {g for cat, seen in groups.items() for g in (seen if cat in whole else seen[::stride])}
    return [it for it in items if it.group in keep]


class _ModelSections:
    """The sections of one model, each returning its report text (``{key: markdown}``); the model is
    loaded (and its sha256 checked) only if some section has to run."""

    def __init__(self, name: str, arch: str, out: Path, suite: Suite, settings: DemoSettings) -> None:
        self.name, self.arch, self.out, self.suite, self.settings = name, arch, out, suite, settings
        # sandbox-mot: a stated subset for its item-wide sections (DemoSettings.mot_item_stride)
        self.items = thin(suite.items, settings.mot_item_stride) if arch == "mot" else suite.items
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
            self.model, self.suite.items, self.arch, self.out, n_items=self.settings.patch_items
        )
        return {"patch": patch_paragraph(self.arch, patch)}

    def _attention(self) -> dict[str, str]:
        from uniprobe.experiments.demo_attention import run_attention
        from uniprobe.experiments.demo_attention_text import attention_paragraph

        att = run_attention(
            self.model, self.suite.items, self.arch, self.out, n_items=self.settings.attention_items
        )
        return {"attention": attention_paragraph(att)}

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


def model_report(name: str, arch: str, text: dict[str, str], n_items: int | None = None) -> list[str]:
    """One model's part of the report, from its sections' text; ``n_items``: how many test items its
    stores hold (None: every item)."""
    which = "every item" if n_items is None else f"its {n_items} items"
    return [
        f"## {name}", "", "### 1. The gap", "", text["gap"], "",
        "### 2. Where the answer becomes readable (probes, logit lens)", "", text["probes"], text["lens"], "",
        f"![probe map](probe-map-{arch}.png) ![logit lens](lens-{arch}.png)", "",
        "### 3. Where it is used (patching)", "", text["patch"], "", f"![patching map](patch-{arch}.png)", "",
        "### 4. How does the answer travel? (attention knockout, steering)", "", text["attention"], "",
        f"![attention mass](attn-mass-{arch}.png) ![knockout and steering](attn-flow-{arch}.png)", "",
        "### 5. What CoT, STARS and R3 change", "", text["cot"], "", text["stars"], "",
        f"![STARS](stars-{name}/stars.png)", "", text["r3"], "",
        f"Stores: `store-{arch}-und` (understanding form of {which}) and `store-{arch}-gen` "
        "(generation form: prompt and drawing positions); reopen with `uniprobe inspect`.", "",
    ]  # fmt: skip


def settings_paragraph(
    settings: DemoSettings, items: list | None = None, models: list[str] | None = None
) -> str:
    """The demo's sizes next to the full protocols', then (given the suite's ``items`` and the models
    run) a table of the items each model's item-wide sections used."""
    from uniprobe.experiments.seeds.stars import StarsSettings

    full = StarsSettings()
    text = " ".join(
        [
            "The demo runs smaller protocols than the full ones: STARS on",
            f"{settings.stars_prompts_per_level} prompts per level for {settings.stars_steps} steps (the",
            f"full protocol, `uniprobe seeds stars`: {full.prompts_per_level} and {full.steps}), R3 for",
            f"{settings.r3_rounds} rounds (`uniprobe seeds r3`: 3), patching on {settings.patch_items} item",
            f"pairs, attention on {settings.attention_items} items. Each number means what the full",
            "protocol's does.",
        ]
    )
    if items is None or not models:
        return text
    rows = [
        "| model | gap table, stores, logit lens, R3 on | patching | attention |",
        "| --- | --- | --- | --- |",
    ]
    for name in models:
        if dict(MODELS)[name] == "mot":
            n = len(thin(items, settings.mot_item_stride))
            used = (
                f"{n} of {len(items)} test items (every {', '.join(WHOLE)} item, 1 in"
                f" {settings.mot_item_stride} of each other category)"
            )
        else:
            used = f"all {len(items)} test items"
        pairs, att = f"{settings.patch_items} item pairs", f"{settings.attention_items} items"
        rows.append(f"| {name} | {used} | {pairs} | {att} |")
    return text + "\n\n" + "\n".join(rows)


def pick_models(names: list[str] | tuple[str, ...] | None) -> list[tuple[str, str]]:
    """``(name, arch)`` of the chosen models in the report's order; None: all of :data:`MODELS`."""
    if not names:
        return list(MODELS)
    known = dict(MODELS)
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"demo --models {' '.join(bad)}: unknown; choose from {', '.join(known)}")
    return [(n, a) for n, a in MODELS if n in names]


def run_demo(
    out: str | Path = "artifacts/demo",
    stars_steps: int | None = None,
    settings: DemoSettings | None = None,
    progress: bool = True,
    models: list[str] | tuple[str, ...] | None = None,
) -> int:
    """Run every section for each chosen sandbox model (``models``: names, default all three); write
    ``report.md`` and ``report.html``; returns 0. Unknown names: :class:`UsageError`.

    Per model, in the order the report answers them: the gap table (and GapEval score); where the
    answer becomes readable (probe and logit-lens maps); where it is used (patching map); what CoT,
    STARS self-training and the R3 loop change. A section finished by an earlier run with the same
    ``out`` and settings is kept, not run again (:mod:`uniprobe.experiments.demo_resume`). The report
    ends with the seconds each section took. ``progress=False`` (or ``TQDM_DISABLE``) hides the bars.
    """
    from uniprobe.experiments.report_html import write_html

    chosen = pick_models(models)
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
        opening_paragraph(suite.items),
        "",
    ]
    # the sections' bar only on a terminal: nested bars in a log are cursor codes; there, one line each
    lines = progress and not sys.stderr.isatty()
    with bar(
        total=len(chosen) * len(SECTIONS), desc="demo", unit="section", progress=progress and not lines
    ) as pbar:
        for name, arch in chosen:
            print(f"== {name}")
            run = _ModelSections(name, arch, out, suite, settings)
            text: dict[str, str] = {}
            for section in SECTIONS:
                pbar.set_description(f"demo: {name} {section}")
                if lines:
                    step = len(records) + 1
                    print(f"demo: {name} {section} ({step}/{len(chosen) * len(SECTIONS)})", file=sys.stderr)
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
            n_items = len(run.items) if len(run.items) < len(suite.items) else None
            report += model_report(name, arch, text, n_items)
    kept = any(r.get("kept") for r in records.values())
    report += [
        "## Where the time went",
        "",
        settings_paragraph(settings, suite.items, [m for m, _ in chosen]),
        "",
        timing_table(records, [m for m, _ in chosen], list(SECTIONS)),
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
