"""GapEval's gap score on hand-made outcome tables whose ordering is known."""

from __future__ import annotations

import math

import pytest
from uniprobe.experiments.seeds.gapeval import category_gap, fit_irt, format_gap_score, gap_score


def table(counts: dict[str, int], category: str = "c") -> tuple[list[str], list[bool], list[bool]]:
    """Items from outcome counts: ``{"11": n, "10": n, "01": n, "00": n}``."""
    cats, text, image = [], [], []
    for code, n in counts.items():
        for _ in range(n):
            cats.append(category)
            text.append(code[0] == "1")
            image.append(code[1] == "1")
    return cats, text, image


def test_gap_orders_no_gap_below_small_below_large():
    none = gap_score(*table({"11": 20, "10": 5, "01": 5, "00": 10}))[0]
    small = gap_score(*table({"11": 20, "10": 10, "01": 2, "00": 8}))[0]
    large = gap_score(*table({"11": 5, "10": 30, "01": 0, "00": 5}))[0]
    assert none < small < large
    assert none < 0.2 and large > 0.5


def test_symmetric_outcomes_give_equal_abilities():
    abilities = fit_irt(*table({"11": 10, "10": 6, "01": 6, "00": 8}))
    th_text, th_image = abilities["c"]
    assert th_text == pytest.approx(th_image, abs=1e-4)


def test_text_leading_category_has_positive_delta_and_score_averages_categories():
    c1 = table({"11": 10, "10": 10, "01": 0, "00": 5}, "lead")
    c2 = table({"11": 10, "10": 3, "01": 3, "00": 5}, "even")
    cats, text, image = (c1[k] + c2[k] for k in range(3))
    score, rows = gap_score(cats, text, image)
    by = {r.category: r for r in rows}
    assert by["lead"].delta > 0.5 and abs(by["even"].delta) < 1e-4
    assert score == pytest.approx((by["lead"].gap + by["even"].gap) / 2)
    assert by["lead"].rates["10"] == pytest.approx(10 / 25)
    assert "GapEval gap score" in format_gap_score(score, rows)


def test_fit_is_seeded_and_deterministic():
    data = table({"11": 7, "10": 9, "01": 2, "00": 4})
    assert gap_score(*data, seed=3)[0] == gap_score(*data, seed=3)[0]


def test_category_gap_formula():
    delta, p00, p11 = 1.0, 0.2, 0.5
    g = 0.5
    expected = 1 / (1 + math.exp(-(math.log(g / (1 - g)) + 2.7 * p00 - 1.05 * p11)))
    assert category_gap(delta, p00, p11) == pytest.approx(expected)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="same, non-zero number"):
        fit_irt(["a"], [True, False], [True])


def test_seeds_gapeval_command_on_the_query_sandbox(tmp_path, capsys):
    import json

    from uniprobe.experiments.cli import main

    assert main(["seeds", "gapeval", "--model", "sandbox-query", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gapeval.json").read_text())
    cats = {c["category"]: c for c in data["categories"]}
    assert set(cats) == {"direct", "arithmetic", "mapping", "knowledge_forward", "knowledge_inverse"}
    # the shipped model understands knowledge items but does not draw them: text leads there
    assert cats["knowledge_forward"]["delta"] > 1 and cats["knowledge_forward"]["gap"] > cats["direct"]["gap"]
    assert data["score"] == pytest.approx(sum(c["gap"] for c in cats.values()) / 5)
    assert (tmp_path / "gapeval.png").stat().st_size > 1000
    assert "GapEval gap score" in capsys.readouterr().out


def test_r3_loop_rounds_add_up_and_only_regenerate_disagreements(tmp_path):
    from uniprobe.experiments.sandbox.checkpoint import load_sandbox
    from uniprobe.experiments.seeds.r3 import eligible, format_r3, r3_loop
    from uniprobe.experiments.tasks.suite import Suite

    items = Suite(0).items
    model = load_sandbox("sandbox-query")
    res = r3_loop(model, items, rounds=2)
    assert len(res.items) == len(eligible(items)) > 50
    assert [r.round for r in res.rounds] == [0, 1, 2]
    for prev, r in zip(res.rounds, res.rounds[1:], strict=False):
        assert r.improved + r.worse + r.unchanged == pytest.approx(1.0)
        assert r.accuracy == pytest.approx(prev.accuracy + r.improved - r.worse)
        assert r.regenerated <= 1.0
    # round 2 only redraws what round 1 still judged wrong
    assert res.rounds[2].regenerated <= res.rounds[1].regenerated
    assert "| round | accuracy | improved" in format_r3(res)
    from uniprobe.experiments.seeds.r3 import plot_r3

    plot_r3(res, str(tmp_path / "r3.png"))
    assert (tmp_path / "r3.png").stat().st_size > 1000


def _fake_run(seed: int, und: float, layer: int, effect: float) -> dict:
    row = {"kind": "reasoning", "category": "arithmetic", "task": "arith", "level": 2, "n": 40}
    return {
        "seed": seed,
        "gap": [{**row, "held_out": True, "understanding": und, "generation": 0.0, "generation_cot": und}],
        "probe_best": {"und:text": {"layer": layer, "accuracy": und, "readable": True}},
        "patch_peak": {"effect": effect, "layer": layer, "column": "answer slot"},
    }


def test_summarize_seeds_gives_mean_and_range_of_every_finding():
    from uniprobe.experiments.sandbox.multiseed import format_seed_table, summarize_seeds

    s = summarize_seeds([_fake_run(0, 0.5, 1, 0.2), _fake_run(1, 1.0, 3, 0.6), _fake_run(2, 0.75, 2, 0.4)])
    und = s["gap"][0]["understanding"]
    assert (und["mean"], und["min"], und["max"]) == (pytest.approx(0.75), 0.5, 1.0)
    assert s["gap"][0]["held_out"] and s["seeds"] == [0, 1, 2]
    assert s["probe_best"]["und:text"]["layer"]["mean"] == pytest.approx(2.0)
    assert s["patch_peak"]["effect"]["max"] == pytest.approx(0.6)
    md = format_seed_table(s)
    assert "| reasoning | arithmetic | arith | 2 | 40 | yes | 75% [50–100] |" in md
    assert "0.40 [0.20–0.60] at layer 2 [1–3]" in md
    bad = _fake_run(3, 0.5, 1, 0.1)
    bad["gap"][0]["level"] = 3
    with pytest.raises(ValueError, match="missing in some seeds"):
        summarize_seeds([_fake_run(0, 0.5, 1, 0.2), bad])


@pytest.mark.slow  # ~85 s on the loaded 2-core machine (two trainings, captures, probes, patching)
def test_train_seeds_on_a_tiny_budget_reuses_the_demo_analyses(tmp_path):
    import json

    from uniprobe.experiments.sandbox.multiseed import seeds_report
    from uniprobe.experiments.tasks.suite import Suite

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    suite_items = Suite(0).items  # every arithmetic item: the probes need each answer a few times
    items = [it for it in suite_items if it.category == "arithmetic"] + suite_items[:4]
    summary = seeds_report(
        "ar", [0, 1], tmp_path, items=items, patch_pairs=1, steps=2, warmup=1, time_budget_s=None,
        backbone={**tiny, "num_key_value_heads": 2}, threads=1, data={"taught_reasoning": 0.0},
    )  # fmt: skip
    assert summary["seeds"] == [0, 1]
    assert {(r["category"], r["level"]) for r in summary["gap"]} >= {("arithmetic", 2), ("direct", 1)}
    # untaught reasoning: its rows are held out of training, as are AR's direct (count, object) pairs
    assert all(r["held_out"] for r in summary["gap"])
    assert set(summary["probe_best"]) == {"und:text", "gen:text", "gen:image_gen"}
    for s in [summary["patch_peak"]["effect"]] + [r["understanding"] for r in summary["gap"]]:
        assert s["min"] <= s["mean"] <= s["max"] and len(s["values"]) == 2
    assert json.loads((tmp_path / "seeds.json").read_text())["arch"] == "ar"
    assert (tmp_path / "seed-1" / "checkpoint" / "training.json").exists()
    assert "mean [min–max] over 2 seeds" in (tmp_path / "seeds.md").read_text()


def test_sandbox_seeds_command_parses_to_the_library_call(tmp_path, monkeypatch):
    from uniprobe.experiments.cli import build_parser, main
    from uniprobe.experiments.sandbox import multiseed

    args = build_parser().parse_args(
        ["sandbox", "seeds", "--arch", "ar", "--seeds", "0", "1", "2", "--out", "x"]
    )
    assert args.seeds == [0, 1, 2] and args.arch == "ar" and args.steps is None
    calls = []

    def fake_report(arch, seeds, out, **kw):
        calls.append((arch, seeds, kw))
        return multiseed.summarize_seeds([_fake_run(s, 0.5, 1, 0.1) for s in seeds])

    monkeypatch.setattr(multiseed, "seeds_report", fake_report)
    argv = [
        "sandbox",
        "seeds",
        "--arch",
        "query",
        "--seeds",
        "3",
        "4",
        "--out",
        str(tmp_path),
        "--steps",
        "5",
    ]
    assert main(argv) == 0
    assert calls == [("query", [3, 4], {"steps": 5, "time_budget_s": None, "threads": None})]
    calls.clear()
    argv = [
        "sandbox",
        "seeds",
        "--arch",
        "ar",
        "--seeds",
        "0",
        "10",
        "--out",
        str(tmp_path),
        "--chain",
        "mix-first",
    ]
    assert main(argv) == 0
    assert calls == [
        ("ar", [0, 10], {"steps": None, "time_budget_s": None, "threads": None, "chain": "mix-first"})
    ]
