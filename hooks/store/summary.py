"""Describing a store: its summary (``uniprobe inspect``), size, repr, and the message for a selection
that has no rows (which says what the store does hold)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.store.files import human_bytes
from uniprobe.hooks.store.format import MANIFEST

if TYPE_CHECKING:
    from uniprobe.hooks.rows import Rows


class Summary:
    """Reporting of :class:`~uniprobe.hooks.store.ActivationStore` (a mixin)."""

    path: Path
    _m: dict
    _records: dict[int, dict]
    _spans: list[tuple[int, int]]

    if TYPE_CHECKING:  # provided by the store (reader.py)
        n_examples: int
        complete: bool
        is_view: bool
        label_keys: list[str]

        def role_counts(self, point: str) -> dict[str, int]: ...

        def labels(self, key: str) -> list: ...

        def _select(
            self, point: str, roles: Any, step: Any, branch: Any, with_values: bool = True
        ) -> Rows: ...

    def _no_rows_message(self, point: str, role: Any, step: Any, branch: Any) -> str:
        msg = (
            f"no rows at point {point!r} with role {role!r}, step {step!r}, branch {branch!r} in {self.path}"
        )
        if not self._records:
            return msg + " (the store has no finished shards)"
        present = self._select(point, None, step, branch, with_values=False)
        counts = Counter(ROLES[i] for i in present.role.tolist())
        if counts:
            return (
                msg
                + "; roles present with that step and branch: "
                + ", ".join(f"{k} ({v} rows)" for k, v in counts.items())
            )
        everywhere = self.role_counts(point)
        return (
            msg
            + "; no rows with that step and branch; roles present at this point: "
            + ", ".join(f"{k} ({v} rows)" for k, v in everywhere.items())
        )

    def size_on_disk(self) -> int:
        """Bytes of the manifest and the finished shards."""
        manifest = self.path / MANIFEST
        return sum(r["bytes"] for r in self._records.values()) + (
            manifest.stat().st_size if manifest.exists() else 0
        )

    def summary(self) -> str:
        """A human-readable description: model, status, examples, shards, points, labels, size."""
        m = self._m
        size = human_bytes(self.size_on_disk())
        status = (
            "complete" if m["complete"] else "INCOMPLETE (capture unfinished; continue it with resume=True)"
        )
        lines = [
            f"ActivationStore at {self.path}",
            f"  model: {json.dumps(m['model'])}",
            f"  status: {status}",
            f"  examples: {self.n_examples} in {len(self._records)} shards, {size} on disk",
            f"  created {m.get('created', '?')} with uniprobe {m.get('toolkit_version', '?')}",
            "  points:",
        ]
        missing = [i for i in range(len(self._spans)) if i not in self._records]
        if missing:
            lines.insert(4, f"  shards not written yet: {missing}")
        dtype = m["dtype"] or "?"
        for p in m["points"]:
            roles = self.role_counts(p)
            shape = m["feature_shapes"].get(p, "?")
            per_role = ", ".join(f"{k} {v}" for k, v in roles.items()) or "none"
            lines.append(f"    {p}  {shape} {dtype}  rows {sum(roles.values())}: {per_role}")
        latents = {tuple(r["generated"]) for r in self._records.values() if "generated" in r}
        if latents:  # a diffusion decoder's samples, in the shard files (store.generated())
            lines.append(f"  generated latents per example: {', '.join(str(list(s)) for s in latents)}")
        keys = self.label_keys
        lines.append("  labels:" + ("" if keys else " none"))
        for key in keys:
            values = Counter(json.dumps(v) for v in self.labels(key))
            if len(values) <= 10:
                classes = ", ".join(f"{k}: {v}" for k, v in sorted(values.items()))
                lines.append(f"    {key}: {len(values)} values — {classes}")
            else:
                lines.append(f"    {key}: {len(values)} distinct values")
        if m.get("attrs"):
            lines.append(f"  attrs: {json.dumps(m['attrs'])}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        n_shards = len(self._records)
        of = f" (a subset of {len(self._m['examples'])})" if self.is_view else ""
        return (
            f"ActivationStore({str(self.path)!r}, {self.n_examples} examples{of}, {n_shards} shards, {state})"
        )
