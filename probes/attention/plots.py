"""Attention maps with role bands on both axes: which kind of token attends to which.

Each panel is one layer's pattern (mean over heads, or one head) ``[query, key]``, queries top to bottom
and keys left to right; a coloured band along the left edge gives each query's role and one along the
top each key's role (``text``, ``image_und``, ``query``, ``cot``, ``image_gen``, ``pad``), with a legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from uniprobe.hooks.layout import ROLES

ROLE_COLOURS: dict[str, str] = {
    "text": "#4c72b0",
    "image_und": "#55a868",
    "query": "#8172b2",
    "cot": "#dd8452",
    "image_gen": "#c44e52",
    "pad": "#bbbbbb",
}
MAX_COLS = 4


def attention_map_figure(
    patterns: torch.Tensor,
    roles: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    tokens: Sequence[str] | None = None,
    title: str = "",
) -> Any:
    """The Figure of ``patterns`` ``[layer, q, k]`` (one panel per layer, at most 4 per row).

    ``roles``: the role name of each position (``k`` of them; queries are the last ``q``);
    ``tokens``: optional tick labels of the positions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if patterns.dim() != 3:
        raise ValueError(f"patterns must be [layer, q, k], got shape {tuple(patterns.shape)}")
    n, q, k = patterns.shape
    if len(roles) != k:
        raise ValueError(f"{len(roles)} roles for {k} key positions")
    layers = list(range(n)) if layers is None else list(layers)
    ids = torch.tensor([ROLES.index(r) for r in roles])
    band_map = ListedColormap([ROLE_COLOURS[r] for r in ROLES])
    ncols = min(n, MAX_COLS)
    nrows = -(-n // ncols)
    size = max(3.0, 0.22 * k + 1.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    band = max(0.6, k / 40)
    for i in range(n):
        ax = axes.flat[i]
        im = ax.imshow(patterns[i].float().numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto",
                       extent=(-0.5, k - 0.5, q - 0.5, -0.5))  # fmt: skip
        ax.imshow(ids[None, :].numpy(), cmap=band_map, vmin=-0.5, vmax=len(ROLES) - 0.5, aspect="auto",
                  extent=(-0.5, k - 0.5, -0.5 - band, -0.5))  # fmt: skip
        ax.imshow(ids[k - q :, None].numpy(), cmap=band_map, vmin=-0.5, vmax=len(ROLES) - 0.5, aspect="auto",
                  extent=(-0.5 - band, -0.5, q - 0.5, -0.5))  # fmt: skip
        ax.set_xlim(-0.5 - band, k - 0.5)
        ax.set_ylim(q - 0.5, -0.5 - band)
        ax.set_title(f"layer {layers[i]}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if tokens is not None and k <= 48:
            ax.set_xticks(range(k))
            ax.set_xticklabels(tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(q))
            ax.set_yticklabels(tokens[k - q :], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("attention weight", fontsize=7)
    present = [r for r in ROLES if r in set(roles)]
    fig.legend(handles=[Patch(color=ROLE_COLOURS[r], label=r) for r in present], loc="upper right",
               fontsize=8, title="role", title_fontsize=8)  # fmt: skip
    fig.suptitle(title or "attention patterns (role bands: left = queries, top = keys)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 0.96))
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
