"""Heatmaps of patching results: one panel per kind, layer × column (positions with token labels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from uniprobe.probes.patching.results import PatchResult


def heatmap(
    result: PatchResult,
    path: str | Path,
    *,
    title: str | None = None,
    column_labels: Sequence[str] | None = None,
    normalised: bool = True,
) -> Path:
    """Write a PNG of ``result.as_grid()`` ``[kind, layer, column]``; returns the path.

    Colour is the normalised effect (0 = corrupted, 1 = clean) on a diverging map centred at 0;
    columns are labelled with ``column_labels`` (e.g. tokens) or the grid's column names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.grid is None:
        raise ValueError("heatmap needs a result over a SiteGrid (grid_sites / role_sites / Alignment.sites)")
    data = result.as_grid(normalised).numpy()
    kinds, layers = result.grid.kinds, result.grid.layers
    labels = list(column_labels) if column_labels is not None else result.grid.columns
    finite = np.abs(data[np.isfinite(data)])
    top = float(finite.max()) if finite.size else 1.0
    vmax = max(1.0, top) if normalised else (top or 1.0)
    width = max(4.0, 0.45 * len(labels) + 2.0)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(width * len(kinds), 0.4 * len(layers) + 2.2), squeeze=False
    )
    for k, kind in enumerate(kinds):
        ax = axes[0, k]
        im = ax.imshow(data[k], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_title(kind)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer) for layer in layers], fontsize=8)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    what = "(patched − corrupted) / (clean − corrupted)" if normalised else result.metric
    fig.suptitle(title or f"{result.method} patching, {result.direction}: {what}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
