"""Figures of the demo's attention section (:mod:`uniprobe.experiments.demo_attention`): the head × layer
heatmap of the drawing's attention mass on the CoT answer, and one panel each for the two knockout
sweeps and the steering sweep, all drawn from the numbers in ``attention-{arch}.json``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def mass_figure(result: dict, arch: str) -> plt.Figure:
    """Heatmap ``mass [layer, head]`` (layers bottom to top), mass 0..1."""
    mass = np.asarray(result["mass"])
    fig, ax = plt.subplots(figsize=(0.6 * mass.shape[1] + 2.8, 0.5 * mass.shape[0] + 1.8))
    im = ax.imshow(mass, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xticks(range(mass.shape[1]))
    ax.set_yticks(range(mass.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"sandbox-{arch}, CoT run: mass {result['gen_role']} → CoT answer", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("attention mass (mean over items)", fontsize=7)
    fig.tight_layout()
    return fig


def flow_figure(result: dict, arch: str) -> plt.Figure:
    """Three panels: CoT-run knockout and no-CoT knockout (metric vs the knocked layer, one line per key
    group, dashed: every layer at once; grey: the unknocked run), steering (metric, layer × alpha)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in (
        (axes[0], "cot_knockout", "CoT run: drawing → key group knocked out"),
        (axes[1], "direct_knockout", "run without CoT: drawing → key group knocked out"),
    ):
        ko = result[key]
        for k, group in enumerate(g for g in ko if g != "clean"):
            vals = ko[group]
            colour = f"C{k}"
            ax.plot(range(len(vals) - 1), vals[:-1], marker="o", color=colour, label=group)
            ax.axhline(vals[-1], color=colour, linestyle="--", label=f"{group}, every layer")
        ax.axhline(ko["clean"], color="grey", label="not knocked out")
        ax.set_xlabel("knocked layer")
        ax.set_ylabel(result["metric"], fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, loc="best")
    steer = result["steer"]
    grid = np.asarray(steer["grid"])
    im = axes[2].imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    axes[2].set_xticks(range(len(steer["alphas"])), [f"{a:g}" for a in steer["alphas"]])
    axes[2].set_yticks(range(grid.shape[0]), [p.split(".")[1] for p in steer["points"]])
    axes[2].set_xlabel("alpha")
    axes[2].set_ylabel("steered layer (resid_pre)")
    axes[2].set_title(f"steering at {steer['where']} (no CoT)", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046).set_label(result["metric"], fontsize=7)
    fig.suptitle(
        f"sandbox-{arch}: how does the answer travel? (mean over {len(result['items'])} items)", fontsize=10
    )
    fig.tight_layout()
    return fig


def plot_attention(result: dict, out: Path, arch: str) -> None:
    """Write ``attn-mass-{arch}.png`` and ``attn-flow-{arch}.png``."""
    for fig, name in ((mass_figure(result, arch), "attn-mass"), (flow_figure(result, arch), "attn-flow")):
        fig.savefig(Path(out) / f"{name}-{arch}.png", dpi=110)
        plt.close(fig)
