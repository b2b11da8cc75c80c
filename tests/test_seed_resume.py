"""``sandbox seeds`` resumes an interrupted sweep and refuses other settings (multiseed.seed_run)."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.sandbox import multiseed, train
from uniprobe.experiments.sandbox.checkpoint import build_model, resolve_model_dir, save_sandbox, sha256_file
from uniprobe.hooks.errors import UsageError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}  # fmt: skip


@pytest.fixture
def fake_work(monkeypatch):
    """Training saves a fresh tiny AR; the analyses return fixed rows. Returns the trained seeds."""
    trained: list[int] = []

    def fake_train(arch, out, seed, **kw):
        trained.append(seed)
        torch.manual_seed(seed)
        model = build_model(arch, backbone=TINY).eval()
        save_sandbox(model, out, training={"seed": seed, "suite_seed": 0, "data": {"taught_reasoning": 0}})
        return model

    monkeypatch.setattr(train, "train_any", fake_train)
    peak = {"effect": 0.5, "layer": 1, "column": "text"}
    monkeypatch.setattr(multiseed, "_analyse", lambda model, items, arch, d, patch_pairs: ([], {}, peak))
    return trained


def test_a_sweep_resumes_finished_and_trained_seeds_without_training_again(tmp_path, fake_work) -> None:
    runs = multiseed.train_seeds("ar", [0, 1], tmp_path, steps=3, data={"mix": "arith_heavy_144"})
    assert fake_work == [0, 1] and [r["seed"] for r in runs] == [0, 1]
    recorded = json.loads((tmp_path / "seed-1" / "request.json").read_text())
    assert recorded["train"] == {"data": {"mix": "arith_heavy_144"}, "steps": 3}
    # seed 1 was cut off after training (no seed.json), seed 2 is new: only seed 2 trains
    (tmp_path / "seed-1" / "seed.json").unlink()
    weights = (tmp_path / "seed-1" / "checkpoint" / "model.safetensors").read_bytes()
    again = multiseed.train_seeds(
        "ar", [0, 1, 2], tmp_path, steps=3, data={"mix": "arith_heavy_144"}, threads=1, progress=True
    )  # threads and progress do not change the run: not settings
    assert fake_work == [0, 1, 2] and again[:2] == runs
    assert (tmp_path / "seed-1" / "checkpoint" / "model.safetensors").read_bytes() == weights
    # a checkpoint cut off while it was written (a file not matching SHA256SUMS) is trained again
    (tmp_path / "seed-2" / "seed.json").unlink()
    (tmp_path / "seed-2" / "checkpoint" / "config.json").write_text("{}")
    multiseed.seed_run("ar", 2, tmp_path, steps=3, data={"mix": "arith_heavy_144"})
    assert fake_work == [0, 1, 2, 2]


def test_a_sweep_refuses_other_settings_and_foreign_folders(tmp_path, fake_work) -> None:
    multiseed.seed_run("ar", 0, tmp_path, steps=3)
    finished = (tmp_path / "seed-0" / "seed.json").read_text()
    with pytest.raises(UsageError, match=r"other settings \(recorded \{'train': \{'steps': 3\}\}"):
        multiseed.seed_run("ar", 0, tmp_path, steps=4)
    with pytest.raises(UsageError, match="arch"):
        multiseed.seed_run("query", 0, tmp_path, steps=3)
    assert (tmp_path / "seed-0" / "seed.json").read_text() == finished and fake_work == [0]
    (tmp_path / "seed-5").mkdir()
    (tmp_path / "seed-5" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no seed run's request.json"):
        multiseed.seed_run("ar", 5, tmp_path, steps=3)
    assert [p.name for p in (tmp_path / "seed-5").iterdir()] == ["notes.txt"] and fake_work == [0]


def test_the_seeds_command_exits_2_on_other_settings(tmp_path, fake_work, capsys) -> None:
    from uniprobe.experiments.cli import main

    argv = ["sandbox", "seeds", "--arch", "ar", "--seeds", "0", "--out", str(tmp_path)]
    assert main([*argv, "--steps", "3"]) == 0
    assert main([*argv, "--steps", "5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_the_seeds_command_trains_a_data_variant_and_records_it(tmp_path, fake_work, capsys) -> None:
    from uniprobe.experiments.cli import main

    argv = ["sandbox", "seeds", "--arch", "ar", "--seeds", "0", "--steps", "3", "--out", str(tmp_path)]
    assert main([*argv, "--data", '{"portrait_share": 0.5}']) == 0
    request = json.loads((tmp_path / "seed-0" / "request.json").read_text())
    assert request["train"] == {"data": {"portrait_share": 0.5}, "steps": 3, "time_budget_s": None}
    capsys.readouterr()
    assert main(argv) == 2  # the recipe's own stream is another setting: the variant's seed is kept
    assert "other settings" in capsys.readouterr().err and fake_work == [0]
    assert main([*argv, "--data", '{"hair_share": 0.5}']) == 2
    assert "not Suite.training_examples keywords" in capsys.readouterr().err


def test_a_mot_sweep_records_its_warm_start_and_refuses_another(tmp_path, fake_work) -> None:
    """sandbox-mot trains from a source by name (default sandbox-query): the name stays when its
    weights are replaced, so request.json records the weights, and other weights are other settings."""
    source = tmp_path / "query"
    torch.manual_seed(0)
    save_sandbox(build_model("query", backbone=TINY), source, training={"seed": 0})
    multiseed.seed_run("mot", 0, tmp_path / "sweep", source=str(source))
    recorded = json.loads((tmp_path / "sweep" / "seed-0" / "request.json").read_text())
    digest = recorded["source_weights"]
    assert digest == sha256_file(source / "model.safetensors")
    assert multiseed.seed_run("mot", 0, tmp_path / "sweep", source=str(source))["seed"] == 0  # resumed
    torch.manual_seed(1)  # the same name, retrained: refused, the finished seed kept
    save_sandbox(build_model("query", backbone=TINY), source, training={"seed": 1})
    with pytest.raises(UsageError, match=f"source_weights.*{digest}"):
        multiseed.seed_run("mot", 0, tmp_path / "sweep", source=str(source))
    assert fake_work == [0] and (tmp_path / "sweep" / "seed-0" / "seed.json").exists()
    # the shipped default is recorded by its weights too
    shipped = sha256_file(resolve_model_dir("sandbox-query") / "model.safetensors")
    multiseed.seed_run("mot", 1, tmp_path / "sweep")
    request = json.loads((tmp_path / "sweep" / "seed-1" / "request.json").read_text())
    assert request["source_weights"] == shipped
