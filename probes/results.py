"""Probe results: a tidy table (JSON, CSV), the probe directions (safetensors + JSON index), figures.

``ProbeResults.save(out)`` writes::

    out/results.json            {"meta": {...}, "rows": [...]}: one row per probe
    out/results.csv             the same rows
    out/directions.safetensors  per probe "{point}|{role}": "/weight" [K, d], "/bias" [K], "/mean", "/std" [d]
    out/directions.json         per probe key: point, layer, role, classes, C, accuracy, ...
    out/probe_map.png           accuracy vs layer, one line per role, control shaded

``ProbeResults.load(out)`` reads them back (``to_dict()`` is what results.json holds): the result
contract of :mod:`uniprobe.hooks.results_io`.

Directions are in the raw activation space of the store: ``logits = x @ weight.T + bias`` for a raw
activation ``x`` ``[d]``; ``weight[k]`` is the direction that raises class ``k`` (for steering, or for
patching along a probe direction). ``mean``/``std`` are the training split's standardisation.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file
from uniprobe.hooks.store.files import save_safetensors

COLUMNS: tuple[str, ...] = (
    "point",
    "layer",
    "role",
    "n",
    "n_train",
    "n_test",
    "accuracy",
    "ci_low",
    "ci_high",
    "control",
    "selectivity",
    "chance",
    "cv_accuracy",
    "grouping",
    "C",
    "method",
    "converged",
)
_PARTS = ("weight", "bias", "mean", "std")


def probe_key(point: str, role: str) -> str:
    """The key of a probe in ``directions.safetensors``: ``"{point}|{role}"``."""
    return f"{point}|{role}"


@dataclass
class ProbeDirection:
    """One probe's readout in raw activation space.

    Attributes:
        weight: ``[K, d]``; bias: ``[K]``; logits of a raw activation ``x`` are ``x @ weight.T + bias``.
        mean, std: ``[d]`` training-split statistics used to standardise before fitting.
        classes: the class values, in the order of ``weight``'s rows.
        info: the probe's row of the results table.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    classes: list
    info: dict = field(default_factory=dict)

    def logits(self, x: Tensor) -> Tensor:
        """Raw activations ``[n, d]`` → class logits ``[n, K]``."""
        return x.to(self.weight.dtype) @ self.weight.T + self.bias

    def unit(self, cls: Any) -> Tensor:
        """Unit-norm direction ``[d]`` of class ``cls`` (one of :attr:`classes`)."""
        if cls not in self.classes:
            raise KeyError(f"class {cls!r} is not one of this probe's classes {self.classes}")
        w = self.weight[self.classes.index(cls)]
        return w / w.norm().clamp_min(1e-12)


@dataclass
class ProbeResults:
    """What :func:`uniprobe.probes.linear.probe_store` returns.

    Attributes:
        rows: one dict per probe with :data:`COLUMNS` (plus ``n_iter``).
        meta: label key, classes, grouping, method, folds, seed, split sizes, C grid, ...
        directions: flat tensors for ``directions.safetensors`` (see the module docstring).
    """

    rows: list[dict]
    meta: dict
    directions: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, point: str, role: str) -> dict:
        """The table row of one probe."""
        for r in self.rows:
            if r["point"] == point and r["role"] == role:
                return r
        have = sorted({(r["point"], r["role"]) for r in self.rows})
        raise KeyError(f"no probe at point {point!r}, role {role!r}; probes: {have}")

    def direction(self, point: str, role: str) -> ProbeDirection:
        """The saved readout of one probe."""
        key = probe_key(point, role)
        if f"{key}/weight" not in self.directions:
            raise KeyError(
                f"no direction for {key!r}; have {sorted({k.rsplit('/', 1)[0] for k in self.directions})}"
            )
        parts = {p: self.directions[f"{key}/{p}"] for p in _PARTS}
        return ProbeDirection(**parts, classes=list(self.meta["classes"]), info=self.row(point, role))

    def best(self) -> dict:
        """The row with the highest accuracy."""
        return max(self.rows, key=lambda r: r["accuracy"])

    def to_dict(self) -> dict:
        """``{"meta": {...}, "rows": [...]}``: what ``results.json`` holds (directions are tensors)."""
        return {"meta": self.meta, "rows": self.rows}

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (atomically)."""
        write_json(path, self.to_dict())

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per probe, columns :data:`COLUMNS` (point, layer, role, sizes,
        accuracy with ``ci_low`` / ``ci_high``, control, selectivity, C, ...) then any extra keys
        (pandas is optional: ``pip install pandas``). Missing values are None / NaN."""
        from uniprobe.hooks.tables import import_pandas

        pd = import_pandas("ProbeResults.to_pandas()")
        cols = list(COLUMNS) + sorted({k for r in self.rows for k in r} - set(COLUMNS))
        return pd.DataFrame([{k: r.get(k) for k in cols} for r in self.rows], columns=cols)

    def to_csv(self, path: str | os.PathLike) -> None:
        cols = list(COLUMNS) + sorted({k for r in self.rows for k in r} - set(COLUMNS))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

    def save(self, out: str | os.PathLike, plot: bool = True) -> SavedFiles:
        """Write results.json, results.csv, directions.safetensors (+ .json) and probe_map.png to ``out``."""
        out = result_dir(out)
        files = {
            "json": out / "results.json",
            "csv": out / "results.csv",
            "directions": out / "directions.safetensors",
            "index": out / "directions.json",
        }
        self.to_json(files["json"])
        self.to_csv(files["csv"])
        save_directions(self, files["directions"])
        if plot:
            from uniprobe.probes.plots import plot_probe_map

            files["map"] = plot_probe_map(self.rows, out / "probe_map.png", title=_title(self.meta))
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> ProbeResults:
        """Read what :meth:`save` wrote (the directions are empty when none were saved)."""
        out = Path(out)
        data = read_json(result_file(out, "results.json"))
        file = out / "directions.safetensors"
        directions = load_file(str(file)) if file.exists() else {}
        return cls(data["rows"], data["meta"], directions)


def save_directions(results: ProbeResults, path: str | os.PathLike) -> None:
    """Probe directions as safetensors, and beside them a JSON index (``.json``) of what each key is."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in results.directions.items()}
    index = {
        probe_key(r["point"], r["role"]): {
            "point": r["point"],
            "layer": r["layer"],
            "role": r["role"],
            "tensors": {p: f"{probe_key(r['point'], r['role'])}/{p}" for p in _PARTS},
            "accuracy": r["accuracy"],
            "C": r["C"],
        }
        for r in results.rows
    }
    meta = {"classes": json.dumps(results.meta.get("classes", [])), "label": str(results.meta.get("label"))}
    # through a temp file: atomic, and the umask's mode (save_file alone leaves it 0600)
    save_safetensors(path, tensors, metadata=meta, what="probe directions")
    doc = {
        "format": "logits = x @ weight.T + bias for a raw activation x [d]; rows of weight follow classes",
        "label": results.meta.get("label"),
        "classes": results.meta.get("classes", []),
        "probes": index,
    }
    write_json(path.with_suffix(".json"), doc)


def load_directions(path: str | os.PathLike) -> dict[tuple[str, str], ProbeDirection]:
    """Read ``directions.safetensors`` (+ its JSON index): ``(point, role)`` → :class:`ProbeDirection`."""
    path = Path(path)
    tensors = load_file(str(path))
    doc = read_json(path.with_suffix(".json"))
    out = {}
    for entry in doc["probes"].values():
        parts = {p: tensors[name] for p, name in entry["tensors"].items()}
        out[(entry["point"], entry["role"])] = ProbeDirection(
            **parts, classes=list(doc["classes"]), info=entry
        )
    return out


def _title(meta: dict) -> str:
    grouping = meta.get("grouping", "?")
    return f"probe {meta.get('label', '?')!s} ({meta.get('method', '?')}, split by {grouping})"


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: a missing number is ``None``."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
