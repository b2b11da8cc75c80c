"""The latent-CoT experiment's analysis: Wilson intervals, per-level rates and maps, the pooled table."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.sandbox import build_model
from uniprobe.experiments.sandbox.latent_cot import drawing_rates, latent_cot_table, level_maps, wilson
from uniprobe.experiments.tasks import Suite

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def test_wilson_interval_matches_the_formula() -> None:
    lo, hi = wilson(8, 40)
    assert lo == pytest.approx(0.1050, abs=1e-3) and hi == pytest.approx(0.3466, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def _run(seed: int, draw: tuple[float, float, float]) -> dict:
    gap = [
        {"category": "arithmetic", "level": k + 1, "n": n, "understanding": 1.0, "generation": d}
        for k, (n, d) in enumerate(zip((16, 40, 40), draw, strict=True))
    ] + [{"category": "direct", "level": 1, "n": 60, "understanding": 0.95, "generation": 1.0}]
    probe = {"layer": 2, "accuracy": 0.5, "readable": True}
    maps = {
        f"L{k}": {"probe_boi": probe, "probe_drawing": probe, "lens_boi_top1": {0: 0.1, 3: 0.4}}
        for k in (2, 3)
    }
    maps["L1"] = {
        "probe_boi": {"layer": None, "accuracy": None, "readable": False},
        "probe_drawing": {"layer": None, "accuracy": None, "readable": False},
        "lens_boi_top1": {0: 0.0},
    }
    return {"seed": seed, "rates": drawing_rates(gap), "maps": maps}


def test_table_pools_seeds_with_intervals_and_shows_each_seed() -> None:
    md = latent_cot_table({"latent-CoT": [_run(0, (0.5, 0.25, 0.1)), _run(1, (0.75, 0.35, 0.0))]})
    lines = md.splitlines()
    assert len(lines) == 2 + 3
    level2 = next(line for line in lines if line.startswith("| latent-CoT | 2 |"))
    # 10 + 14 of 80 drawings right: 30% [21-41%]
    assert "| 30% [21–41%] | 25% / 35% | — / — |" in level2
    assert "50% (L2) / 50% (L2)" in level2 and "40% (L3) / 40% (L3)" in level2
    assert "too few items" in next(line for line in lines if line.startswith("| latent-CoT | 1 |"))


def test_chance_at_the_models_own_counts() -> None:
    from uniprobe.experiments.tasks import Suite, world

    items = [it for it in Suite(0).items if it.category == "arithmetic" and it.level == 2][:4]
    grid = world.count_grid(2, world.TILE_ID["red_cup"])  # every drawing has 2 objects
    results = [{"id": it.id, "category": "arithmetic", "level": 2, "grid": grid} for it in items]
    gap = [{"category": "arithmetic", "level": 2, "n": 4, "understanding": 1.0, "generation": 0.0}]
    share_of_2 = sum(it.answer == "2" for it in items) / 4  # a constant drawer of 2 scores this
    assert drawing_rates(gap, results, items)["L2"]["chance"] == pytest.approx(share_of_2)


def test_level_maps_on_a_tiny_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("ar", backbone=TINY).eval()
    res = level_maps(model, Suite(0).items, tmp_path)
    assert set(res) == {"L1", "L2", "L3"} and res["L2"]["n"] == 40
    for level in ("L2", "L3"):  # enough items per answer for a grouped 3-fold probe
        assert 0.0 <= res[level]["probe_boi"]["accuracy"] <= 1.0
        assert set(res[level]["lens_boi_top1"]) == {0, 1}
    assert json.loads((tmp_path / "maps.json").read_text())["L2"]["n"] == 40


def test_a_finished_run_of_the_same_weights_is_reused_and_other_weights_are_analysed(
    tmp_path, monkeypatch
) -> None:
    from uniprobe.experiments.sandbox import checkpoint
    from uniprobe.experiments.sandbox.latent_cot import analyse_checkpoint

    ck, out = tmp_path / "ck", tmp_path / "out"
    ck.mkdir()
    out.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights one")
    prev = {"checkpoint": str(ck), "weights_sha256": checkpoint.sha256_file(ck / "model.safetensors"),
            "seed": 3, "rates": {}, "maps": {},
            "patching": {"effect": 0.2, "layer": 1, "column": "E", "answer_slot": 0.1}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(prev))

    def loaded(*a, **k):
        raise RuntimeError("analysed anew")

    monkeypatch.setattr(checkpoint, "load_sandbox", loaded)
    assert analyse_checkpoint(ck, out) == prev  # nothing loaded: the finished run is returned
    copy = tmp_path / "copy"  # the same weights in another folder: kept, and named where they are now
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"weights one")
    assert analyse_checkpoint(copy, out) == {**prev, "checkpoint": str(copy)}
    assert json.loads((out / "run.json").read_text())["checkpoint"] == str(copy)
    (ck / "model.safetensors").write_bytes(b"weights two")  # retrained in place
    with pytest.raises(RuntimeError, match="analysed anew"):
        analyse_checkpoint(ck, out)


def test_a_reused_run_without_patching_gets_only_its_patching(tmp_path, monkeypatch) -> None:
    from uniprobe.experiments.sandbox import checkpoint, latent_cot

    ck, out = tmp_path / "ck", tmp_path / "out"
    ck.mkdir()
    out.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights one")
    older = {"checkpoint": str(ck), "weights_sha256": checkpoint.sha256_file(ck / "model.safetensors"),
             "seed": 3, "rates": {"L2": {"drawing": 0.5}}, "maps": {}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(older))
    monkeypatch.setattr(checkpoint, "load_sandbox", lambda path, verify=True: ("loaded", str(path)))
    peak = {"effect": 0.3, "layer": 2, "column": "answer slot", "answer_slot": 0.3}
    seen = []
    monkeypatch.setattr(latent_cot, "_patching", lambda model, where: seen.append((model, where)) or peak)
    run = latent_cot.analyse_checkpoint(ck, out)
    assert run == {**older, "patching": peak} and seen == [(("loaded", str(ck)), out)]
    assert json.loads((out / "run.json").read_text()) == run
    assert latent_cot.analyse_checkpoint(ck, out) == run and len(seen) == 1  # now complete: kept as is


def test_a_reused_mot_run_records_its_drawing_stream(tmp_path, monkeypatch) -> None:
    from uniprobe.experiments.sandbox import checkpoint
    from uniprobe.experiments.sandbox.latent_cot import analyse_checkpoint

    ck, out = tmp_path / "ck", tmp_path / "out"
    ck.mkdir()
    out.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights one")
    stream = {"gen_fraction": 1.0, "reasoning_draw": 0.15, "reasoning_draw_levels": [1, 2]}
    (ck / "training.json").write_text(json.dumps({"data": {"mix": "m"}, "generation_data": stream}))
    prev = {"checkpoint": str(ck), "weights_sha256": checkpoint.sha256_file(ck / "model.safetensors"),
            "seed": 0, "data": {"mix": "m"}, "rates": {}, "maps": {},
            "patching": {"effect": 0.2, "layer": 1, "column": "E", "answer_slot": 0.1}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(prev))
    monkeypatch.setattr(checkpoint, "load_sandbox", lambda *a, **k: pytest.fail("analysed anew"))
    assert analyse_checkpoint(ck, out) == {**prev, "generation_data": stream}
    assert json.loads((out / "run.json").read_text())["generation_data"] == stream


@pytest.mark.slow  # two 2-step trainings, each analysed (gap rows, captures, probes, lens)
def test_latent_cot_command_pools_recipes(tmp_path, capsys) -> None:
    from uniprobe.experiments.sandbox.latent_cot import main
    from uniprobe.experiments.sandbox.train import train_sandbox

    dirs = []
    for name, draw in (("lcot", 0.5), ("control", 0.0)):
        d = tmp_path / name
        data = {"taught_reasoning": 0, "reasoning_draw": draw}
        train_sandbox("ar", d, steps=2, warmup=1, backbone=TINY, data=data, progress=False, threads=1)
        dirs.append(d)
    main(
        [
            "--group",
            "latent-CoT",
            str(dirs[0]),
            "--group",
            "control",
            str(dirs[1]),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    md = (tmp_path / "o" / "latent-cot.md").read_text()
    assert "| latent-CoT | 2 | 0 |" in md and "| control | 3 | 0 |" in md
    assert "attention not traced" in md  # an untrained model understands no level-2 item
    assert md.count("understanding → generation patching at most") == 2  # patched all the same
    runs = json.loads((tmp_path / "o" / "latent-cot.json").read_text())
    assert runs["latent-CoT"][0]["data"]["reasoning_draw"] == 0.5 and set(runs["control"][0]["rates"]) == {
        "L1",
        "L2",
        "L3",
    }
    assert set(runs["control"][0]["patching"]) == {"effect", "layer", "column", "answer_slot"}
    assert (tmp_path / "o" / "control" / "run-0" / "patch-ar.json").is_file()
    assert md in capsys.readouterr().out
