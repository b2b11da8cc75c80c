"""The docs' figures (docs/figures/*.png), made by the toolkit itself on the shipped sandbox-ar checkpoint.

    python docs/make_figures.py [--out docs/figures]

Small settings (about 1 minute on 2 CPU cores): the arithmetic questions of ``Suite(seed=0)`` for
capture, probes and the lens, one prompt pair for patching, six items per category for the gap
table. The PNGs are committed; ``tests/test_docs_pages.py`` (slow) runs this script into a scratch
folder, so it keeps working as the toolkit changes. Each page says which command its figure comes from.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from uniprobe.experiments.sandbox.evaluate import evaluate_items, gap_table, summarize  # noqa: E402
from uniprobe.experiments.seeds.gapeval import plot_gap_score, sandbox_gap_score  # noqa: E402
from uniprobe.experiments.tasks.suite import Suite  # noqa: E402
from uniprobe.probes.patching.attribution import attribution_vs_exact  # noqa: E402
from uniprobe.probes.patching.plots import heatmap  # noqa: E402
from uniprobe.probes.plots import plot_lens_map, plot_probe_map  # noqa: E402

import uniprobe as up  # noqa: E402

DPI = 80  # keeps each PNG well under 150 KB


def arithmetic_store(loaded: up.LoadedModel, suite: Suite, out: Path) -> up.ActivationStore:
    """Every arithmetic question's text positions, labelled with answer, object (entity) and level."""
    items = [it for it in suite.items if it.category == "arithmetic"]
    examples = [
        {
            "id": it.id,
            "prompt": it.question,
            "labels": {"answer": it.answer, "entity": it.labels["entity"], "level": it.level},
        }
        for it in items
    ]
    return loaded.capture_dataset(
        examples, "blocks.*.resid_post", out, roles=["text"], overwrite=True, progress=False
    )


def capture_figure(store: up.ActivationStore, path: Path) -> None:
    """Per layer, the last prompt position's state projected on its two principal axes, by answer."""
    n_layers = len(store.points)
    fig, axes = plt.subplots(1, n_layers, figsize=(2.6 * n_layers, 2.7))
    for layer, ax in enumerate(axes):
        m = store.matrix(f"blocks.{layer}.resid_post", role="text", reduce="last")
        x = m.values.float() - m.values.float().mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        xy = (x @ v[:2].T).numpy()
        answers = [str(a) for a in m.labels["answer"]]
        for answer in sorted(set(answers)):
            keep = [a == answer for a in answers]
            ax.scatter(xy[keep, 0], xy[keep, 1], s=9, label=answer)
        ax.set_title(f"blocks.{layer}.resid_post", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC 1", fontsize=8)
        ax.set_ylabel("PC 2", fontsize=8)
    axes[-1].legend(title="answer", fontsize=7, title_fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle("sandbox-ar: each question's last position per layer (reduce='last')", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def lens_figure(loaded: up.LoadedModel, suite: Suite, path: Path) -> None:
    """Logit lens of each question's own answer word at every layer, at the question's last position."""
    items = [it for it in suite.items if it.category == "arithmetic" and it.level == 2][:24]
    inputs = loaded.prepare([it.question for it in items])
    answers = [[loaded.token_id(it.answer)] for it in items]
    res = up.logit_lens(loaded.model, inputs, answers, adapter=loaded.adapter, token_str=loaded.token_str)
    last = inputs.layout.length - 1  # the <answer> slot, where the answer is read (same length for all)
    res.rows = [r for r in res.rows if r["pos"] == last]
    title = "sandbox-ar: p(answer word) at the <answer> slot by the logit lens, arithmetic level 2"
    plot_lens_map(res.summary(), path, title=title)


def patch_figures(loaded: up.LoadedModel, heat: Path, scatter: Path) -> None:
    """Exact activation patching of "what is 2 + 1 ?" into "what is 3 + 1 ?", and attribution beside it."""
    clean, corrupted = loaded.prepare("what is 2 + 1 ?"), loaded.prepare("what is 3 + 1 ?")
    sites = up.grid_sites(loaded.adapter.n_layers(loaded.model), clean.layout.length, kinds=("resid_pre",))
    metric = up.LogitDiff(loaded.token_id("3"), loaded.token_id("4"))
    exact = up.patch_sweep(loaded.model, clean, corrupted, sites, metric)
    approx = up.attribution_patch(loaded.model, clean, corrupted, sites, metric)
    tokens = [loaded.token_str(int(t)) for t in clean.kwargs["input_ids"][0]]
    heatmap(exact, heat, title="exact patching, clean 2 + 1 into corrupted 3 + 1", column_labels=tokens)
    e, a = exact.as_grid().flatten(), approx.as_grid().flatten()
    r = attribution_vs_exact(approx, exact)["correlation"]
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.scatter(e.numpy(), a.numpy(), s=14)
    lo, hi = float(min(e.min(), a.min())), float(max(e.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="equal")
    ax.set_xlabel("exact (normalised)")
    ax.set_ylabel("attribution (normalised)")
    ax.set_title(f"one point per (layer, position); r = {r:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(scatter, dpi=DPI)
    plt.close(fig)


def gap_figures(loaded: up.LoadedModel, suite: Suite, bars: Path, gapeval: Path, per_category: int) -> None:
    """The gap table (understanding / generation / generation with CoT per kind) and GapEval's score."""
    items, seen = [], {}
    for it in suite.items:
        if seen.get(it.category, 0) < per_category:
            seen[it.category] = seen.get(it.category, 0) + 1
            items.append(it)
    results = evaluate_items(loaded.model, items, progress=False)
    kinds = summarize(gap_table(loaded.model, suite, items, results=results, progress=False))
    fig, ax = plt.subplots(figsize=(6.2, 2.8))
    width = 0.27
    for k, (key, label) in enumerate(
        [("understanding", "understanding"), ("generation", "generation"), ("generation_cot", "gen. + CoT")]
    ):
        xs = [i + (k - 1) * width for i in range(len(kinds))]
        ax.bar(xs, [100 * row[key] for row in kinds], width, label=label)
    ax.set_xticks(range(len(kinds)), [row["kind"].replace(" (", "\n(") for row in kinds], fontsize=8)
    ax.set_ylabel("% right (exact judge)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_title(f"sandbox-ar gap table, {per_category} items per category", fontsize=9)
    fig.tight_layout()
    fig.savefig(bars, dpi=DPI)
    plt.close(fig)
    score, rows = sandbox_gap_score(results)
    plot_gap_score(rows, score, str(gapeval), title=f"sandbox-ar, {per_category} items per category:")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures"))
    parser.add_argument("--work", default=None, help="scratch folder for the store (default: OUT/../build)")
    parser.add_argument("--per-category", type=int, default=6, help="gap table items per category")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(__file__).resolve().parents[1] / "build" / "docs-figures"
    loaded = up.load_model("sandbox-ar")
    suite = Suite(seed=0)
    store = arithmetic_store(loaded, suite, work / "store-arith")
    capture_figure(store, out / "capture.png")
    res = up.probe_store(store, "answer", roles=["text"], group_by="entity", n_boot=200)
    plot_probe_map(res.rows, out / "probe_map.png", title="sandbox-ar: is the arithmetic answer readable?")
    lens_figure(loaded, suite, out / "lens_map.png")
    patch_figures(loaded, out / "patch_heatmap.png", out / "patch_attribution.png")
    gap_figures(loaded, suite, out / "gap_table.png", out / "gapeval.png", args.per_category)
    for png in sorted(out.glob("*.png")):
        print(f"wrote {png} ({png.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
