"""`uniprobe attention` and `uniprobe knockout`: files written, numbers from the library, bad input: 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from uniprobe.experiments import attention as lib
from uniprobe.experiments.cli import attention as cli
from uniprobe.experiments.cli import main
from uniprobe.probes.attention.mass import MassTable
from uniprobe.probes.patching.results import PatchResult

pytestmark = pytest.mark.usefixtures("one_thread")


def test_modes_agree_with_the_library() -> None:
    assert cli.MODES == lib.MODES


def test_attention_writes_patterns_mass_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "a"
    argv = ["attention", "--model", "sandbox-query", "--prompt", "what is 2 + 1 ?", "--mode", "generation"]
    assert main([*argv, "--query-roles", "query", "--key-roles", "text", "--out", str(out)]) == 0
    patterns = load_file(str(out / "patterns.safetensors"))["patterns"]
    about = json.loads((out / "patterns.json").read_text())
    assert patterns.shape == (4, 4, 16, 16) and about["roles"][-1] == "query"
    torch.testing.assert_close(patterns.sum(-1), torch.ones(4, 4, 16))
    table = MassTable.load(out)
    text = torch.tensor([r == "text" for r in about["roles"]])
    want = patterns[:, :, 8:][..., text].sum(-1).mean(-1)  # query rows 8..15 on the text keys
    torch.testing.assert_close(table.values, want, atol=1e-6, rtol=1e-5)
    for png in ("attention.png", "mass.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "mass query → text" in capsys.readouterr().out


def test_knockout_writes_grid_and_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k"
    argv = ["knockout", "--model", "tiny-llama", "--prompt", "t1 t5 t6 t7 t8", "--query", "-1", "-2"]
    assert (
        main([*argv, "--keys", "early=1,2", "bos=0", "--target", "t11", "--foil", "t12", "--out", str(out)])
        == 0
    )
    res = PatchResult.load(out)
    assert res.method == "knockout" and res.grid.columns == ["early", "bos"] and res.grid.layers == [0, 1]
    assert res.grid.meta["knockouts"][0]["query_positions"] == [4, 3] and res.metric == "logit_diff(11-12)"
    assert (out / "knockout.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "knockout of 4 configurations" in text and "largest change: group" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["knockout", "--keys", "cot", "--target", "t1"], "key group 'cot': write NAME=ROLE"),
        (["knockout", "--keys", "x=text,3", "--target", "t1"], "give role names or positions, not both"),
        (
            ["knockout", "--keys", "x=cot", "--target", "t1", "--query", "-1"],
            "--query/--keys ['cot']: not in this prompt",
        ),
        (["knockout", "--keys", "x=text", "--target", "id:999", "--query", "-1"], "999"),
        (["attention", "--layers", "9"], "--layers [9]: the model has 2 blocks"),
        (["attention", "--query-roles", "image_gen"], "--query-roles ['image_gen']: not in this prompt"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    base = ["--model", "tiny-llama", "--prompt", "t1 t5 t6", "--out", str(tmp_path / "x")]
    assert main([*argv[:1], *base, *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_points_lists_the_attention_points(capsys: pytest.CaptureFixture) -> None:
    assert main(["points", "--model", "tiny-llama"]) == 0
    assert "blocks.{0..1}.attn.{q,k,v,scores,pattern,z,head_out}" in capsys.readouterr().out
