"""Smoke run of the attention benchmark on a tiny Llama: head patching (all positions, each position) equals
TransformerLens's get_act_patch_attn_head_out_* on the same weights, and the knockout bench is called (or its
absence said). No timings are asserted: the bench measures them."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_attention", Path(__file__).resolve().parents[1] / "experiments" / "bench" / "attention.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_patching_bench_grids_equal_transformer_lens(capsys):
    res = bench.heads_vs_transformer_lens(layers=2, d_model=64, seq=5, vocab=64)
    for name, sites in (("all_pos", 8), ("by_pos", 40)):
        assert res[name]["sites"] == sites and res[name]["diff"] <= bench.TARGET_DIFF
        assert res[name]["ours"] > 0 and res[name]["transformer_lens"] > 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "get_act_patch_attn_head_out_by_pos" in out


def test_main_runs_heads_then_the_knockout_bench(capsys):
    assert bench.main(["--layers", "2", "--d-model", "64", "--seq", "9", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "== head patching" in out and "knockout" in out
