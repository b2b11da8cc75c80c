"""Smoke run of the patching benchmark on a tiny Llama: every tool runs and the grids agree.

No timings are asserted (the bench measures them; tests only check it computes the same thing).
"""

import importlib.util
from pathlib import Path

import pytest
from uniprobe.hooks.adapters import adapter_for

# the benchmarks are scripts of the repository, not part of the installed package: load by path
_SPEC = importlib.util.spec_from_file_location(
    "bench_patching", Path(__file__).resolve().parents[1] / "experiments" / "bench" / "patching.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_three_tools_agree(capsys):
    model = bench.llama(2, 64, 64)
    adapter = adapter_for(model)
    res = bench.bench("tiny", model, adapter, *bench.random_inputs(model, adapter, 6), extras=True)
    out = capsys.readouterr().out
    for tool in ("nnsight", "transformer_lens"):
        assert res[tool]["diff"] <= bench.TARGET_DIFF, tool
        assert res[tool]["seconds"] > 0
    assert res["info"]["suffix"] is True  # the fast path is on (the bench prints it)
    assert res["limit"] > 0 and res["rate"] > 0
    assert "suffix True" in out and "from the limit" in out and "engine time" in out


def test_nnsight_sweep_matches_engine_grid():
    model = bench.llama(2, 64, 64, seed=3)
    adapter = adapter_for(model)
    res = bench.bench(
        "tiny", model, adapter, *bench.random_inputs(model, adapter, 5), tools=("nnsight",), extras=False
    )
    assert res["nnsight"]["diff"] <= 1e-5
    assert "transformer_lens" not in res
