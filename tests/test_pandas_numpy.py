"""numpy / pandas access: Matrix.numpy / to_pandas, and to_pandas of probe, lens and patch results."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from uniprobe.experiments.tiny import tiny_llama
from uniprobe.hooks.errors import MissingDependencyError
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.hooks.store.reader import Matrix
from uniprobe.probes.lens import LensResult
from uniprobe.probes.patching.results import PatchResult
from uniprobe.probes.patching.sites import PatchSite, SiteGrid
from uniprobe.probes.results import COLUMNS, ProbeResults

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    model, _ = tiny_llama()
    examples = [{"id": f"ex{i}", "input_ids": [1, 5 + i, 7], "labels": {"answer": i % 2}} for i in range(5)]
    out = tmp_path_factory.mktemp("np") / "s"
    store = capture_dataset(model, examples, "blocks.0.resid_post", out, batch_size=2, progress=False)
    return store.matrix("blocks.0.resid_post", role="text", reduce="last")


def test_matrix_numpy_is_the_values(matrix):
    arr = matrix.numpy()
    assert isinstance(arr, np.ndarray) and arr.shape == tuple(matrix.values.shape)
    np.testing.assert_array_equal(arr, matrix.values.numpy())
    bf = Matrix(values=torch.ones(2, 3, dtype=torch.bfloat16), example=torch.arange(2), labels={})
    assert bf.numpy().dtype == np.float32


def test_matrix_to_pandas_columns_and_array(matrix):
    df = matrix.to_pandas()
    d = matrix.values.shape[1]
    assert list(df.columns[:3]) == ["example", "id", "answer"] and len(df.columns) == 3 + d
    assert df["id"].tolist() == [f"ex{i}" for i in range(5)] and df["answer"].tolist() == [0, 1, 0, 1, 0]
    np.testing.assert_array_equal(df[[f"f{i}" for i in range(d)]].to_numpy(), matrix.numpy())
    arr = matrix.to_pandas(features="array")
    assert list(arr.columns) == ["example", "id", "answer", "values"]
    np.testing.assert_array_equal(np.stack(arr["values"].to_list()), matrix.numpy())
    with pytest.raises(ValueError, match="features"):
        matrix.to_pandas(features="wide")


def test_probe_results_to_pandas_one_row_per_probe():
    rows = [
        {"point": f"blocks.{i}.resid_post", "layer": i, "role": "text", "accuracy": 0.5 + i / 10, "C": 1.0}
        for i in range(3)
    ]
    df = ProbeResults(rows=rows, meta={}).to_pandas()
    assert len(df) == 3 and list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert df["accuracy"].tolist() == [0.5, 0.6, 0.7] and df["point"][2] == "blocks.2.resid_post"


def test_lens_result_to_pandas_tables():
    rows = [
        {"lens": "logit", "point": f"blocks.{i}.resid_post", "layer": i, "example": 0, "pos": 2,
         "role": "text", "step": 0, "token": 5, "rank": 3 - i, "prob": 0.1 * i, "top_token": 5}
        for i in range(3)
    ]  # fmt: skip
    res = LensResult(rows=rows, kl=[{"lens": "logit", "point": "blocks.0.resid_post", "layer": 0, "kl": 1.0}])
    assert len(res.to_pandas()) == 3 and res.to_pandas()["rank"].tolist() == [3, 2, 1]
    assert len(res.to_pandas("summary")) == 3 and "mean_rank" in res.to_pandas("summary")
    assert res.to_pandas("kl")["kl"].tolist() == [1.0]
    with pytest.raises(ValueError, match="table"):
        res.to_pandas("other")


def test_patch_result_to_pandas_one_row_per_site():
    sites = [
        PatchSite(f"blocks.{layer}.resid_pre", (c,), label=f"p{c}") for layer in range(2) for c in range(3)
    ]
    grid = SiteGrid(sites, ["resid_pre"], [0, 1], ["p0", "p1", "p2"])
    res = PatchResult(torch.arange(6.0), clean=5.0, corrupted=0.0, sites=sites, grid=grid)
    df = res.to_pandas()
    assert len(df) == 6 and df["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert df["normalised"].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert df["layer"].tolist() == [0, 0, 0, 1, 1, 1] and df["column"].tolist() == ["p0", "p1", "p2"] * 2
    assert df["positions"][4] == (1,) and df["point"][4] == "blocks.1.resid_pre"


def test_without_pandas_a_clear_error(monkeypatch, matrix):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install pandas"):
        matrix.to_pandas()
    with pytest.raises(MissingDependencyError, match="pip install pandas"):
        ProbeResults(rows=[], meta={}).to_pandas()
    assert matrix.numpy().shape[0] == 5  # numpy access needs no pandas
