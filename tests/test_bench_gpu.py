"""experiments/bench/gpu.py: without CUDA it says so and exits 0 having measured nothing; its every stage
runs (CPU, toy sizes, Triton through its interpreter) so it is ready for a lent GPU.

The smoke run is a fresh process: ``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench" / "gpu.py"
_SPEC = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would really run")
def test_without_cuda_it_exits_cleanly_with_a_message(capsys):
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "nothing measured" in out


def test_smoke_needs_the_interpreter(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gpu.main(["--smoke"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_every_stage_runs_on_cpu_at_toy_sizes():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in ("attribution [", "head attribution [", "scatter ["):
        line = next(x for x in out.splitlines() if name in x)
        assert "GB/s" in line and "speed-up" in line
        assert float(line.rsplit("max diff", 1)[1]) <= 1e-4  # Triton agrees with torch
    assert "exact sweep" in out and "one forward per site" in out and "attribution patching" in out
    assert "== knockout" in out and "total" in out
