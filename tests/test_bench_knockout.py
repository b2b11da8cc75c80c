"""Smoke run of the knockout benchmark on a tiny Llama: both ways run and their grids agree.

No timings are asserted (the bench measures them; tests only check it computes the same thing).
"""

import importlib.util
from pathlib import Path

import pytest

# the benchmarks are scripts of the repository, not part of the installed package: load by path
_SPEC = importlib.util.spec_from_file_location(
    "bench_knockout", Path(__file__).resolve().parents[1] / "experiments" / "bench" / "knockout.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_sweep_equals_loop(capsys):
    model = bench._patching_bench().llama(3, 64, 64)
    res = bench.run(model, seq=10, drawn=4, repeats=1)
    assert res["configurations"] == 12 and res["diff"] <= bench.TARGET_DIFF and res["clean_diff"] == 0
    assert res["seconds"] > 0 and res["loop_seconds"] > 0 and res["info"]["suffix"] is True
    assert "speed-up" in capsys.readouterr().out


def test_bench_refuses_a_prompt_without_room():
    model = bench._patching_bench().llama(2, 64, 64)
    with pytest.raises(ValueError, match="leaves no room"):
        bench.drawing_prompt(model, 6, 5)
