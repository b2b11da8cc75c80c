"""``uniprobe patch``: JSON (grid, axes, baselines, metric, timing) and a heatmap PNG for a built-in
tiny model and a local transformers folder; mismatched prompt lengths are an error unless
``--align end``; bad tokens and points are named."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from uniprobe.experiments.cli.patch import add_patch_parser

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="uniprobe")
    add_patch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["patch", *argv])
    return args.func(args)


BASE = ("--clean", "t1 t5 t6 t7 t8", "--corrupted", "t1 t5 t9 t7 t8", "--target", "t11", "--foil", "t12")


def test_patch_writes_json_and_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p"
    assert (
        run("--model", "tiny-llama", *BASE, "--points", "resid_pre,attn_out", "mlp_out", "--out", str(out))
        == 0
    )
    data = json.loads((out / "patch.json").read_text())
    assert data["method"] == "exact" and data["direction"] == "denoise"
    assert data["axes"]["kind"] == ["resid_pre", "attn_out", "mlp_out"] and data["axes"]["layer"] == [0, 1]
    assert data["axes"]["column"] == ["t1", "t5", "t6/t9", "t7", "t8"]  # differing position marked
    assert len(data["grid"]) == 3 and len(data["grid"][0]) == 2 and len(data["grid"][0][0]) == 5
    assert (
        set(data["baselines"]) == {"clean", "corrupted"}
        and data["baselines"]["clean"] != data["baselines"]["corrupted"]
    )
    assert data["metric"]["name"] == "logit_diff" and data["metric"]["target"]["id"] == 11
    assert data["timing"]["seconds"] > 0 and data["timing"]["strategy"] == "resume"
    assert data["prompts"]["corrupted"]["ids"] == [1, 5, 9, 7, 8]
    assert data["grid_normalised"][0][0][2] == pytest.approx(1.0, abs=1e-4)  # the differing embedding
    assert (out / "patch.png").read_bytes()[:4] == b"\x89PNG"
    assert "strongest site" in capsys.readouterr().out


def test_patch_attribution_and_noising_on_a_query_model(tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert (
        run(
            "--model",
            "tiny-query",
            *BASE,
            "--method",
            "attribution",
            "--direction",
            "noise",
            "--out",
            str(out),
        )
        == 0
    )
    data = json.loads((out / "patch.json").read_text())
    assert data["method"] == "attribution" and data["direction"] == "noise"
    assert data["axes"]["column"][-4:] == ["q0", "q1", "q2", "q3"]  # the appended query tokens
    assert data["metric"]["position"] == 4  # the last prompt token, not a query


def test_mismatched_lengths_need_explicit_alignment(tmp_path: Path) -> None:
    short = ("--clean", "t1 t5 t6 t7 t8", "--corrupted", "t1 t9 t7 t8", "--target", "t11", "--foil", "t12")
    with pytest.raises(ValueError, match="5 tokens, corrupted has 4.*--align end"):
        run("--model", "tiny-llama", *short, "--out", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # no silent result
    assert run("--model", "tiny-llama", *short, "--align", "end", "--out", str(tmp_path / "e")) == 0
    data = json.loads((tmp_path / "e" / "patch.json").read_text())
    assert data["axes"]["column"] == ["t1", "t9", "t7", "t8"]
    assert [s["source_positions"] for s in data["sites"][:4]] == [[1], [2], [3], [4]]


def test_bad_tokens_and_points_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'t5 t6' is 2 tokens"):
        run("--model", "tiny-llama", *BASE[:6], "--foil", "t5 t6", "--out", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="unknown --points \\['resid_mid'\\]"):
        run("--model", "tiny-llama", *BASE, "--points", "resid_mid", "--out", str(tmp_path / "b"))


def test_patch_a_local_transformers_folder(tmp_path: Path) -> None:
    from uniprobe.experiments.tiny import tiny_llama
    from uniprobe.hooks.backends.tl_backend import word_level_tokenizer

    model, _ = tiny_llama()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    word_level_tokenizer(64, str(folder))
    # (this saved word-level tokenizer, reloaded by AutoTokenizer, splits digits: use one-digit words)
    assert (
        run("--model", str(folder), *BASE[:4], "--target", "t4", "--foil", "t3", "--out", str(tmp_path / "o"))
        == 0
    )
    data = json.loads((tmp_path / "o" / "patch.json").read_text())
    assert data["axes"]["column"] == ["t1", "t5", "t6/t9", "t7", "t8"]
    assert data["timing"]["suffix"] is True


def test_patch_a_sandbox_model_from_text_prompts(tmp_path: Path) -> None:
    from uniprobe.experiments.models import builtin_names

    if "sandbox-ar" not in builtin_names():
        pytest.skip("the sandbox AR checkpoint is not installed")
    prompts = ("--clean", "what is 2 + 1 ?", "--corrupted", "what is 3 + 1 ?", "--target", "3", "--foil", "4")
    assert run("--model", "sandbox-ar", *prompts, "--out", str(tmp_path / "s")) == 0
    data = json.loads((tmp_path / "s" / "patch.json").read_text())
    columns = data["axes"]["column"]
    assert columns[0] == "<bos>" and "2/3" in columns and columns[-1] == "<answer>"
    assert data["baselines"]["clean"] > data["baselines"]["corrupted"]  # the model answers 3 vs 4
    assert data["grid_normalised"][0][0][columns.index("2/3")] == pytest.approx(1.0, abs=1e-4)
