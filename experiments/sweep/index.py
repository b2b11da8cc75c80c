"""Run markers and the sweep index, all written atomically (temp file, fsync, rename).

A run directory's state is read from its files alone: ``DONE.json`` (written last) means done,
``FAILED.json`` means its last attempt failed, neither means pending. The index —
``index.json`` and ``index.csv`` at the sweep root — is rebuilt from those markers, so it is
always what is on disk, whichever rank or invocation wrote the runs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from uniprobe.hooks import jsonio
from uniprobe.hooks.store import atomic_write_text

DONE = "DONE.json"
FAILED = "FAILED.json"
RESULTS = "results.json"
INDEX_COLUMNS = ("id", "model", "task", "status", "seconds", "error", "dir")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON, atomically (:func:`uniprobe.hooks.jsonio.write_json`)."""
    jsonio.write_json(path, obj)


def read_json(path: Path) -> Any:
    """Parse ``path``; a damaged file is an error naming it (:func:`uniprobe.hooks.jsonio.read_json`)."""
    return jsonio.read_json(path)


def run_state(run_dir: Path) -> dict[str, Any]:
    """``{"status": "done" | "failed" | "pending", ...}`` from the run's markers."""
    if (run_dir / DONE).exists():
        return {"status": "done", **read_json(run_dir / DONE)}
    if (run_dir / FAILED).exists():
        return {"status": "failed", **read_json(run_dir / FAILED)}
    return {"status": "pending"}


def index_entries(root: Path, runs: list[dict]) -> list[dict[str, Any]]:
    """One entry per run: id, model, task, status, seconds, error, dir, and headline numbers."""
    entries = []
    for run in runs:
        run_dir = root / "runs" / run["id"]
        state = run_state(run_dir)
        entry = {
            "id": run["id"],
            "model": run["model"]["name"],
            "task": run["task"]["name"],
            "status": state["status"],
            "seconds": state.get("seconds"),
            "error": state.get("error"),
            "dir": str(run_dir.relative_to(root)),
        }
        if state["status"] == "done" and (run_dir / "store").exists():
            entry["store"] = str((run_dir / "store").relative_to(root))
        entry["headline"] = state.get("headline", {})
        entries.append(entry)
    return entries


def write_index(root: Path, name: str, runs: list[dict]) -> list[dict[str, Any]]:
    """Rewrite ``index.json`` and ``index.csv`` from the run markers; returns the entries."""
    entries = index_entries(root, runs)
    counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "failed", "pending")}
    write_json(root / "index.json", {"sweep": name, "counts": counts, "runs": entries})
    keys = sorted({k for e in entries for k in e["headline"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*INDEX_COLUMNS, "store", *keys])
    for e in entries:
        cells = [e.get(c) for c in INDEX_COLUMNS] + [e.get("store")] + [e["headline"].get(k) for k in keys]
        writer.writerow(["" if v is None else v for v in cells])
    write_atomic(root / "index.csv", buf.getvalue())
    return entries
