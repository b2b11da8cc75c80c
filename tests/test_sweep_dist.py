"""Sweeps across processes with PyTorch's launcher: ``torchrun --nproc-per-node 2 -m uniprobe sweep``
on CPU (gloo); the merged store and index equal a single-process sweep's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from uniprobe.experiments.sweep import load_config, run_sweep
from uniprobe.hooks.store import ActivationStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, distribute: str, models: list[str]) -> Path:
    lines = []
    for i in range(14):
        a, b = 5 + (7 * i) % 20, 5 + (3 * i) % 20
        line = {"id": f"p{i}", "text": f"t{a} t{b} t3", "labels": {"answer": f"t{10 + (a + b) % 3}"}}
        lines.append(json.dumps(line))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    raw = {
        "name": f"ranks-{distribute}",
        "models": [{"path": m} for m in models],
        "tasks": [{"name": "sums", "prompts": "prompts.jsonl"}],
        "analyses": ["capture", "probe"],
        "capture": {"batch_size": 3, "shard_size": 3, "points": ["blocks.*.resid_post", "final_norm"]},
        "probe": {"folds": 2, "n_boot": 20},
        "sweep": {"distribute": distribute, "timeout_minutes": 10},
    }
    path = tmp_path / f"{distribute}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(config: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "uniprobe", "sweep", str(config), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _assert_same_sweep(a: Path, b: Path, runs: list[str]) -> None:
    index_a, index_b = (json.loads((p / "index.json").read_text()) for p in (a, b))
    strip = lambda entries: [{k: v for k, v in e.items() if k != "seconds"} for e in entries]  # noqa: E731
    assert strip(index_a["runs"]) == strip(index_b["runs"])
    assert index_a["counts"] == {"done": len(runs), "failed": 0, "pending": 0}
    for run in runs:
        sa = ActivationStore.open(a / "runs" / run / "store", verify="full")
        sb = ActivationStore.open(b / "runs" / run / "store", verify="full")
        assert sa.complete and sa.examples == sb.examples and sa.model == sb.model
        assert [r["n_examples"] for r in sa.manifest["shards"]] == [
            r["n_examples"] for r in sb.manifest["shards"]
        ]
        for p in sa.points:
            for reduce in ("last", "mean"):
                ma, mb = sa.matrix(p, reduce=reduce), sb.matrix(p, reduce=reduce)
                assert torch.equal(ma.example, mb.example) and ma.labels == mb.labels
                torch.testing.assert_close(ma.values, mb.values, atol=1e-6, rtol=0)
        assert not (a / "runs" / run / "store.parts").exists()


def test_two_ranks_split_the_examples_and_merge_one_store(tmp_path):
    config = _config(tmp_path, "examples", ["tiny-llama"])
    proc = _torchrun(config, tmp_path / "ranks")
    assert "1 runs on 2 ranks, sharing examples" in proc.stdout
    run_sweep(load_config(config, out=str(tmp_path / "single")))
    _assert_same_sweep(tmp_path / "ranks", tmp_path / "single", ["tiny-llama__sums"])
    again = _torchrun(config, tmp_path / "ranks")  # resumes: nothing left to do
    assert "done before, skipped" in again.stdout


def test_two_ranks_split_the_runs_and_write_one_index(tmp_path):
    config = _config(tmp_path, "runs", ["tiny-llama", "tiny-qwen2"])
    proc = _torchrun(config, tmp_path / "ranks")
    assert (
        "[rank 0] [1/2] tiny-llama__sums" in proc.stdout and "[rank 1] [2/2] tiny-qwen2__sums" in proc.stdout
    )
    run_sweep(load_config(config, out=str(tmp_path / "single")))
    _assert_same_sweep(tmp_path / "ranks", tmp_path / "single", ["tiny-llama__sums", "tiny-qwen2__sums"])
