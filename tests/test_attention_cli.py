"""CLI of issue 15's heads and steering: ``uniprobe patch --points head_out|head_out_pos`` (a layer × head
grid, token-named columns) and ``uniprobe steer`` (steer.json / .safetensors / .png, each direction source);
bad input exits 2 with a message naming it; the sweep accepts head kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from uniprobe.experiments.cli import main
from uniprobe.probes.attention import SteerResult

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = ("--clean", "t1 t5 t6 t7 t8", "--corrupted", "t1 t5 t9 t7 t8", "--target", "t11", "--foil", "t12")


def test_patch_head_sites(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "h"
    assert main(["patch", "--model", "tiny-llama", *BASE, "--points", "head_out", "--out", str(out)]) == 0
    data = json.loads((out / "patch.json").read_text())
    assert data["axes"]["kind"] == ["head_out"] and data["axes"]["column"] == [
        "h0:all",
        "h1:all",
        "h2:all",
        "h3:all",
    ]
    assert data["axes"]["heads"] == [0, 1, 2, 3] and len(data["grid"][0]) == 2
    assert all(s["head"] in range(4) for s in data["sites"])
    out = tmp_path / "hp"
    assert main(["patch", "--model", "tiny-llama", *BASE, "--points", "head_out_pos", "--out", str(out)]) == 0
    data = json.loads((out / "patch.json").read_text())
    assert data["axes"]["column"][:3] == ["h0:t1", "h0:t5", "h0:t6/t9"] and len(data["axes"]["column"]) == 20
    assert (out / "patch.png").read_bytes()[
        :4
    ] == b"\x89PNG" and "strongest site: head_out" in capsys.readouterr().out
    assert (
        main(["patch", "--model", "tiny-llama", *BASE, "--points", "head_out,resid_pre", "--out", str(out)])
        == 2
    )
    assert "patch them in a run of their own" in capsys.readouterr().err


def test_steer_from_two_prompts_and_from_stores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    argv = [
        "steer",
        "--model",
        "tiny-llama",
        "--prompt",
        "t1 t5 t6 t7 t8",
        "--target",
        "t11",
        "--foil",
        "t12",
    ]
    args = [*argv, "--toward", "t1 t5 t9 t7 t8", "--away", "t1 t5 t6 t7 t8", "--points", "blocks.*.resid_pre"]
    assert main([*args, "--alphas", "0", "1", "-1", "--role", "text", "--out", str(out)]) == 0
    data = json.loads((out / "steer.json").read_text())
    assert data["points"] == ["blocks.0.resid_pre", "blocks.1.resid_pre"] and data["alphas"] == [
        0.0,
        1.0,
        -1.0,
    ]
    assert data["direction"]["source"] == "states" and data["target"]["id"] == 11
    back = SteerResult.load(out)
    assert torch.allclose(
        back.values[:, 0], torch.full((2,), back.plain), atol=1e-5
    )  # alpha 0: the plain run
    assert (out / "steer.png").read_bytes()[:4] == b"\x89PNG" and "largest change" in capsys.readouterr().out
    stores = []
    for name, prompt in (("a", "t1 t5 t9 t7 t8"), ("b", "t1 t5 t6 t7 t8")):
        stores.append(str(tmp_path / name))
        prompts = tmp_path / f"{name}.txt"
        prompts.write_text(json.dumps({"id": name, "text": prompt}) + "\n")
        capture = [
            "capture",
            "--model",
            "tiny-llama",
            "--prompts",
            str(prompts),
            "--points",
            "blocks.*.resid_pre",
        ]
        assert main([*capture, "--out", stores[-1]]) == 0
    out = tmp_path / "m"
    assert (
        main(
            [
                *argv,
                "--stores",
                *stores,
                "--points",
                "blocks.1.resid_pre",
                "--alphas",
                "0",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "steer.json").read_text())["direction"]["source"] == "stores"
    assert main([*argv, "--stores", *stores, "--points", "blocks.1.resid_post", "--out", str(out)]) == 2
    assert "--stores: no hook point 'blocks.1.resid_post'" in capsys.readouterr().err


def test_steer_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["steer", "--model", "tiny-llama", "--prompt", "t1 t5 t6", "--target", "t11", "--foil", "t12"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "exactly one direction source" in capsys.readouterr().err
    assert main([*argv, "--toward", "t1 t5 t9", "--out", str(tmp_path / "x")]) == 2
    assert "--toward and --away go together" in capsys.readouterr().err
    assert (
        main(
            [
                *argv,
                "--toward",
                "t1",
                "--away",
                "t2",
                "--points",
                "blocks.9.resid_pre",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "blocks.9.resid_pre" in capsys.readouterr().err


def test_sweep_config_accepts_head_kinds() -> None:
    from uniprobe.experiments.sweep.config import SECTIONS
    from uniprobe.experiments.sweep.schema import ConfigError

    check, _ = SECTIONS["patch"]["kinds"]
    assert check("head_out_pos", "patch.kinds") == ["head_out_pos"]
    with pytest.raises(ConfigError, match="unknown value 'heads'"):
        check(["heads"], "patch.kinds")


def test_steer_from_a_saved_probe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from uniprobe.probes.results import ProbeResults, probe_key

    w = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    parts = {"weight": w, "bias": torch.zeros(2), "mean": torch.zeros(32), "std": torch.ones(32)}
    rows = [{"point": "blocks.1.resid_pre", "layer": 1, "role": "text", "accuracy": 1.0, "C": 1.0}]
    key = probe_key("blocks.1.resid_pre", "text")
    directions = {f"{key}/{k}": v for k, v in parts.items()}
    ProbeResults(rows, {"classes": [3, 4]}, directions).save(tmp_path / "probe", plot=False)
    argv = ["steer", "--model", "tiny-llama", "--prompt", "t1 t5 t6", "--target", "t11", "--foil", "t12"]
    argv += ["--probe", str(tmp_path / "probe"), "--probe-role", "text", "--points", "blocks.1.resid_pre"]
    assert main([*argv, "--class", "4", "--alphas", "0", "3", "--out", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "steer.json").read_text())
    assert data["direction"] == {**data["direction"], "source": "probe", "class": "4", "role": "text"}
    assert data["direction"]["norms"]["blocks.1.resid_pre"] == pytest.approx(1.0)  # a unit direction
    assert main([*argv, "--class", "5", "--out", str(tmp_path / "t")]) == 2
    assert "not one of the probe's classes ['3', '4']" in capsys.readouterr().err
    argv[argv.index("blocks.1.resid_pre")] = "blocks.0.resid_pre"
    assert main([*argv, "--class", "4", "--out", str(tmp_path / "t")]) == 2
    assert "steer the points the probe read" in capsys.readouterr().err
