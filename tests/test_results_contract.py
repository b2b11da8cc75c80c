"""Every result type keeps one contract: to_dict() / save(dir) / load(dir), through one JSON helper."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from uniprobe.experiments.seeds.gapeval import GapEvalResult, gap_score
from uniprobe.experiments.seeds.r3 import R3Result, R3Round
from uniprobe.experiments.seeds.results import InjectResult, StarsResult
from uniprobe.hooks.jsonio import JsonFileError, dumps, pack_rows, read_json, unpack_rows, write_json
from uniprobe.hooks.results_io import ResultIO, SavedFiles
from uniprobe.probes.lens import LensResult
from uniprobe.probes.patching.results import PatchResult
from uniprobe.probes.patching.sites import PatchSite, grid_sites
from uniprobe.probes.results import ProbeResults
from uniprobe.probes.tuned_lens import TunedLens


def _round_trip(result: ResultIO, tmp_path: Path, **save_kw) -> ResultIO:
    """save → load, checking the contract's common promises; returns the loaded result."""
    assert isinstance(result, ResultIO)
    files = result.save(tmp_path / "out", **save_kw)
    assert isinstance(files, SavedFiles) and files.dir == tmp_path / "out"
    assert all(p.exists() and p.parent == files.dir for p in files.values())
    back = type(result).load(files.dir)
    assert type(back) is type(result)
    assert back.to_dict() == result.to_dict()
    json.dumps(back.to_dict(), allow_nan=False)  # plain JSON
    return back


@dataclass
class _Point:
    x: int
    where: Path


def test_jsonio_converts_writes_atomically_and_names_bad_files(tmp_path) -> None:
    obj = {
        "t": torch.tensor([1.0, 2.0]),
        "a": np.arange(3),
        "s": np.float32(0.5),
        "p": Path("/x/y"),
        "d": _Point(1, Path("z")),
        "set": {3, 1},
    }
    assert json.loads(dumps(obj)) == {
        "t": [1.0, 2.0], "a": [0, 1, 2], "s": 0.5, "p": "/x/y", "d": {"x": 1, "where": "z"}, "set": [1, 3],
    }  # fmt: skip
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        dumps({"o": object()})
    assert json.loads(dumps({"o": 1j}, fallback=str)) == {"o": "1j"}
    path = write_json(tmp_path / "new" / "r.json", obj)
    assert path.read_text().endswith("\n") and read_json(path)["t"] == [1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind
    (tmp_path / "bad.json").write_text('{"rows": [1, 2')
    with pytest.raises(JsonFileError, match=r"bad\.json is not valid JSON \(line 1"):
        read_json(tmp_path / "bad.json")
    rows = [{"a": 1, "b": None}, {"a": 2, "b": "x"}]
    assert pack_rows(rows)["columns"] == ["a", "b"] and unpack_rows(pack_rows(rows)) == rows
    ragged = [{"a": 1}, {"b": 2}]
    assert unpack_rows(json.loads(dumps(pack_rows(ragged)))) == ragged


def test_probe_results_round_trip(tmp_path) -> None:
    rows = [
        {"point": "blocks.0.resid_post", "layer": 0, "role": "text", "accuracy": 0.75, "C": 1.0, "n": 8},
        {"point": "blocks.1.resid_post", "layer": 1, "role": "text", "accuracy": 1.0, "C": 0.1, "n": 8},
    ]
    g = torch.Generator().manual_seed(0)
    directions = {
        f"{r['point']}|text/{part}": torch.randn(shape, generator=g)
        for r in rows
        for part, shape in (("weight", (2, 4)), ("bias", (2,)), ("mean", (4,)), ("std", (4,)))
    }
    res = ProbeResults(rows, {"label": "answer", "classes": ["a", "b"]}, directions)
    back = _round_trip(res, tmp_path, plot=False)
    assert back.directions.keys() == directions.keys()
    assert all(torch.equal(back.directions[k], v) for k, v in directions.items())
    assert back.to_dict() == {"meta": res.meta, "rows": rows}


def test_lens_result_round_trip(tmp_path) -> None:
    rows = [
        {"lens": lens, "point": f"blocks.{layer}.resid_post", "layer": layer, "example": ex, "pos": 3,
         "role": "query", "step": 0, "token": 7, "token_str": None, "rank": 1 + layer, "prob": 0.125,
         "top_token": 7}
        for lens in ("logit", "tuned") for layer in (0, 1) for ex in ("ex-0", "17")
    ]  # fmt: skip
    kl = [{"lens": "logit", "point": "blocks.0.resid_post", "layer": 0, "kl": 0.5, "n": 2}]
    res = LensResult(rows, kl, {"adapter": "tiny", "points": ["blocks.0.resid_post"]})
    back = _round_trip(res, tmp_path, plot=False)
    assert back.rows == rows and back.kl == kl and back.summary() == res.summary()
    assert set(read_json(tmp_path / "out" / "lens.json")) == {"meta", "summary", "kl"}  # as before


def test_tuned_lens_round_trip_folder_and_file(tmp_path) -> None:
    lens = TunedLens(["blocks.0.resid_post", "blocks.1.resid_post"], 4)
    with torch.no_grad():
        lens.weight.normal_(generator=torch.Generator().manual_seed(1))
        lens.bias.fill_(0.5)
    back = _round_trip(lens, tmp_path)
    assert back.points == lens.points and back.d_model == 4
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    lens.save(tmp_path / "tl.safetensors")  # a .safetensors path is still one file
    assert torch.equal(TunedLens.load(tmp_path / "tl.safetensors").weight, lens.weight)


def test_patch_result_round_trip(tmp_path) -> None:
    grid = grid_sites(2, 2, ("resid_pre", "attn_out"), labels=["a", "b"])
    v = torch.tensor([0.0, 1.0, float("nan"), 4.0, 2.0, -1.0, 0.5, 3.0])
    res = PatchResult(
        v, 4.0, 0.0, grid.sites, grid, metric="logit_diff", seconds=1.5,
        info={"strategy": "resume", "chunks": 2, "notes": ["n"]},
    )  # fmt: skip
    assert res.to_json() == res.to_dict()  # the older name still works
    back = _round_trip(res, tmp_path)
    torch.testing.assert_close(back.values, v, rtol=0, atol=0, equal_nan=True)  # NaN kept exactly
    assert back.sites == res.sites and back.grid.shape == grid.shape and back.info == res.info
    assert torch.equal(back.as_grid(False).nan_to_num(), res.as_grid(False).nan_to_num())
    sites = [PatchSite("blocks.0.resid_pre", (1, 2), (0, 1), "moved"), PatchSite("connector.out", (0,))]
    loose = PatchResult(torch.tensor([0.5, 1.0]), 1.0, 0.0, sites, method="attribution", info={"forwards": 2})
    back = _round_trip(loose, tmp_path / "loose")
    assert back.grid is None and back.sites == sites and back.method == "attribution"


def test_seed_results_round_trip(tmp_path) -> None:
    cats = ["add", "add", "add", "sub", "sub", "sub"]
    score, rows = gap_score(cats, [1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1])
    gap = GapEvalResult(score, rows)
    assert _round_trip(gap, tmp_path / "gap", plot=False) == gap
    assert (tmp_path / "gap" / "out" / "gapeval.md").exists()
    assert read_json(tmp_path / "gap" / "out" / "gapeval.json")["score"] == score  # the file's old shape

    r3 = R3Result([R3Round(0, 0.5), R3Round(1, 0.75, 0.25, 0.0, 0.75, 0.5)], ["a", "b"])
    assert _round_trip(r3, tmp_path / "r3", title="sandbox-ar: R3") == r3
    assert (tmp_path / "r3" / "out" / "r3.png").stat().st_size > 1000
    assert (tmp_path / "r3" / "out" / "r3.md").read_text().startswith("### sandbox-ar: R3")

    inj = InjectResult(
        model_arch="ar", settings={"steps": 3}, before={"acc": np.float64(0.5), "t": torch.tensor([1, 2])},
        markdown="### injection",
    )  # fmt: skip
    back = _round_trip(inj, tmp_path / "inject")
    assert back["before"] == {"acc": 0.5, "t": [1, 2]} and "markdown" not in back
    assert (tmp_path / "inject" / "out" / "inject.md").read_text() == "### injection\n"
    stars = StarsResult(model_arch="query", filter={"1": {"kept": 2}}, model=torch.nn.Linear(2, 2))
    back = _round_trip(stars, tmp_path / "stars")
    assert "model" not in back and back["filter"] == {"1": {"kept": 2}}
