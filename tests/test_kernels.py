"""uniprobe.probes.kernels: the Triton kernels, run on CPU by Triton's interpreter, match the torch
reference; the dispatcher picks torch on CPU and Triton only on CUDA or when forced; without
triton everything falls back cleanly.

``TRITON_INTERPRET=1`` must be set before triton is first imported — and in a full test run
another module has long since imported it (importing a transformers model class does), so the
kernels run in a fresh process (``python -m uniprobe.probes.kernels.selfcheck``) with the variable set.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from uniprobe.probes import kernels
from uniprobe.probes.kernels import reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """The selfcheck report from a fresh process with ``TRITON_INTERPRET=1`` (and the sweep check)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "uniprobe.probes.kernels.selfcheck", "--patching"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"selfcheck printed no report (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def _check(report: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    found = [c for c in report["checks"] if c["name"].startswith(prefix)]
    assert found, f"no selfcheck named {prefix!r}"
    bad = [c for c in found if not c["ok"]]
    assert not bad, bad
    return found


def test_triton_runs_interpreted_on_cpu(interpreted: dict[str, Any]) -> None:
    assert interpreted["device"] == "cpu" and interpreted["interpret"] is True
    assert interpreted["ok"]


def test_attribution_kernel_matches_reference(interpreted: dict[str, Any]) -> None:
    checks = _check(interpreted, "attribution")
    assert len(checks) == 5  # 4 float32 shapes (d up to 300: several feature tiles) + float16


def test_head_attribution_kernel_matches_reference(interpreted: dict[str, Any]) -> None:
    checks = _check(interpreted, "head attribution")
    assert len(checks) == 5  # 3 float32 shapes (d_head 130: two tiles), a strided head view, float16


def test_scatter_kernel_matches_reference_exactly(interpreted: dict[str, Any]) -> None:
    checks = _check(interpreted, "scatter")
    assert len(checks) == 5 and all(c["max_abs_diff"] == 0.0 for c in checks)  # incl. empty, strided


def test_patching_sweep_with_triton_scatter_matches_torch(interpreted: dict[str, Any]) -> None:
    assert _check(interpreted, "patch_sweep")[0]["max_abs_diff"] <= 1e-6


# -- in this process: the reference, the dispatcher, the fallback ----------------------------------


def test_reference_semantics() -> None:
    g = torch.Generator().manual_seed(0)
    clean, corrupted, grad = (torch.randn(2, 3, 5, generator=g) for _ in range(3))
    want = ((clean.double() - corrupted.double()) * grad.double()).sum(-1)
    torch.testing.assert_close(reference.attribution_scores(clean, corrupted, grad).double(), want)
    dest = torch.zeros(2, 3, 4)
    values = torch.arange(8.0).view(2, 4)
    out = reference.scatter_rows(dest, values, torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert out is dest and torch.equal(dest[1, 2], values[0]) and torch.equal(dest[0, 0], values[1])
    assert dest.abs().sum() == values.sum()  # nothing else written


def test_head_reference_is_the_per_head_einsum() -> None:
    g = torch.Generator().manual_seed(1)
    clean, corrupted, grad = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    got = kernels.head_attribution_scores(clean, corrupted, grad)
    assert got.shape == (2, 3, 4) and got.dtype == torch.float32
    want = torch.einsum("bphd,bphd->bph", clean.double() - corrupted.double(), grad.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # float32 accumulation
    # heads summed = the whole-vector attribution score of the flat [.., h*d] tensors
    flat = kernels.attribution_scores(*(t.reshape(2, 3, 20) for t in (clean, corrupted, grad)))
    torch.testing.assert_close(got.sum(-1), flat, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="split the heads first"):
        kernels.head_attribution_scores(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_shape_errors_are_clear() -> None:
    a = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="one shape"):
        kernels.attribution_scores(a, a, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"values must be \[m, 4\]"):
        kernels.scatter_rows(a, torch.zeros(1, 5), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(IndexError, match="position out of range"):
        kernels.scatter_rows(a, torch.zeros(1, 4), torch.tensor([0]), torch.tensor([3]), force="triton")


def test_dispatcher_picks_torch_on_cpu_and_triton_only_on_cuda_or_when_forced() -> None:
    cpu = torch.zeros(2, 2)
    assert kernels.triton_available()
    assert kernels.backend_for(cpu) == "torch"
    assert kernels.backend_for(cpu, force="triton") == "triton"
    assert kernels.backend_for(cpu, force="torch") == "torch"
    fake_cuda = SimpleNamespace(is_cuda=True)
    assert kernels.backend_for(fake_cuda) == "triton"
    assert kernels.backend_for(fake_cuda, cpu) == "torch"  # mixed devices: the reference
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.backend_for(cpu, force="cuda")


@pytest.fixture
def no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine without triton: importing it (or anything under it) fails."""
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, "uniprobe.probes.kernels.triton_kernels", raising=False)


def test_fallback_when_triton_is_absent(no_triton: None) -> None:
    assert not kernels.triton_available()
    assert kernels.backend_for(SimpleNamespace(is_cuda=True)) == "torch"  # even on CUDA tensors
    g = torch.Generator().manual_seed(3)
    clean, corrupted, grad = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(
        kernels.attribution_scores(clean, corrupted, grad),
        reference.attribution_scores(clean, corrupted, grad),
    )
    dest = torch.randn(2, 5, 8, generator=g)
    values, rows, positions = torch.randn(3, 8, generator=g), torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2])
    got = kernels.scatter_rows(dest.clone(), values, rows, positions)
    assert torch.equal(got, reference.scatter_rows(dest.clone(), values, rows, positions))
    with pytest.raises(RuntimeError, match="triton is not importable"):
        kernels.attribution_scores(clean, corrupted, grad, force="triton")


def test_patching_falls_back_to_torch_kernels_without_triton(no_triton: None) -> None:
    from uniprobe.experiments.tiny import tiny_llama
    from uniprobe.hooks.adapters import adapter_for
    from uniprobe.probes.patching import LogitDiff, attribution_patch, grid_sites, patch_sweep

    model, _ = tiny_llama()
    adapter = adapter_for(model)
    clean = adapter.prepare(model, [{"input_ids": [1, 5, 6, 7]}])
    corrupted = adapter.prepare(model, [{"input_ids": [1, 9, 6, 7]}])
    sites = grid_sites(2, 4)
    res = patch_sweep(model, clean, corrupted, sites, LogitDiff(11, 12))
    assert torch.isfinite(res.values).all()
    assert attribution_patch(model, clean, corrupted, sites, LogitDiff(11, 12)).info["kernel"] == "torch"
