"""An interrupted `uniprobe demo` continues: finished sections are kept (not run again), the others run,
the report ends with a table of where the time went. The sections are stubbed (the real ones are
tests/test_demo.py's, slow)."""

from __future__ import annotations

import json

import pytest
from uniprobe.experiments import demo
from uniprobe.experiments.demo_resume import SectionLog, timing_table, written_since
from uniprobe.hooks.errors import UsageError

TEXT = {
    "gap": {"gap": "GAP", "cot": "COT"},
    "capture": {},
    "probes": {"probes": "PROBES"},
    "lens": {"lens": "LENS"},
    "patching": {"patch": "PATCH"},
    "attention": {"attention": "ATTENTION"},
    "stars": {"stars": "**STARS self-training.** S"},
    "r3": {"r3": "**R3.** R"},
}


@pytest.fixture
def calls(monkeypatch):
    """Stub sections: each writes a file and returns its text; ``stop`` makes one raise Ctrl-C."""
    ran: list[tuple[str, str]] = []
    stop: dict[str, tuple[str, str] | None] = {"at": None}

    def run(self, section):
        if stop["at"] == (self.name, section):
            raise KeyboardInterrupt
        (self.out / f"{section}-{self.name}.txt").write_text(section)
        ran.append((self.name, section))
        return TEXT[section]

    monkeypatch.setattr(demo._ModelSections, "run", run)
    return ran, stop


def test_a_rerun_keeps_finished_sections_and_runs_the_rest(tmp_path, calls):
    ran, stop = calls
    stop["at"] = ("sandbox-query", "lens")
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path, progress=False)
    first = list(ran)
    assert len(first) == len(demo.SECTIONS) + 3 and not (tmp_path / "report.md").exists()
    stop["at"] = None
    ran.clear()
    assert demo.run_demo(tmp_path, progress=False) == 0
    # only what had not finished: the rest of sandbox-query, then every section of sandbox-mot
    assert ran == [("sandbox-query", s) for s in demo.SECTIONS[3:]] + [
        ("sandbox-mot", s) for s in demo.SECTIONS
    ]
    report = (tmp_path / "report.md").read_text()
    assert report.count("**R3.** R") == 3 and "## Where the time went" in report
    assert "`uniprobe seeds stars`" in report and "kept from an earlier, interrupted run" in report
    table = report[report.index("| section |") :]
    assert table.count("*") >= len(demo.SECTIONS) + 3  # the kept sections are marked
    # other settings: nothing is kept
    ran.clear()
    demo.run_demo(tmp_path, progress=False, settings=demo.DemoSettings(stars_steps=7))
    assert len(ran) == 3 * len(demo.SECTIONS)


def test_models_picks_columns_and_keeps_the_others_records(tmp_path, calls):
    ran, _ = calls
    assert demo.run_demo(tmp_path, progress=False, models=["sandbox-mot"]) == 0
    assert ran == [("sandbox-mot", s) for s in demo.SECTIONS]
    report = (tmp_path / "report.md").read_text()
    assert "## sandbox-mot" in report and "## sandbox-ar" not in report
    assert "| section | sandbox-mot |" in report  # the timing table has the chosen column only
    # the settings table states which items sandbox-mot's item-wide sections used
    n = len(demo.thin(demo.Suite(0).items, demo.DemoSettings().mot_item_stride))
    assert f"| sandbox-mot | {n} of 364 test items (every arithmetic item, 1 in 3 of each other" in report
    ran.clear()
    demo.run_demo(tmp_path, progress=False)  # then all three: sandbox-mot's sections are kept
    assert ran == [(m, s) for m in ("sandbox-ar", "sandbox-query") for s in demo.SECTIONS]
    assert "| section | sandbox-ar | sandbox-query | sandbox-mot |" in (tmp_path / "report.md").read_text()


def test_unknown_model_name_is_a_usage_error_naming_the_choices(tmp_path):
    with pytest.raises(UsageError, match="sandbox-foo.*sandbox-ar, sandbox-query, sandbox-mot"):
        demo.run_demo(tmp_path, progress=False, models=["sandbox-foo"])


def test_a_section_whose_files_are_gone_runs_again(tmp_path, calls):
    ran, _ = calls
    demo.run_demo(tmp_path, progress=False)
    (tmp_path / "stars-sandbox-ar.txt").unlink()
    ran.clear()
    demo.run_demo(tmp_path, progress=False)
    assert ran == [("sandbox-ar", "stars")]


def test_section_log_records_are_whole_and_checked(tmp_path):
    log = SectionLog(tmp_path / "sections", identity={"steps": 1})
    (tmp_path / "a.png").write_text("x")
    assert written_since(tmp_path, 0.0) == ["a.png"]
    log.put("m", "gap", {"gap": "G"}, (2.04, 3.0), ["a.png"])
    assert log.get("m", "gap")["text"] == {"gap": "G"} and log.get("m", "lens") is None
    assert not list((tmp_path / "sections").glob("*.tmp"))
    assert SectionLog(tmp_path / "sections", identity={"steps": 2}).get("m", "gap") is None
    (tmp_path / "sections" / "m.lens.json").write_text("{not json")  # a torn write reads as not done
    assert log.get("m", "lens") is None
    rec = json.loads((tmp_path / "sections" / "m.gap.json").read_text())
    table = timing_table({("m", "gap"): {**rec, "kept": True}}, ["m"], ["gap"])
    assert "| gap | 2 s* |" in table and "| CPU (all threads) | 3 s |" in table


def test_thin_keeps_every_category_and_whole_mapping_pairs():
    items = demo.Suite(0).items
    picked = demo.thin(items, 3)
    assert {it.category for it in picked} == {it.category for it in items}
    for cat in {it.category for it in items}:
        groups = list(dict.fromkeys(it.group for it in items if it.category == cat))
        kept = groups if cat == "arithmetic" else groups[::3]  # the probe map's items stay whole
        assert [it.id for it in picked if it.category == cat] == [it.id for it in items if it.group in kept]
    mapping = [it for it in picked if it.category == "mapping"]
    assert mapping and all(sum(m.group == it.group for m in mapping) == 2 for it in mapping)  # A and B
    assert demo.thin(items, 1) == list(items)
    with pytest.raises(UsageError, match="mot_item_stride=0"):
        demo.thin(items, 0)


def test_cli_models_option(tmp_path, calls, capsys):
    from uniprobe.experiments.cli import main

    ran, _ = calls
    assert main(["demo", "--out", str(tmp_path), "--models", "sandbox-query", "sandbox-ar"]) == 0
    assert [m for m, _ in ran[:: len(demo.SECTIONS)]] == ["sandbox-ar", "sandbox-query"]  # report order
    assert main(["demo", "--out", str(tmp_path), "--models", "sandbox-foo"]) == 2
    assert "sandbox-foo" in capsys.readouterr().err
