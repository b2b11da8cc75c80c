"""PatchResult: per-site metric values, both baselines, the normalised effect, and JSON.

``PatchResult.save(out)`` writes ``out/patch.json`` (:meth:`PatchResult.to_dict`: NaN as ``null``) and
``out/patch.safetensors`` (``values`` ``[n_sites]`` exactly, NaN kept); ``PatchResult.load(out)`` reads both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from uniprobe.hooks.jsonio import read_json, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file
from uniprobe.hooks.store.files import save_safetensors
from uniprobe.probes.patching.sites import PatchSite, SiteGrid

JSON, TENSORS = "patch.json", "patch.safetensors"


def normalise(values: torch.Tensor, clean: float, corrupted: float) -> torch.Tensor:
    """``(values − corrupted) / (clean − corrupted)``: 0 = the corrupted run, 1 = the clean run.

    NaN everywhere when the baselines coincide (no recovery scale) — never a silent 0 or inf.
    """
    scale = clean - corrupted
    if scale == 0 or not math.isfinite(scale):
        return torch.full_like(values, float("nan"), dtype=torch.float32)
    return (values.float() - corrupted) / scale


@dataclass
class PatchResult:
    """What a patching sweep measured.

    Attributes:
        values: ``[n_sites]`` the metric with each site patched (attribution: its linear estimate).
        clean, corrupted: the metric on the unpatched clean and corrupted runs (batch mean).
        sites: the sites, in ``values`` order; ``grid``: their ``[kind, layer, column]`` layout.
        method: ``"exact"`` or ``"attribution"``; ``direction``: ``"denoise"`` (clean states into
            the corrupted run) or ``"noise"`` (corrupted states into the clean run).
        metric: the metric's name; ``seconds``: wall time; ``info``: strategy, chunks, rows, notes.
    """

    values: torch.Tensor
    clean: float
    corrupted: float
    sites: list[PatchSite]
    grid: SiteGrid | None = None
    method: str = "exact"
    direction: str = "denoise"
    metric: str = "metric"
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def normalised(self) -> torch.Tensor:
        """``[n_sites]`` (patched − corrupted) / (clean − corrupted)."""
        return normalise(self.values, self.clean, self.corrupted)

    def as_grid(self, normalised: bool = True) -> torch.Tensor:
        """``[kind, layer, column]`` (needs the sites to come from a :class:`SiteGrid`)."""
        if self.grid is None:
            raise ValueError("these sites were not built as a grid; read .values / .sites")
        return self.grid.reshape(self.normalised if normalised else self.values)

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per site (pandas is optional: ``pip install pandas``): ``point``,
        ``label``, ``positions`` and ``source_positions`` (tuples), ``value`` (the metric patched),
        ``normalised``, and ``kind`` / ``layer`` / ``column`` when the sites form a grid."""
        from uniprobe.hooks.tables import import_pandas

        pd = import_pandas("PatchResult.to_pandas()")
        frame = pd.DataFrame(
            {
                "point": [s.point for s in self.sites],
                "label": [s.label for s in self.sites],
                "positions": [tuple(s.positions) for s in self.sites],
                "source_positions": [tuple(s.src) for s in self.sites],
                "value": self.values.detach().cpu().double().numpy(),
                "normalised": self.normalised.detach().cpu().double().numpy(),
            }
        )
        if self.grid is not None:
            n_kind, n_layer, n_col = len(self.grid.kinds), len(self.grid.layers), len(self.grid.columns)
            if n_kind * n_layer * n_col == len(self.sites):  # sites in [kind, layer, column] order
                idx = range(len(self.sites))
                frame["kind"] = [self.grid.kinds[i // (n_layer * n_col)] for i in idx]
                frame["layer"] = [self.grid.layers[i // n_col % n_layer] for i in idx]
                frame["column"] = [self.grid.columns[i % n_col] for i in idx]
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: grid (raw and normalised), axes, baselines, metric, timing."""
        out: dict[str, Any] = {
            "method": self.method,
            "direction": self.direction,
            "metric": self.metric,
            "baselines": {"clean": self.clean, "corrupted": self.corrupted},
            "timing": {"seconds": self.seconds, **{k: v for k, v in self.info.items() if k != "notes"}},
            "notes": self.info.get("notes", []),
            "sites": [
                {
                    "point": s.point,
                    "positions": list(s.positions),
                    "source_positions": list(s.src),
                    "label": s.label,
                    **({"head": s.head} if s.head is not None else {}),
                }
                for s in self.sites
            ],
            "values": _nan_to_none(self.values.tolist()),
            "normalised": _nan_to_none(self.normalised.tolist()),
        }
        if self.grid is not None:
            out["axes"] = {"kind": self.grid.kinds, "layer": self.grid.layers, "column": self.grid.columns}
            out["axes"].update(self.grid.meta)
            out["grid"] = _nan_to_none(self.as_grid(False).tolist())
            out["grid_normalised"] = _nan_to_none(self.as_grid(True).tolist())
        return out

    to_json = to_dict  # the older name, kept for callers

    def save(self, out: str | os.PathLike) -> SavedFiles:
        """Write ``patch.json`` (:meth:`to_dict`) and ``patch.safetensors`` (``values`` ``[n_sites]``)."""
        out = result_dir(out)
        files = {"json": out / JSON, "tensors": out / TENSORS}
        write_json(files["json"], self.to_dict())
        save_safetensors(files["tensors"], {"values": self.values.detach().contiguous()}, what="patch values")
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> PatchResult:
        """Read what :meth:`save` wrote: sites, grid axes, baselines and the exact ``values``."""
        doc = read_json(result_file(out, JSON))
        values = load_file(str(result_file(out, TENSORS)))["values"]
        sites = [
            PatchSite(
                s["point"],
                tuple(s["positions"]),
                None if s["source_positions"] == s["positions"] else tuple(s["source_positions"]),
                s["label"],
                s.get("head"),
            )
            for s in doc["sites"]
        ]
        grid = None
        if "axes" in doc:
            axes = dict(doc["axes"])
            kinds, layers, columns = axes.pop("kind"), axes.pop("layer"), axes.pop("column")
            grid = SiteGrid(sites, kinds, layers, columns, axes)
        timing = dict(doc["timing"])
        seconds = timing.pop("seconds")
        info = {**timing, "notes": list(doc.get("notes", []))}  # to_dict always writes notes
        return cls(
            values, doc["baselines"]["clean"], doc["baselines"]["corrupted"], sites, grid,
            doc["method"], doc["direction"], doc["metric"], seconds, info,
        )  # fmt: skip


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flat vectors (NaN when either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")
