"""`uniprobe demo` end to end on the shipped sandbox checkpoints: every section, every claim from numbers."""

from __future__ import annotations

import json

import pytest
from uniprobe.experiments import demo
from uniprobe.experiments.demo import run_demo
from uniprobe.experiments.demo_attention_text import attention_paragraph
from uniprobe.experiments.demo_sections import GEN_ROLE
from uniprobe.hooks.store import ActivationStore


def check_model_part(tmp_path, report: str, name: str, arch: str) -> None:
    """One model's sections: figures in the report, sentences from the numbers, stores, maps."""
    assert f"## {name}" in report
    for figure in (
        f"drawings-{name}.png",
        f"probe-map-{arch}.png",
        f"lens-{arch}.png",
        f"patch-{arch}.png",
        f"attn-mass-{arch}.png",
        f"attn-flow-{arch}.png",
    ):
        assert (tmp_path / figure).stat().st_size > 1000, figure
        assert figure in report
    gap = json.loads((tmp_path / f"gap-{name}.json").read_text())
    kinds = {s["kind"]: s for s in gap["summary"]}
    # the sentence in the report is computed from these numbers
    direct = f"draws {100 * kinds['direct']['generation']:.0f}% of direct prompts"
    assert direct in report
    und = ActivationStore.open(tmp_path / f"store-{arch}-und")
    gen = ActivationStore.open(tmp_path / f"store-{arch}-gen")
    assert und.complete and gen.complete and und.n_examples == gen.n_examples
    assert "answer" in gen.label_keys
    probe_rows = json.loads((tmp_path / f"probe-map-{arch}.json").read_text())
    assert {r["role"] for r in probe_rows} == {"und:text", "gen:text", f"gen:{GEN_ROLE[arch]}"}
    patch = json.loads((tmp_path / f"patch-{arch}.json").read_text())
    assert "answer slot" in patch["columns"] and len(patch["grid"]) == 4
    attention = json.loads((tmp_path / f"attention-{arch}.json").read_text())
    assert attention_paragraph(attention) in report  # the section's text, from its numbers
    stars = json.loads((tmp_path / f"stars-{name}" / "stars.json").read_text())
    assert set(stars["before"]) == {"1", "2", "3"} and stars["weight_change"]
    assert (tmp_path / f"r3-{name}.json").exists() and (tmp_path / f"gapeval-{name}.png").exists()


@pytest.mark.slow
def test_demo_writes_report_with_every_section(tmp_path):
    assert run_demo(tmp_path, progress=False) == 0
    report = (tmp_path / "report.md").read_text()
    assert [m for m, _ in demo.MODELS] == ["sandbox-ar", "sandbox-query", "sandbox-mot"]
    for name, arch in demo.MODELS:
        check_model_part(tmp_path, report, name, arch)
    assert "Linear probes for the arithmetic answer" in report and "logit lens" in report
    assert "Fitting GapEval's two-dimensional IRT model" in report
    assert (tmp_path / "gapeval-sandbox-ar.png").exists()
    assert report.count("**R3.**") == 3 and report.count("**STARS self-training.**") == 3
    # each model's part answers the questions in order: gap, readable, used, what CoT/STARS/R3 change
    for part in report.split("\n## sandbox-")[1:]:
        heads = ["### 1. The gap", "### 2. Where", "### 3. Where", "### 4. How does", "### 5. What"]
        heads = [part.index(h) for h in heads]
        assert heads == sorted(heads)
    # where the time went: seconds per section per model, measured in this run; the demo's settings
    timing = report[report.index("## Where the time went") :]
    assert "| section | sandbox-ar | sandbox-query | sandbox-mot |" in timing
    n = len(demo.thin(demo.Suite(0).items, demo.DemoSettings().mot_item_stride))
    assert f"| sandbox-mot | {n} of 364 test items" in timing  # the settings table states mot's subset
    assert "| stars |" in timing and "| **total** |" in timing and "`uniprobe seeds stars`" in timing
    n_records = len(demo.MODELS) * len(demo.SECTIONS)
    assert len(list((tmp_path / "sections").glob("*.json"))) == n_records  # every section's DONE record
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and 'src="probe-map-ar.png"' in page and "<h2>sandbox-mot</h2>" in page


@pytest.mark.slow
def test_demo_mot_column_alone(tmp_path):
    """`uniprobe demo --models sandbox-mot`: one column, every section, on a tiny item subset."""
    settings = demo.DemoSettings(stars_prompts_per_level=4, stars_steps=5, r3_rounds=1, patch_items=2,
                                 attention_items=2, mot_item_stride=3)  # fmt: skip
    assert run_demo(tmp_path, progress=False, settings=settings, models=["sandbox-mot"]) == 0
    report = (tmp_path / "report.md").read_text()
    check_model_part(tmp_path, report, "sandbox-mot", "mot")
    assert "## sandbox-ar" not in report and "| section | sandbox-mot |" in report
    gen = ActivationStore.open(tmp_path / "store-mot-gen")
    assert gen.n_examples == len(demo.thin(demo.Suite(0).items, 3))  # the stated subset
