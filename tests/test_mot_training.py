"""sandbox-mot's recipe from the CLI and the protocols that fine-tune it (seeds, injection, STARS)."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.sandbox.checkpoint import load_sandbox
from uniprobe.experiments.sandbox.mot_train import RECIPE, scaled_stages
from uniprobe.experiments.sandbox.train import train_any
from uniprobe.hooks.errors import UsageError


def test_scaled_stages_keep_the_recipes_proportions() -> None:
    stages = scaled_stages(RECIPE["stages"], 10)
    assert [s["steps"] for s in stages] == [5, 5]
    assert [s["lr"] for s in stages] == [s["lr"] for s in RECIPE["stages"]]
    assert all(1 <= s["warmup"] <= s["steps"] or s["warmup"] == 0 for s in stages)
    assert sum(s["steps"] for s in scaled_stages(RECIPE["stages"], 7)) == 7
    with pytest.raises(ValueError, match="2 stages"):
        scaled_stages(RECIPE["stages"], 1)


def test_train_any_refuses_options_of_the_other_recipe(tmp_path) -> None:
    with pytest.raises(UsageError, match="source= is sandbox-mot's warm start"):
        train_any("ar", None, steps=1, source="sandbox-query")
    with pytest.raises(UsageError, match=r"does not take \['backbone'\]"):
        train_any("mot", None, steps=2, backbone={"hidden_size": 32})


def test_train_sandbox_command_trains_mot_from_sandbox_query(tmp_path, capsys) -> None:
    from uniprobe.experiments.cli import main

    out = tmp_path / "mot"
    argv = [
        "train-sandbox",
        "--arch",
        "mot",
        "--out",
        str(out),
        "--steps",
        "4",
        "--seed",
        "3",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    assert "trained mot in" in capsys.readouterr().out
    rec = json.loads((out / "training.json").read_text())
    assert rec["arch"] == "mot" and rec["seed"] == 3 and rec["source"] == "sandbox-query"
    assert [s["steps"] for s in rec["stages"]] == [2, 2]
    assert rec["data"] == load_sandbox("sandbox-query").training_recipe["data"]  # what understanding learnt
    assert rec["init"] == {"path": "sandbox-query", "training": load_sandbox("sandbox-query").training_recipe}
    trained, source = load_sandbox(out), load_sandbox("sandbox-query")
    layer, src = trained.language_model.model.layers[0], source.lm.model.layers[0]
    # the understanding expert stays sandbox-query's (frozen); its generation twin trained away from it
    assert torch.equal(layer.mlp.up_proj.weight, src.mlp.up_proj.weight)
    assert not torch.equal(layer.mlp_moe_gen.up_proj.weight, src.mlp.up_proj.weight)
    assert (out / "train_log_stage0.jsonl").exists() and (out / "train_log_stage1.jsonl").exists()


def test_train_sandbox_weight_decay_reaches_each_mot_stage(tmp_path, capsys, monkeypatch) -> None:
    import uniprobe.experiments.sandbox.mot_train as mot_train
    from uniprobe.experiments.cli import main

    seen: list[float] = []
    real_fit = mot_train.fit

    def spy(*args, **kwargs):
        seen.append(kwargs["weight_decay"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(mot_train, "fit", spy)
    out = tmp_path / "mot"
    argv = ["train-sandbox", "--arch", "mot", "--out", str(out), "--steps", "2", "--threads", "1"]
    assert main([*argv, "--weight-decay", "0.5"]) == 0
    assert seen == [0.5, 0.5]  # AdamW's decay in both stages, as recorded
    rec = json.loads((out / "training.json").read_text())
    assert [s["weight_decay"] for s in rec["stages"]] == [0.5, 0.5]
    assert all("weight_decay" not in s for s in RECIPE["stages"])  # the shipped recipe: fit's 0.01
    seen.clear()
    assert main([*argv[:4], str(tmp_path / "default"), *argv[5:]]) == 0 and seen == [0.01, 0.01]
    capsys.readouterr()
    bad = ["train-sandbox", "--arch", "ar", "--out", str(tmp_path / "x"), "--weight-decay", "0.5"]
    assert main(bad) == 2
    assert "--weight-decay is for --arch mot" in capsys.readouterr().err
    assert main([*argv[:4], str(tmp_path / "x"), "--weight-decay", "-1"]) == 2
    assert "a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_sandbox_command_refuses_source_for_other_archs(tmp_path, capsys) -> None:
    from uniprobe.experiments.cli import main

    argv = ["train-sandbox", "--arch", "ar", "--out", str(tmp_path / "x"), "--source", "sandbox-query"]
    assert main(argv) == 2
    assert "--source is for --arch mot" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # two 2-step warm starts, each with the demo's gap table, captures, probes, patching
def test_seeds_report_on_mot(tmp_path) -> None:
    from uniprobe.experiments.sandbox.multiseed import seeds_report
    from uniprobe.experiments.tasks.suite import Suite

    suite_items = Suite(0).items
    items = [it for it in suite_items if it.category == "arithmetic"] + suite_items[:4]
    summary = seeds_report("mot", [0, 1], tmp_path, items=items, patch_pairs=1, steps=2, threads=1)
    assert summary["seeds"] == [0, 1] and summary["arch"] == "mot"
    assert set(summary["probe_best"]) == {"und:text", "gen:text", "gen:image_gen"}
    for s in [summary["patch_peak"]["effect"]] + [r["understanding"] for r in summary["gap"]]:
        assert s["min"] <= s["mean"] <= s["max"] and len(s["values"]) == 2
    # both seeds share sandbox-query's understanding expert: their understanding is the same
    assert all(r["understanding"]["min"] == r["understanding"]["max"] for r in summary["gap"])
    seeds = [
        json.loads((tmp_path / f"seed-{k}" / "checkpoint" / "training.json").read_text()) for k in (0, 1)
    ]
    assert [r["seed"] for r in seeds] == [0, 1]
    # the trained model in hand holds out what its saved checkpoint holds out (sandbox-query's
    # held-out reasoning): every arithmetic row, as the gap table of the loaded checkpoint says
    assert {r["category"] for r in summary["gap"] if r["held_out"]} == {"arithmetic"}


@pytest.mark.slow
def test_inject_and_stars_on_the_shipped_mot(tmp_path) -> None:
    from uniprobe.experiments.seeds.inject import InjectSettings, run_inject
    from uniprobe.experiments.seeds.stars import StarsSettings, run_stars
    from uniprobe.experiments.tasks.suite import Suite

    suite = Suite(0)
    model = load_sandbox("sandbox-mot")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = InjectSettings(n_characters=4, n_inverse_test=4, steps=2, batch_size=4, patch_pairs=1)
    res = run_inject(model, tmp_path / "inject", settings, suite=suite, progress=False)
    assert res["model_arch"] == "mot" and set(res["maps"]) == {"before", "after"}
    assert (tmp_path / "inject" / "inject.md").read_text().startswith("### Knowledge injection (sandbox-mot)")
    stars = run_stars(
        model, tmp_path / "stars", StarsSettings(prompts_per_level=8, steps=2, batch_size=8, maps=False),
        suite=suite, progress=False,
    )  # fmt: skip
    assert sum(f["kept"] for f in stars["filter"].values()) > 0  # its own judge accepts some drawings
    assert any(r["relative_change"] > 0 for r in stars["weight_change"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # copies are tuned


def test_train_sandbox_data_updates_the_drawing_stream_and_bad_data_is_refused(tmp_path, capsys) -> None:
    from uniprobe.experiments.cli import main

    out = tmp_path / "mot"
    base = ["train-sandbox", "--arch", "mot", "--steps", "2", "--threads", "1"]
    assert main([*base, "--out", str(out), "--data", '{"reasoning_draw": 0.15}']) == 0
    rec = json.loads((out / "training.json").read_text())
    assert rec["generation_data"] == {**RECIPE["data"], "reasoning_draw": 0.15}
    for data, message in (
        ("{reasoning_draw: 1}", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"reasoning_drw": 0.1}', "reasoning_drw"),
    ):
        assert main([*base, "--out", str(tmp_path / "bad"), "--data", data]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    chain = ["train-sandbox", "--arch", "ar", "--chain", "mix-first", "--out", str(tmp_path / "c")]
    assert main([*chain, "--data", '{"reasoning_draw": 0.15}']) == 2
    assert "drop ['data']" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_the_recipe_defaults_retrain_the_shipped_sandbox_mot() -> None:
    """``train-sandbox --arch mot`` without options is the shipped model's run: its seed (1: seeds 0
    and 2 drew portraits 30%), stages, batches, drawing stream and warm start."""
    rec = load_sandbox("sandbox-mot").training_recipe
    keys = ("source", "seed", "suite_seed", "batch_size", "micro_batch", "stages")
    assert {k: rec[k] for k in keys} == {k: RECIPE[k] for k in keys} and RECIPE["seed"] == 1
    assert rec["generation_data"] == RECIPE["data"]
    assert rec["init"] == {"path": "sandbox-query", "training": load_sandbox("sandbox-query").training_recipe}
