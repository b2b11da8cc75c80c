"""Learning curves of one reasoning task trained alone (``experiments/sandbox/curves.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.sandbox import build_model
from uniprobe.experiments.sandbox.curves import heldout_understanding, learning_curve, main
from uniprobe.experiments.tasks import Suite
from uniprobe.hooks.errors import UsageError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}  # fmt: skip


class Oracle:
    """Answers every held-out question right except those listed (the scoring's reference)."""

    def __init__(self, suite: Suite, wrong: set[str]) -> None:
        self.answers = {it.question: it.answer for it in suite.items}
        self.wrong = wrong

    def understand(self, questions):
        return [("9" if q in self.wrong else self.answers[q]) for q in questions]


def test_heldout_understanding_scores_levels_and_mapping_pairs() -> None:
    suite = Suite(0)
    mapping = [it for it in suite.items if it.category == "mapping" and it.level == 2]
    arith = [it for it in suite.items if it.category == "arithmetic" and it.level == 1]
    wrong = {mapping[0].question, mapping[2].question, arith[0].question}  # one variant of two pairs
    scores = heldout_understanding(Oracle(suite, wrong), suite)
    assert scores["mapping L2"] == round(18 / 20, 4) and scores["mapping L2 prompts"] == round(38 / 40, 4)
    assert scores["mapping L1"] == scores["mapping L3"] == 1.0
    assert scores["arith L1"] == round(15 / 16, 4) and scores["arith L2"] == scores["arith L3"] == 1.0
    m = build_model("ar", backbone=TINY).eval()  # a real model's answers go through the same scoring
    assert set(heldout_understanding(m, suite)) == set(scores)


def test_a_curve_logs_held_out_scores_every_few_steps(tmp_path, capsys) -> None:
    rows = learning_curve("arith", 3, 2, tmp_path, backbone=TINY, batch_size=4, progress=False)
    assert [r["step"] for r in rows] == [2, 3]  # every 2 steps and at the end
    lines = [json.loads(x) for x in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert lines == rows and all(0.0 <= r["arith L1"] <= 1.0 and r["loss"] > 0 for r in rows)
    assert json.loads((tmp_path / "recipe.json").read_text())["task"] == "arith"
    main(["--task", "mapping", "--steps", "1", "--every", "1", "--out", str(tmp_path / "m"),
          "--backbone", json.dumps(TINY), "--weight-decay", "0.1", "--batch-size", "4",
          "--data", '{"mapping_chains": 4}'])  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 1
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["weight_decay"] == 0.1 and recipe["batch_size"] == 4
    assert recipe["data"] == {"mapping_chains": 4}
    one_hop = learning_curve("mapping1", 2, 2, tmp_path / "m1", backbone=TINY, batch_size=4, progress=False)
    assert one_hop[-1]["step"] == 2
    with pytest.raises(UsageError, match="unknown task"):
        learning_curve("facts", 1, 1, tmp_path)
    with pytest.raises(UsageError, match="set by the task"):  # the task's own stream keys stay the task's
        learning_curve("arith", 1, 1, tmp_path, data={"arith_warmup": 5})


def test_a_curve_saves_its_model_and_another_continues_from_it(tmp_path) -> None:
    from uniprobe.experiments.sandbox import load_sandbox
    from uniprobe.experiments.tasks.suite import held_out_categories

    learning_curve("mapping1", 2, 2, tmp_path / "one", backbone=TINY, batch_size=4, progress=False, save=True)
    ck = tmp_path / "one" / "checkpoint"
    first = load_sandbox(ck)
    assert held_out_categories(first.training_recipe) >= {"arithmetic", "mapping"}
    assert first.training_recipe["curve"]["task"] == "mapping1"
    rows = learning_curve("mapping", 1, 1, tmp_path / "two", init=ck, batch_size=4, progress=False, save=True)
    assert rows[-1]["step"] == 1
    second = load_sandbox(tmp_path / "two" / "checkpoint")
    assert second.training_recipe["init"]["training"]["curve"]["task"] == "mapping1"  # where held_out looks
    assert "init" not in second.training_recipe["curve"]  # recorded once, not again under "curve"
    assert json.loads((tmp_path / "two" / "recipe.json").read_text())["init"]["path"] == str(ck)
    assert held_out_categories(second.training_recipe) >= {"arithmetic", "mapping"}
    a, b = first.state_dict(), second.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained on ...
    assert all((a[k] - b[k]).abs().max() < 1e-3 for k in a)  # ... from the saved weights (one warm-up step)
    from uniprobe.experiments.sandbox.train import train_sandbox

    # a checkpoint of DEFAULTS' one-stage recipe is taught the test reasoning questions: not a start
    train_sandbox("ar", tmp_path / "taught", steps=1, backbone=TINY, threads=1, progress=False)
    with pytest.raises(UsageError, match="holds the test questions out"):
        learning_curve("mapping", 1, 1, tmp_path / "three", init=tmp_path / "taught", progress=False)
    with pytest.raises(UsageError, match="drop backbone"):
        learning_curve("mapping", 1, 1, tmp_path / "four", init=ck, backbone=TINY, progress=False)


def test_the_mix_task_trains_the_arch_recipe_updated_by_data(tmp_path, monkeypatch) -> None:
    from uniprobe.experiments.sandbox.train import DEFAULTS
    from uniprobe.experiments.tasks.suite import held_out_categories

    seen: list[dict] = []
    real = Suite.training_examples

    def spy(self, seed=0, **kw):
        seen.append(kw)
        return real(self, seed, **kw)

    monkeypatch.setattr(Suite, "training_examples", spy)
    learning_curve("mix", 1, 1, tmp_path, backbone=TINY, batch_size=4, progress=False, save=True,
                   data={"mix": "reasoning_wide", "gen_fraction": 0.5})  # fmt: skip
    expected = {**DEFAULTS["ar"]["data"], "mix": "reasoning_wide", "gen_fraction": 0.5, "taught_reasoning": 0}
    assert seen == [{**expected, "wide_level1": True}]  # no warm-up unless data asks for one
    from uniprobe.experiments.sandbox import load_sandbox

    recipe = load_sandbox(tmp_path / "checkpoint").training_recipe
    assert recipe["data"] == {**expected, "wide_level1": True}
    assert held_out_categories(recipe) >= {"arithmetic", "mapping"}
    row = json.loads((tmp_path / "curve.jsonl").read_text())  # the mix draws: its curve scores drawing too
    assert {"arith L1", "mapping L3", "draw count", "und count", "draw arith L2"} <= set(row)


def test_a_mapping_curve_rehearsing_arithmetic_keeps_the_whole_curriculum_in_the_run(tmp_path) -> None:
    from uniprobe.experiments.sandbox import load_sandbox

    learning_curve("mapping", 2, 2, tmp_path, backbone=TINY, batch_size=4, progress=False, save=True,
                   data={"mapping_rehearse_arith": 0.25})  # fmt: skip
    data = load_sandbox(tmp_path / "checkpoint").training_recipe["data"]
    assert data["mapping_warmup"] == 6 and data["mapping_rehearse_arith"] == 0.25  # 8 examples, 3/4 mapping
