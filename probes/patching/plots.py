"""Heatmaps of patching results: one panel per kind (at most 4 per row), layer × column (positions
with token labels), each with a colour bar that says what its colour is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from uniprobe.probes.patching.results import PatchResult

NORMALISED = "normalised effect\n(patched − corrupted) / (clean − corrupted)"
MAX_COLS = 4


def heatmap_figure(
    result: PatchResult,
    *,
    title: str | None = None,
    column_labels: Sequence[str] | None = None,
    normalised: bool = True,
) -> Any:
    """The Figure of ``result.as_grid()`` ``[kind, layer, column]``: layers bottom to top, columns
    labelled with ``column_labels`` (e.g. tokens) or the grid's column names (x-axis "position
    (token)"), a diverging map centred at 0 (0 = corrupted, 1 = clean when ``normalised``)."""
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
    width = max(4.0, 0.45 * len(labels) + 2.6)
    ncols = min(len(kinds), MAX_COLS)
    nrows = -(-len(kinds) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, (0.4 * len(layers) + 2.4) * nrows), squeeze=False
    )
    value = NORMALISED if normalised else f"metric: {result.metric}"
    for ax in axes.flat[len(kinds) :]:
        ax.set_axis_off()
    for k, kind in enumerate(kinds):
        ax = axes.flat[k]
        im = ax.imshow(data[k], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_title(kind)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer) for layer in layers], fontsize=8)
        ax.set_xlabel("position (token)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(value, fontsize=7)
    what = "(patched − corrupted) / (clean − corrupted)" if normalised else result.metric
    fig.suptitle(title or f"{result.method} patching, {result.direction}: {what}", fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(
    result: PatchResult,
    path: str | Path,
    *,
    title: str | None = None,
    column_labels: Sequence[str] | None = None,
    normalised: bool = True,
) -> Path:
    """Write :func:`heatmap_figure` as a PNG to ``path``; returns the path."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(result, title=title, column_labels=column_labels, normalised=normalised)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
