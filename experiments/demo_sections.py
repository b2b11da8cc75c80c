"""The demo's analyses of one sandbox model: gap table, stores, probe map, logit lens, patching map.

Each function returns plain numbers (and writes its files); :mod:`uniprobe.experiments.demo` turns them into
the report's text, so every sentence there is computed from the numbers here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from uniprobe.experiments.sandbox.evaluate import evaluate_items, format_gap_table, gap_table, summarize  # noqa: E402
from uniprobe.experiments.seeds.gapeval import format_gap_score, plot_gap_score, sandbox_gap_score  # noqa: E402
from uniprobe.experiments.tasks import world  # noqa: E402
from uniprobe.experiments.tasks.prompts import Item  # noqa: E402
from uniprobe.hooks.adapters import adapter_for  # noqa: E402
from uniprobe.hooks.pipeline import capture_dataset  # noqa: E402

GEN_ROLE = {"ar": "image_gen", "query": "query", "mot": "image_gen"}


# -- gap table and drawings -----------------------------------------------------------------------
def run_gap(model: Any, items: list[Item], out: Path, name: str) -> dict:
    """Evaluate every item in both forms; write ``gap-{name}.json/.md`` and a figure of drawings."""
    results = evaluate_items(model, items, cot=True)
    rows = gap_table(model, results=results)
    summary = summarize(rows)
    md = format_gap_table(rows, title=f"{name}: understanding vs generation")
    md += "\n" + _count_note(items, rows)
    (out / f"gap-{name}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    (out / f"gap-{name}.md").write_text(md)
    plot_drawings(results, items, out / f"drawings-{name}.png", name)
    score, cats = sandbox_gap_score(results)
    gap_md = format_gap_score(score, cats) + (
        "\n\nGapEval's n counts prompts: each variant of a mapping A/B pair is one item here, so mapping's"
        f" n is {sum(c.n for c in cats if c.category == 'mapping')} prompts (the gap table counts pairs)."
    )
    (out / f"gapeval-{name}.json").write_text(
        json.dumps({"score": score, "categories": [asdict(c) for c in cats]})
    )
    plot_gap_score(cats, score, str(out / f"gapeval-{name}.png"), title=name)
    summary_by_kind = {s["kind"]: s for s in summary}
    return {"rows": rows, "summary": summary_by_kind, "markdown": md, "gapeval": (score, cats, gap_md)}


def _count_note(items: list[Item], rows: list[dict]) -> str:
    """Why the gap table's n column does not sum to the number of test prompts (mapping: per A/B pair)."""
    mapping = [it for it in items if it.category == "mapping"]
    pairs = len({it.group for it in mapping})
    total = sum(r["n"] for r in rows)
    return (
        f"n counts items; mapping items count per A/B pair ({len(mapping)} prompts = {pairs} pairs, a pair"
        f" right only if both variants are), so n sums to {total} for the {len(items)} test prompts."
    )


def plot_drawings(
    results: list[dict], items: list[Item], path: Path, name: str, per_category: int = 2
) -> None:
    """Rendered drawings (without and with CoT) beside their prompts and the judge's verdicts."""
    picked, seen = [], defaultdict(int)
    for r, it in zip(results, items, strict=True):
        if seen[it.category] < per_category:
            seen[it.category] += 1
            picked.append((r, it))
    fig, axes = plt.subplots(len(picked), 2, figsize=(7.5, 1.55 * len(picked)))
    for row, (r, it) in enumerate(picked):
        for col, (key, ok, label) in enumerate(
            [("grid", r["generation"], "direct"), ("cot_grid", r.get("generation_cot"), "with CoT")]
        ):
            ax = axes[row, col]
            ax.imshow(world.render(r[key], scale=12))
            ax.set_xticks([])
            ax.set_yticks([])
            verdict = "✓" if ok else "✗"
            ax.set_title(f"{label}: {verdict}", fontsize=8, color="green" if ok else "red")
        axes[row, 0].set_ylabel(
            f"{it.category}\n{it.gen_prompt[:38]}\nanswer: {it.answer[:20]}", fontsize=6.5, rotation=0,
            ha="right", va="center",
        )  # fmt: skip
    fig.suptitle(f"{name}: drawings judged by the exact judge", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- stores -----------------------------------------------------------------------------------
def examples_of(items: list[Item], form: str) -> list[dict]:
    """Capture examples: the understanding (``und``) or generation (``gen``) form of each item."""
    out = []
    for it in items:
        labels = {k: v for k, v in it.labels.items() if k in ("answer", "entity", "template")}
        labels.update(category=it.category, level=it.level)
        prompt = it.und_prompt if form == "und" else it.draw_prompt
        out.append({"id": f"{it.id}-{form}", "prompt": prompt, "labels": labels})
    return out


def capture_stores(model: Any, items: list[Item], out: Path, arch: str) -> dict[str, Any]:
    """Understanding store (text and image roles) and generation store (prompt + drawing positions)."""
    und = capture_dataset(
        model, examples_of(items, "und"), "blocks.*.resid_post", out / f"store-{arch}-und",
        batch_size=64, overwrite=True, progress=False,
    )  # fmt: skip
    gen = capture_dataset(
        model, examples_of(items, "gen"), "blocks.*.resid_post", out / f"store-{arch}-gen",
        roles=["text", GEN_ROLE[arch]], mode="generate", batch_size=64, overwrite=True, progress=False,
    )  # fmt: skip
    return {"und": und, "gen": gen}


# -- probes ------------------------------------------------------------------------------------
def run_probes(stores: dict[str, Any], arch: str, out: Path) -> list[dict]:
    """Probe map for the arithmetic answer: layer × (run, role). Text: last prompt position; drawing
    positions: mean over them. Split grouped by the drawn object (``entity``)."""
    from uniprobe.probes.linear import probe_store
    from uniprobe.probes.plots import plot_probe_map

    rows = []
    plans = [("und", "text", "last"), ("gen", "text", "last"), ("gen", GEN_ROLE[arch], "mean")]
    for run, role, reduce in plans:
        view = _arithmetic_view(stores[run])
        res = probe_store(view, "answer", roles=[role], reduce=reduce, group_by="entity", folds=4, n_boot=300)
        for r in res.rows:
            rows.append({**r, "role": f"{run}:{role}"})
    plot_probe_map(
        rows, out / f"probe-map-{arch}.png", title=f"sandbox-{arch}: is the arithmetic answer readable?"
    )
    (out / f"probe-map-{arch}.json").write_text(json.dumps(rows, indent=1, default=float))
    return rows


def _arithmetic_view(store: Any) -> Any:
    """The arithmetic items of a store, as a read-only view (probes read whole stores; nothing is copied)."""
    return store.subset(i for i, ex in enumerate(store.examples) if ex["labels"]["category"] == "arithmetic")


# -- logit lens --------------------------------------------------------------------------------
def run_lens(model: Any, items: list[Item], arch: str, out: Path) -> list[dict]:
    """Logit lens on the generation runs: mean probability and rank of the answer word per layer × role,
    for arithmetic items and single-word knowledge answers (favourite fruit / flower)."""
    from uniprobe.probes.lens import logit_lens

    adapter = adapter_for(model)
    tok = model.tokenizer
    summary = []
    for group, chosen in (
        ("arithmetic", [it for it in items if it.category == "arithmetic"]),
        (
            "knowledge",
            [it for it in items if it.category == "knowledge_forward" and it.task in ("fruit", "flower")],
        ),
    ):
        inputs = adapter.prepare(model, examples_of(chosen, "gen"), mode="generation")
        answers = [[tok[it.answer]] for it in chosen]
        res = logit_lens(
            model, inputs, answers, adapter=adapter, roles=["text", GEN_ROLE[arch]], generate=True
        )
        cells: dict[tuple, list[dict]] = defaultdict(list)
        last_text = _last_text_positions(res.rows)
        for r in res.rows:
            if r["lens"] != "logit":
                continue
            if r["role"] == "text" and r["pos"] != last_text[r["example"]]:
                continue  # prompt words: keep only the last one (<boi>), where drawing begins
            cells[(r["layer"], r["role"])].append(r)
        for (layer, role), rr in sorted(cells.items()):
            summary.append(
                {
                    "group": group,
                    "layer": layer,
                    "role": "text(<boi>)" if role == "text" else role,
                    "n": len(rr),
                    "mean_prob": float(np.mean([r["prob"] for r in rr])),
                    "mean_rank": float(np.mean([r["rank"] for r in rr])),
                    "top1": float(np.mean([r["rank"] == 1 for r in rr])),
                }
            )
    (out / f"lens-{arch}.json").write_text(json.dumps(summary, indent=1))
    _plot_lens(summary, out / f"lens-{arch}.png", arch)
    return summary


def _last_text_positions(rows: list[dict]) -> dict[int, int]:
    last: dict[int, int] = {}
    for r in rows:
        if r["role"] == "text":
            last[r["example"]] = max(last.get(r["example"], -1), r["pos"])
    return last


def lens_figure(summary: list[dict], arch: str) -> plt.Figure:
    """Mean p(answer word) vs layer, one line per role, one panel per group (at most 4 per row); the
    legend sits below the panels, outside the data; layer ticks are integers."""
    from matplotlib.ticker import MaxNLocator

    groups = sorted({s["group"] for s in summary})
    ncols = min(len(groups), 4)
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows + 0.6), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        rows = [s for s in summary if s["group"] == group]
        for role in sorted({s["role"] for s in rows}):
            pts = sorted((s["layer"], s["mean_prob"]) for s in rows if s["role"] == role)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{role} positions")
        ax.set_title(f"{group}: p(answer word) by layer", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean p(answer word)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"sandbox-{arch}: logit lens on generation runs", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncols=max(1, len(labels)), fontsize=7, frameon=False)
    return fig


def _plot_lens(summary: list[dict], path: Path, arch: str) -> None:
    fig = lens_figure(summary, arch)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- patching -----------------------------------------------------------------------------------
def run_patching(model: Any, items: list[Item], arch: str, out: Path, n_items: int = 4) -> dict:
    """Cross-prompt patching: understanding-run states of "what is E ?" written into the generation
    run of a different expression E' (same length, other answer), at the aligned expression words
    and at the answer slot (<answer> → <boi>). Metric: mean log-prob of drawing E's answer
    (teacher-forced). Normalised between the E' generation run (0) and the direct prompt that
    states E's answer (1: the drawing the model makes when it has the answer, as with CoT)."""
    arith = [it for it in items if it.category == "arithmetic" and it.level == 2]
    pairs = _patch_pairs(arith, n_items)
    result = patch_map(model, arch, pairs, _align)
    (out / f"patch-{arch}.json").write_text(json.dumps(result, indent=1))
    _plot_patch(
        np.array(result["grid"]), result["columns"], out / f"patch-{arch}.png", arch,
        tokens=result["tokens"], source_prompt=result["source_prompt"], n_pairs=len(result["pairs"]),
    )  # fmt: skip
    return result


def patch_peak(result: dict) -> dict:
    """The largest normalised effect of a :func:`run_patching` result: ``{"effect", "layer", "column"}``
    (NaN cells, where a pair's clean and corrupted runs agree, are skipped)."""
    grid = np.array(result["grid"], dtype=float)
    layer, col = np.unravel_index(np.nanargmax(grid), grid.shape)
    return {"effect": float(grid[layer, col]), "layer": int(layer), "column": result["columns"][col]}


def patch_map(model: Any, arch: str, pairs: list[tuple[Item, Item]], align_fn: Any) -> dict:
    """Understanding → generation patching over item pairs ``(src, dst)``, averaged.

    For each pair: the understanding run of ``src`` (source), the generation run of ``dst`` teacher-forced
    with ``src``'s drawing (target), and the direct prompt stating ``src``'s answer (clean). Sites are
    ``resid_pre`` of every layer at the positions ``align_fn(model, source, target, src)`` pairs up.

    Returns:
        ``grid`` ``[layers][columns]`` normalised effect of the pairs' mean metric (0: the mean target
        run, 1: the mean clean run; a ratio of means, robust to a pair whose runs nearly agree),
        ``columns`` (what each position is), ``tokens`` (the first pair's tokens there, for the
        figure), ``source_prompt`` (the first pair's), ``layers``, mean ``clean`` / ``corrupted``
        metric values, the pair ids, the metric.
    """
    from uniprobe.probes.patching import GridLogProb, SequenceLogProb, patch_across

    adapter = adapter_for(model)
    grids, labels, tokens, clean_v, corrupted_v = [], None, None, [], []
    for src, dst in pairs:
        source = adapter.prepare(model, [{"prompt": src.und_prompt}])
        drawing = {"target": list(src.target)}  # teacher-force the drawing of the source's answer
        target = adapter.prepare(model, [{"prompt": dst.draw_prompt, **drawing}], "generation")
        # clean: the drawing the model would make had it carried the answer over — the direct prompt
        # that states it (what CoT reaches); corrupted: the generation run of the other item
        direct = src.cot_draw.format(*[src.answer] * len(src.cot_questions))
        clean = adapter.prepare(model, [{"prompt": direct, **drawing}], "generation")
        align, labels = align_fn(model, source, target, src)
        tokens = tokens or pair_tokens(model.tokenizer, source, target, align)
        if arch == "ar":
            n = len(src.target)
            metric = SequenceLogProb(
                src.target, logits_fn=lambda o, n=n: o.image_logits[:, -n - 1 : -1], mean=True
            )
        else:
            metric = GridLogProb(src.target)
        sites = align.sites(adapter.n_layers(model), kinds=("resid_pre",))
        res = patch_across(model, source, target, sites, metric, clean_target=clean, adapter=adapter)
        grids.append(res.as_grid(normalised=False)[0].numpy())
        clean_v.append(res.clean)
        corrupted_v.append(res.corrupted)
    # a ratio of means: the pairs' mean patched metric against their mean clean and corrupted values.
    # (A mean of per-pair normalised effects is ill-conditioned: one pair whose clean and corrupted
    # runs nearly agree divides by ~0 and swamps the rest — seen on a sandbox-mot seed, 25186.)
    clean_mean, corrupted_mean = float(np.mean(clean_v)), float(np.mean(corrupted_v))
    mean = (np.nanmean(np.stack(grids), axis=0) - corrupted_mean) / (clean_mean - corrupted_mean)
    return {
        "grid": mean.tolist(),
        "columns": labels,
        "tokens": tokens,
        "source_prompt": str(getattr(pairs[0][0].und_prompt, "text", pairs[0][0].und_prompt)),
        "layers": list(range(mean.shape[0])),
        "clean": clean_mean,
        "corrupted": corrupted_mean,
        "pairs": [(s.id, d.id) for s, d in pairs],
        "metric": "mean log p of drawing the understood answer",
    }


def _patch_pairs(arith: list[Item], n: int) -> list[tuple[Item, Item]]:
    pairs = []
    for src in arith:
        for dst in arith:
            if (
                dst.answer != src.answer
                and len(dst.gen_prompt.split()) == len(src.gen_prompt.split())
                and dst.labels.get("entity") == src.labels.get("entity")
            ):
                pairs.append((src, dst))
                break
        if len(pairs) == n:
            break
    if not pairs:
        raise ValueError("no arithmetic item pairs of equal length with different answers")
    return pairs


def _align(model: Any, source: Any, target: Any, src: Item) -> tuple[Any, list[str]]:
    """Expression words ↔ expression words, then <answer> (understanding) ↔ <boi> (generation)."""
    from uniprobe.probes.patching import alignment

    tok = model.tokenizer
    expr = src.labels["expr"].split()
    s_ids = source.kwargs["input_ids"][0].tolist()
    t_ids = target.kwargs["input_ids"][0].tolist()
    ops = {tok[w] for w in ("+", "-", "*", "/") if w in tok.vocab}
    s_expr = _expr_span(s_ids, len(expr), ops, tok)
    t_expr = _expr_span(t_ids, len(expr), ops, tok)
    pairs = list(zip(t_expr, s_expr, strict=True))
    pairs.append((t_ids.index(tok["<boi>"]), len(s_ids) - 1))
    ordinal = {0: "number", 1: "operator"}
    labels = [f"{ordinal[k % 2]} {k // 2 + 1}" for k in range(len(expr))] + ["answer slot"]
    return alignment(pairs, len(s_ids), len(t_ids), labels), labels


def pair_tokens(tok: Any, source: Any, target: Any, align: Any) -> list[str]:
    """One label per aligned pair, as the prompt reads: the source token, or ``source→target`` where
    two different markers meet (``<answer>→<boi>``). ``align.pairs`` is ``[(target_pos, source_pos)]``."""
    s_ids = source.kwargs["input_ids"][0].tolist()
    t_ids = target.kwargs["input_ids"][0].tolist()
    out = []
    for t, s in align.pairs:
        a, b = tok.decode([s_ids[s]]).strip(), tok.decode([t_ids[t]]).strip()
        out.append(f"{a}→{b}" if a != b and a.startswith("<") and b.startswith("<") else a)
    return out


def _expr_span(ids: list[int], n: int, ops: set[int], tok: Any) -> list[int]:
    for i in range(len(ids) - n + 1):
        window = ids[i : i + n]
        if all((w in ops) == (k % 2 == 1) for k, w in enumerate(window)) and all(
            tok.decode([w]).isdigit() for k, w in enumerate(window) if k % 2 == 0
        ):
            return list(range(i, i + n))
    raise ValueError("expression not found in the prompt")


PATCH_VALUE = "normalised effect\n(patched − corrupted) / (clean − corrupted)"


def patch_figure(
    grid: np.ndarray, columns: list[str], arch: str, title: str = "", tokens: list[str] | None = None,
    source_prompt: str | None = None, n_pairs: int | None = None,
) -> plt.Figure:  # fmt: skip
    """Heatmap ``grid [layer, column]``: layers bottom to top, columns labelled with ``tokens`` (the
    first pair's, as the prompt reads) when given, else ``columns``; a labelled colour bar."""
    fig, ax = plt.subplots(figsize=(2.6 + 0.75 * len(columns), 3.4))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", origin="lower")
    ax.set_xticks(range(len(columns)), tokens or columns, fontsize=8)
    ax.set_yticks(range(grid.shape[0]))
    ax.set_ylabel("layer (resid_pre)")
    where = f"the first pair's prompt: {source_prompt!r}" if source_prompt else "token"
    mean = f"; mean over {n_pairs} pairs" if n_pairs and n_pairs > 1 else ""
    ax.set_xlabel(f"position (token of {where}{mean})" if source_prompt else "position (token)", fontsize=8)
    title = title or f"sandbox-{arch}: understanding → generation patching"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05).set_label(PATCH_VALUE, fontsize=7)
    fig.tight_layout()
    return fig


def _plot_patch(
    grid: np.ndarray, columns: list[str], path: Path, arch: str, title: str = "", **labels: Any
) -> None:
    """:func:`patch_figure` to ``path`` (PNG); ``labels``: ``tokens``, ``source_prompt``, ``n_pairs``."""
    fig = patch_figure(grid, columns, arch, title, **labels)
    fig.savefig(path, dpi=110)
    plt.close(fig)
