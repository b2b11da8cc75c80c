"""Sweeps end to end on tiny models: run directories, index, resume after SIGKILL, failures, merging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from uniprobe.experiments.cli import main
from uniprobe.experiments.sweep import ConfigError, FailFastError, load_config, run_sweep
from uniprobe.experiments.sweep.merge import batch_slice, merge_parts
from uniprobe.experiments.tiny import tiny_llama
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.hooks.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int = 12) -> Path:
    """Prompts the tiny models' word tokenizer reads (``t5 t6 t3``), answers in three classes."""
    lines = []
    for i in range(n):
        a, b = 5 + (7 * i) % 20, 5 + (3 * i) % 20
        answer = f"t{10 + (a + b) % 3}"
        lines.append(json.dumps({"id": f"p{i}", "text": f"t{a} t{b} t3", "labels": {"answer": answer}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(tmp_path: Path, **extra) -> Path:
    write_prompts(tmp_path / "prompts.jsonl")
    raw = {
        "name": "tiny",
        "models": [{"path": "tiny-llama"}, {"path": "tiny-qwen2"}],
        "tasks": [{"name": "sums", "prompts": "prompts.jsonl"}],
        "analyses": ["capture", "probe", "lens", "patch"],
        "capture": {"batch_size": 4, "shard_size": 4, "roles": ["text"]},
        "probe": {"folds": 2, "n_boot": 20},
        "patch": {"n_pairs": 1},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def without_timing(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]


def test_sweep_writes_runs_and_index_and_skips_finished_runs(tmp_path, capsys):
    cfg = load_config(write_config(tmp_path), out=str(tmp_path / "out"))
    entries = run_sweep(cfg)
    root = tmp_path / "out"
    assert [e["id"] for e in entries] == ["tiny-llama__sums", "tiny-qwen2__sums"]
    assert all(e["status"] == "done" and e["error"] is None for e in entries)
    for e in entries:
        run = root / e["dir"]
        for name in ("config.json", "DONE.json", "results.json", "results.csv", "log.txt"):
            assert (run / name).exists(), name
        for name in ("probe/results.json", "probe/probe_map.png", "lens/lens.json", "lens/lens_map.png"):
            assert (run / name).exists(), name
        assert (run / "patch" / "pair-0" / "patch.json").exists() and (
            run / "patch" / "pair-0" / "patch.png"
        ).exists()
        assert json.loads((run / "config.json").read_text())["id"] == e["id"]
        store = ActivationStore.open(root / e["store"], verify="full")
        assert store.complete and store.n_examples == 12 and len(store.manifest["shards"]) == 3
        h = e["headline"]
        assert h["capture.examples"] == 12 and 0 <= h["probe.best_accuracy"] <= 1
        assert h["probe.probes"] == 2 and h["patch.pairs"] == 1 and h["lens.best_layer"] in (0, 1)
    index = json.loads((root / "index.json").read_text())
    assert index["counts"] == {"done": 2, "failed": 0, "pending": 0}
    csv_lines = (root / "index.csv").read_text().splitlines()
    assert csv_lines[0].startswith("id,model,task,status,seconds,error,dir,store,") and len(csv_lines) == 3
    assert "probe.best_accuracy" in csv_lines[0]

    before = mtimes(root / "runs")
    again = run_sweep(cfg)
    assert mtimes(root / "runs") == before  # nothing recomputed or rewritten
    assert without_timing(again) == without_timing(entries)
    assert "done before, skipped" in capsys.readouterr().out

    changed = load_config(write_config(tmp_path, probe={"folds": 3}), out=str(root))
    with pytest.raises(ConfigError, match=r"different config \(probe.folds: 2 → 3\).*--out.*--restart"):
        run_sweep(changed)
    run_sweep(load_config(write_config(tmp_path, analyses=["capture"]), out=str(root)), restart=True)
    assert sorted(p.name for p in (root / "runs" / "tiny-llama__sums").iterdir()) == [
        "DONE.json", "config.json", "results.csv", "results.json", "store"
    ]  # fmt: skip


def test_failed_run_is_recorded_and_the_sweep_continues(tmp_path, capsys):
    path = write_config(
        tmp_path,
        models=[{"path": "tiny-llama"}],
        tasks=[
            {"name": "no-label", "prompts": "prompts.jsonl", "probe": {"label": "colour"}},
            {"name": "sums", "prompts": "prompts.jsonl"},
        ],
        analyses=["capture", "probe"],
    )
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    index = json.loads((out / "index.json").read_text())
    failed, done = index["runs"]
    assert failed["status"] == "failed" and "label key 'colour' is not in the store" in failed["error"]
    assert done["status"] == "done"
    assert "FAILED" in capsys.readouterr().out
    failed_dir = out / failed["dir"]
    assert (failed_dir / "FAILED.json").exists() and not (failed_dir / "DONE.json").exists()
    assert "Traceback" in json.loads((failed_dir / "FAILED.json").read_text())["traceback"]
    assert ActivationStore.open(failed_dir / "store").complete  # the capture before the failure is kept
    row = next(line for line in (out / "index.csv").read_text().splitlines() if line.startswith(failed["id"]))
    assert ",failed," in row and "colour" in row

    fresh = tmp_path / "fresh"
    with pytest.raises(FailFastError, match="no-label failed"):
        run_sweep(load_config(path, out=str(fresh)), fail_fast=True)
    statuses = [e["status"] for e in json.loads((fresh / "index.json").read_text())["runs"]]
    assert statuses == ["failed", "pending"]


def test_sweep_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cfg = load_config(write_config(tmp_path), out=str(tmp_path / "busy"))
    with pytest.raises(FileExistsError, match="holds no sweep"):
        run_sweep(cfg)


def test_batch_slices_cover_every_batch_once():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            slices = [batch_slice(n, r, world) for r in range(world)]
            assert [b for s in slices for b in s] == list(range(n))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_merged_rank_stores_equal_a_single_capture(tmp_path):
    model, _ = tiny_llama()
    examples = [
        {"id": f"e{i}", "input_ids": [1, 5 + i % 7, 6 + i % 5, 7][: 2 + i % 3], "labels": {"y": i % 3}}
        for i in range(11)
    ]
    kw = {"batch_size": 3, "shard_size": 3, "progress": False, "model_info": {"spec": "tiny-llama"}}
    single = capture_dataset(model, examples, "blocks.*.resid_post", tmp_path / "single", **kw)
    parts = []
    for rank in range(3):
        mine = batch_slice(4, rank, 3)
        part = tmp_path / f"part{rank}"
        capture_dataset(model, examples[mine.start * 3 : mine.stop * 3], "blocks.*.resid_post", part, **kw)
        parts.append(part)
    merged = merge_parts(parts, tmp_path / "merged")
    assert merged.complete and merged.examples == single.examples and merged.model == single.model
    for p in single.points:
        a, b = single.rows(p), merged.rows(p)
        for col in ("example", "pos", "role", "step", "branch"):
            assert torch.equal(getattr(a, col), getattr(b, col))
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)
        assert torch.equal(single.matrix(p).values, merged.matrix(p).values)
    again = mtimes(tmp_path / "merged")
    merge_parts(parts, tmp_path / "merged")  # resumable: finished shards are kept as they are
    assert {k: v for k, v in mtimes(tmp_path / "merged").items() if k.startswith("shard")} == {
        k: v for k, v in again.items() if k.startswith("shard")
    }


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~30 s on a busy 2-core machine
def test_killed_sweep_resumes_without_recomputing(tmp_path):
    """SIGKILL after the first run is done and while the second captures; the re-run skips the first,
    keeps the second's finished shards, and ends equal to an uninterrupted sweep."""
    write_prompts(tmp_path / "long.jsonl", n=24)
    path = write_config(
        tmp_path,
        models=[{"path": "tiny-llama"}],
        tasks=[
            {"name": "first", "prompts": "prompts.jsonl"},
            {"name": "second", "prompts": "long.jsonl", "capture": {"batch_size": 1, "shard_size": 1}},
        ],
        analyses=["capture", "probe"],
    )
    out = tmp_path / "killed"
    first, second = out / "runs" / "tiny-llama__first", out / "runs" / "tiny-llama__second"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")  # closed after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "uniprobe", "sweep", str(path), "--out", str(out)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (second / "store" / "shard-00002.safetensors").exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"the sweep ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()}"
                )
            assert time.monotonic() < deadline, "the sweep did not reach the second run in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    assert (first / "DONE.json").exists() and not (second / "DONE.json").exists()
    first_files = mtimes(first)
    finished = [r["file"] for r in json.loads((second / "store" / "manifest.json").read_text())["shards"]]
    kept = {k: v for k, v in mtimes(second / "store").items() if k in finished}
    assert 2 <= len(kept) < 24

    entries = run_sweep(load_config(path, out=str(out)))
    assert mtimes(first) == first_files  # the finished run was not recomputed
    resumed = mtimes(second / "store")
    assert all(resumed[k] == v for k, v in kept.items())  # finished shards were kept, not rewritten
    assert [e["status"] for e in entries] == ["done", "done"]

    reference = run_sweep(load_config(path, out=str(tmp_path / "reference")))
    assert without_timing(entries) == without_timing(reference)
    for run in ("tiny-llama__first", "tiny-llama__second"):
        a = ActivationStore.open(out / "runs" / run / "store", verify="full")
        b = ActivationStore.open(tmp_path / "reference" / "runs" / run / "store")
        for p in a.points:
            assert torch.equal(a.matrix(p).values, b.matrix(p).values)
