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
