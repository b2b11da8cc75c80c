"""The demo's memory of finished sections, so that an interrupted ``uniprobe demo`` continues.

Each finished (model, section) writes one record, ``OUT/sections/{model}.{section}.json``, after its
outputs are on disk and atomically (a temporary file renamed over the name): the record is the
section's DONE marker. It holds the section's report text, its measured seconds, the demo settings
it ran with and the entries of ``OUT`` it wrote. A re-run with the same ``--out`` keeps a section
whose record exists, names the same settings and whose entries all still exist; any other section
runs again (a section cut short has no record, so it starts over, overwriting its partial files).

    log = SectionLog(out / "sections", identity={"stars_steps": 60, ...})
    record = log.get("sandbox-ar", "gap")            # None: run it
    record = log.put("sandbox-ar", "gap", {"gap": "..."}, (41.2, 70.3), produced=["gap-sandbox-ar.md"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class SectionLog:
    """Records of finished sections in ``folder``; ``identity`` (JSON-able) must match to keep one."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = identity

    def _path(self, model: str, section: str) -> Path:
        return self.folder / f"{model}.{section}.json"

    def get(self, model: str, section: str) -> dict | None:
        """The record of a finished section still valid for these settings, or ``None``."""
        try:
            record = json.loads(self._path(model, section).read_text())
        except (OSError, ValueError):
            return None
        if record.get("identity") != self.identity:
            return None
        out = self.folder.parent
        if not all((out / name).exists() for name in record.get("produced", [])):
            return None
        return record

    def put(
        self,
        model: str,
        section: str,
        text: dict[str, str],
        seconds: tuple[float, float],
        produced: Iterable[str],
    ) -> dict:
        """Write the section's record atomically (its DONE marker) and return it; ``seconds`` is
        (wall, CPU of this process, all its threads)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "model": model,
            "section": section,
            "identity": self.identity,
            "seconds": round(seconds[0], 1),
            "cpu_seconds": round(seconds[1], 1),
            "produced": sorted(produced),
            "text": text,
        }
        path = self._path(model, section)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)  # a record is whole or absent, even if the demo dies here
        return record


def written_since(out: Path, since: float, skip: str = "sections") -> list[str]:
    """Names of the entries of ``out`` (files and folders, top level) changed at or after ``since``.

    ``since`` is a ``time.time()`` taken before the section began (less a second for coarse clocks)."""
    return [p.name for p in Path(out).iterdir() if p.name != skip and p.stat().st_mtime >= since - 1]


def timing_table(records: dict[tuple[str, str], dict], models: list[str], sections: list[str]) -> str:
    """Markdown: wall seconds per section (rows) per model (columns), then the totals of wall and CPU
    seconds; ``*`` marks a section kept from an earlier, interrupted run (its seconds are that run's)."""
    lines = [
        "| section | " + " | ".join(models) + " |",
        "| --- | " + " | ".join("---:" for _ in models) + " |",
    ]
    for section in sections:
        cells = []
        for m in models:
            r = records[(m, section)]
            cells.append(f"{r['seconds']:.0f} s" + ("*" if r.get("kept") else ""))
        lines.append(f"| {section} | " + " | ".join(cells) + " |")
    for key, label in (("seconds", "**total**"), ("cpu_seconds", "CPU (all threads)")):
        totals = [sum(records[(m, s)].get(key, 0.0) for s in sections) for m in models]
        lines.append(f"| {label} | " + " | ".join(f"{t:.0f} s" for t in totals) + " |")
    return "\n".join(lines)
