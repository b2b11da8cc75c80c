"""Figures for probes and lenses (matplotlib, Agg backend: files only, no display).

- :func:`plot_probe_map`: test accuracy vs layer, one line per role (bootstrap interval as a band),
  each role's shuffled-label control as a shaded area under a dashed line; one panel per kind of
  point (``resid_post``, ``mlp_out``, ``queries`` ...).
- :func:`plot_lens_map`: a layer × role heatmap per answer token of the mean probability the lens
  gives the answer (logit lens, and tuned lens in the rows below when present).

Each ``plot_*`` writes the Figure its ``*_figure`` twin returns (tests check those without pixels).
Figures a reader takes in at a glance: panels wrap into rows (at most 4–5 per row), legends sit
outside the data, layer ticks are integers, colour bars say what their colour is.
- :func:`plot_lens_kl`: KL to the final layer per layer, logit vs tuned lens.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _kind(point: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", point)


MAX_COLS = 4  # panels per row: a figure a reader takes in at a glance wraps into rows


def grid_shape(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """``(rows, cols)`` for ``n`` panels, at most ``max_cols`` per row."""
    cols = max(1, min(n, max_cols))
    return -(-max(n, 1) // cols), cols


def probe_map_figure(rows: Sequence[dict], title: str | None = None) -> plt.Figure:
    """Accuracy vs layer per role from result rows (``point``, ``layer``, ``role``, ``accuracy``,
    ``ci_low``, ``ci_high``, ``control``, ``chance``): one panel per kind of point, at most
    :data:`MAX_COLS` per row; the legend (roles, 95% CI band, shuffled-label control, majority class)
    sits below the panels, outside the data."""
    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kinds[_kind(r["point"])].append(r)
    nrows, ncols = grid_shape(len(kinds))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows + 1.0), squeeze=False, sharey=True
    )
    roles = sorted({r["role"] for r in rows})
    colors = {role: plt.cm.tab10(i % 10) for i, role in enumerate(roles)}
    chance_drawn = False
    for ax, (kind, krows) in zip(axes.flat, kinds.items()):
        points = sorted({r["point"] for r in krows}, key=lambda p: (_order(_layer(krows, p)), p))
        xs = {p: (_layer(krows, p) if _layer(krows, p) is not None else i) for i, p in enumerate(points)}
        for role in roles:
            rr = sorted((r for r in krows if r["role"] == role), key=lambda r: xs[r["point"]])
            if not rr:
                continue
            x = [xs[r["point"]] for r in rr]
            acc = [_num(r["accuracy"]) for r in rr]
            c = colors[role]
            ax.plot(x, acc, "-o", color=c, label=role, ms=4)
            ax.fill_between(
                x, [_num(r["ci_low"]) for r in rr], [_num(r["ci_high"]) for r in rr], color=c, alpha=0.18
            )
            ctrl = [_num(r["control"]) for r in rr]
            ax.plot(x, ctrl, "--", color=c, lw=1, alpha=0.8)
            ax.fill_between(x, 0, ctrl, color=c, alpha=0.07, hatch="//", edgecolor=c, lw=0)
        chance = [_num(r.get("chance")) for r in krows if r.get("chance") is not None]
        if chance:
            ax.axhline(sum(chance) / len(chance), color="grey", lw=0.8, ls=":")
            chance_drawn = True
        ax.set_title(kind, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer" if any(r["layer"] is not None for r in krows) else "point")
        if all(r["layer"] is None for r in krows):
            ax.set_xticks(range(len(points)), points, rotation=30, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.set_axis_off()
    for row in axes:
        row[0].set_ylabel("test accuracy")
    handles = [Line2D([], [], color=colors[r], marker="o", ms=4, label=r) for r in roles]
    handles += [
        Patch(color="grey", alpha=0.3, label="95% bootstrap CI"),
        Line2D([], [], color="grey", ls="--", lw=1, label="shuffled-label control (role's colour)"),
    ]
    if chance_drawn:
        handles.append(Line2D([], [], color="grey", ls=":", lw=0.8, label="majority class"))
    if title:
        fig.suptitle(title, fontsize=11)
    n_leg = -(-len(handles) // 3)
    fig.tight_layout(rect=(0, (0.3 + 0.18 * n_leg) / fig.get_figheight(), 1, 1))  # room for the legend
    fig.legend(handles=handles, loc="lower center", ncols=3, fontsize=8, frameon=False)
    return fig


def plot_probe_map(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """:func:`probe_map_figure` written to ``path`` (PNG); returns the path."""
    return _save(probe_map_figure(rows, title), path)


def _save(fig: plt.Figure, path: str | os.PathLike, **kwargs: object) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, **kwargs)
    plt.close(fig)
    return path


def lens_map_figure(summary: Sequence[dict], value: str = "prob", title: str | None = None) -> plt.Figure:
    """Heatmaps layer × role of ``value`` (``"prob"`` or ``"rank"``), one panel per (lens, answer
    token), from :func:`uniprobe.probes.lens.summarize` rows. Panels wrap at 5 per row; each lens
    (``logit``, then ``tuned``) starts its own row; one colour scale and one labelled colour bar."""
    lenses = sorted({r["lens"] for r in summary}, key=lambda s: (s != "logit", s))
    tokens = sorted({r["token"] for r in summary})
    roles = sorted({r["role"] for r in summary})
    layers = sorted({r["layer"] for r in summary})
    key = f"mean_{value}"
    values = [r[key] for r in summary]
    vmin, vmax = min(values), max(values)  # one scale for every panel: logit and tuned compare
    rows_per_lens, ncols = grid_shape(len(tokens), 5)
    nrows = rows_per_lens * len(lenses)
    panel_h = 0.9 + 0.35 * len(roles)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(2.4 + 2.8 * ncols, 0.9 + panel_h * nrows),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.set_axis_off()
    im = None
    cmap = "viridis" if value == "prob" else "viridis_r"
    for i, lens in enumerate(lenses):
        for j, tok in enumerate(tokens):
            grid = [[float("nan")] * len(layers) for _ in roles]
            label = tok
            for r in summary:
                if r["lens"] == lens and r["token"] == tok:
                    grid[roles.index(r["role"])][layers.index(r["layer"])] = r[key]
                    label = r.get("token_str") or tok
            ax = axes[i * rows_per_lens + j // ncols][j % ncols]
            ax.set_axis_on()
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            if len(roles) * len(layers) <= 60:
                for ri, row in enumerate(grid):
                    for li, v in enumerate(row):
                        if v == v:  # not NaN
                            ax.text(li, ri, f"{v:.2g}", ha="center", va="center", fontsize=6, color="w")
            ax.set_xticks(range(len(layers)), layers, fontsize=7)  # image columns: one per layer
            ax.set_yticks(range(len(roles)), roles, fontsize=8)
            ax.set_title(f"{lens} lens: {label!s}", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
    if im is not None:
        what = "probability" if value == "prob" else "rank (1 = top)"
        fig.colorbar(im, ax=axes, fraction=0.04, label=f"mean {what} of the answer token")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_lens_map(
    summary: Sequence[dict], path: str | os.PathLike, value: str = "prob", title: str | None = None
) -> Path:
    """:func:`lens_map_figure` written to ``path`` (PNG); returns the path."""
    return _save(lens_map_figure(summary, value, title), path, bbox_inches="tight")


def plot_lens_kl(kl_rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """KL(final ‖ lens) per layer for each lens, from rows with ``lens``, ``layer``, ``kl``."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for lens in sorted({r["lens"] for r in kl_rows}):
        rr = sorted((r for r in kl_rows if r["lens"] == lens), key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rr], [r["kl"] for r in rr], "-o", ms=4, label=f"{lens} lens")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("KL(final ‖ lens) [nats]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer(rows: Sequence[dict], point: str) -> int | None:
    for r in rows:
        if r["point"] == point:
            return r["layer"]
    return None


def _order(layer: int | None) -> int:
    return 10**9 if layer is None else layer


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)
