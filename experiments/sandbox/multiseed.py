"""Findings over several training seeds: the gap table, the probe map's best layer, the patching peak.

One seed's sandbox can mislead (RESULTS.md: the query recipe counted 85 / 90 / 92% over seeds 0–2, and
seed 1's portraits collapsed), so ``train_seeds`` trains one model per seed, runs the demo's own
analyses on each (:mod:`uniprobe.experiments.demo_sections`: gap table, probe map, understanding →
generation patching map) and ``summarize_seeds`` reports every number as mean and range::

    runs = train_seeds("ar", [0, 1, 2], "artifacts/seeds-ar")
    summary = summarize_seeds(runs)          # JSON-ready; format_seed_table(summary) is markdown
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from uniprobe.experiments.tasks.prompts import Item
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.jsonio import read_json, write_json

GAP_METRICS: tuple[str, ...] = ("understanding", "generation", "generation_cot")


def seed_run(
    arch: str,
    seed: int,
    out: str | Path,
    items: Sequence[Item] | None = None,
    patch_pairs: int = 4,
    **train_kw: Any,
) -> dict:
    """Train ``arch`` with ``seed`` into ``out/seed-{seed}`` and analyse it there.

    ``train_kw`` go to :func:`~uniprobe.experiments.sandbox.train.train_any` (``steps``,
    ``time_budget_s``, ``threads``, ``data``, ``backbone``...). ``items`` default to ``Suite(0)``'s.
    Returns ``{"seed", "dir", "gap": gap rows, "probe_best": {role: best probe row}, "patch_peak":
    {"effect", "layer", "column"}}`` (the largest normalised effect of the patching map).

    ``out/seed-{seed}/request.json`` records the settings (arch, seed, training keywords but
    ``progress`` and ``threads``, items, ``patch_pairs``; for ``mot`` the SHA-256 of its warm start's
    weights, ``source_weights``: a replaced ``sandbox-query`` is another setting). A rerun with the same
    settings resumes: a seed with ``seed.json`` is returned as recorded, one with a complete checkpoint
    is analysed without training again. Other settings, or a ``seed-{seed}`` folder this function did
    not start, are refused (:class:`~uniprobe.hooks.errors.UsageError`): nothing finished is
    overwritten.
    """
    from uniprobe.experiments.sandbox import load_sandbox
    from uniprobe.experiments.sandbox import train as training
    from uniprobe.experiments.sandbox.checkpoint import ChecksumError

    d = Path(out) / f"seed-{seed}"
    request = json.loads(json.dumps({
        "arch": arch, "seed": seed, "patch_pairs": patch_pairs,
        "items": None if items is None else [it.id for it in items],
        "train": {k: v for k, v in sorted(train_kw.items()) if k not in ("progress", "threads")},
    }, default=str))  # fmt: skip
    if arch == "mot" and train_kw.get("chain") is None:
        # a name such as sandbox-query stays the same when its weights are replaced: record the weights
        request["source_weights"] = _source_weights(train_kw.get("source"))
    done = _resume(d, request)
    if done is not None:
        return done
    model = None
    if (d / "checkpoint" / "SHA256SUMS").exists():  # trained before an interruption: analyse it
        try:
            model = load_sandbox(d / "checkpoint")
        except ChecksumError:  # cut off while its files were written: train it again
            model = None
        if model is not None and model.arch != arch:
            raise UsageError(f"{d / 'checkpoint'} holds a sandbox-{model.arch}, not sandbox-{arch}")
    if model is None:
        model = training.train_any(arch, d / "checkpoint", seed=seed, **{"progress": False, **train_kw})
    rows, best, peak = _analyse(model, items, arch, d, patch_pairs)
    rec = {"seed": seed, "dir": str(d), "gap": rows, "probe_best": best, "patch_peak": peak}
    write_json(d / "seed.json", rec)
    return rec


def _analyse(model: Any, items: Sequence[Item] | None, arch: str, d: Path, patch_pairs: int) -> tuple:
    """The demo's analyses of one seed's model in ``d``: (gap rows, best probe per role, patching peak)."""
    from uniprobe.experiments import demo_sections as sections
    from uniprobe.experiments.demo_text import best_probe
    from uniprobe.experiments.sandbox.evaluate import evaluate_items, gap_table
    from uniprobe.experiments.tasks.suite import Suite

    suite = Suite(0)
    items = list(items) if items is not None else suite.items
    rows = gap_table(model, suite=suite, results=evaluate_items(model, items, progress=False))
    stores = sections.capture_stores(model, items, d, arch)
    probe_rows = sections.run_probes(stores, arch, d)
    best = {}
    for role in dict.fromkeys(r["role"] for r in probe_rows):
        top, ok = best_probe([r for r in probe_rows if r["role"] == role])
        best[role] = {"layer": top["layer"], "accuracy": top["accuracy"], "readable": ok}
    peak = sections.patch_peak(sections.run_patching(model, items, arch, d, n_items=patch_pairs))
    return rows, best, peak


def _source_weights(source: str | Path | None) -> str:
    """SHA-256 of the warm start's ``model.safetensors`` (sandbox-mot trains from it; None: the
    recipe's own source, ``mot_train.RECIPE``)."""
    from uniprobe.experiments.sandbox.checkpoint import resolve_model_dir, sha256_file
    from uniprobe.experiments.sandbox.mot_train import RECIPE

    return sha256_file(resolve_model_dir(source or RECIPE["source"]) / "model.safetensors")


def _resume(d: Path, request: dict) -> dict | None:
    """Check ``d`` against ``request`` (see :func:`seed_run`); the finished record, or None to go on."""
    req_path = d / "request.json"
    if req_path.exists():
        recorded = read_json(req_path)
        if recorded != request:
            changed = sorted(k for k in set(recorded) | set(request) if recorded.get(k) != request.get(k))
            was = {k: recorded.get(k) for k in changed}
            now = {k: request.get(k) for k in changed}
            raise UsageError(
                f"{d} holds seed {request['seed']} run with other settings (recorded {was}, asked "
                f"{now}); rerun with the recorded settings to resume it, or choose another --out"
            )
        return read_json(d / "seed.json") if (d / "seed.json").exists() else None
    if d.exists() and any(d.iterdir()):
        raise UsageError(
            f"{d} is not empty and holds no seed run's request.json (a run from before resuming, or "
            "someone else's files): choose another --out"
        )
    d.mkdir(parents=True, exist_ok=True)
    write_json(req_path, request)
    return None


def train_seeds(arch: str, seeds: Sequence[int], out: str | Path, **kw: Any) -> list[dict]:
    """:func:`seed_run` for every seed (in order); ``kw`` as there."""
    if not seeds:
        raise ValueError("no seeds given; pass e.g. seeds=[0, 1, 2]")
    return [seed_run(arch, s, out, **kw) for s in seeds]


def spread(values: Sequence[float]) -> dict:
    """``{"mean", "min", "max", "values"}`` of one number over seeds."""
    v = [float(x) for x in values]
    # the mean clipped into [min, max]: float noise (three seeds of 0.925 average to 0.9250000000000002)
    # would otherwise print a mean outside its own range
    return {"mean": min(max(float(np.mean(v)), min(v)), max(v)), "min": min(v), "max": max(v), "values": v}


def summarize_seeds(runs: Sequence[dict]) -> dict:
    """Every gap-table row, each role's best probe and the patching peak as mean and range over ``runs``.

    Returns ``{"seeds", "gap": [row with each metric a :func:`spread`], "probe_best": {role: {"layer",
    "accuracy"}}, "patch_peak": {"effect", "layer"}}``. Rows are matched by (category, task, level).
    """
    keys = ("category", "task", "level")
    by_row: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run["gap"]:
            by_row.setdefault(tuple(r[k] for k in keys), []).append(r)
    gap = []
    for rows in by_row.values():
        r0 = rows[0]
        if len(rows) != len(runs):
            raise ValueError(
                f"gap row {'/'.join(str(r0[k]) for k in keys)} is missing in some seeds (other items?)"
            )
        row = {k: r0[k] for k in ("kind", "category", "task", "level", "n")}
        row["held_out"] = all(r.get("held_out", False) for r in rows)
        for m in GAP_METRICS:
            if m in r0:
                row[m] = spread([r[m] for r in rows])
        gap.append(row)
    roles = dict.fromkeys(role for run in runs for role in run["probe_best"])
    probe = {
        role: {f: spread([run["probe_best"][role][f] for run in runs]) for f in ("layer", "accuracy")}
        for role in roles
    }
    patch = {f: spread([run["patch_peak"][f] for run in runs]) for f in ("effect", "layer")}
    return {"seeds": [run["seed"] for run in runs], "gap": gap, "probe_best": probe, "patch_peak": patch}


def format_seed_table(summary: dict, title: str = "") -> str:
    """Markdown: the gap table with ``mean [min–max]`` cells, then the probe and patching lines."""

    def cell(s: dict | None, scale: float = 100.0, unit: str = "%") -> str:
        if s is None:
            return "—"
        return f"{scale * s['mean']:.0f}{unit} [{scale * s['min']:.0f}–{scale * s['max']:.0f}]"

    n = len(summary["seeds"])
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"Seeds {', '.join(map(str, summary['seeds']))}: mean [min–max] over {n} seeds.",
        "",
        "| kind | category | task | level | n | held out | understanding | generation | generation + CoT |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in summary["gap"]:
        lines.append(
            f"| {r['kind']} | {r['category']} | {r['task']} | {r['level']} | {r['n']} "
            f"| {'yes' if r['held_out'] else 'no'} | {cell(r.get('understanding'))} "
            f"| {cell(r.get('generation'))} | {cell(r.get('generation_cot'))} |"
        )
    lines += ["", "| probe (run:role) | best layer | best accuracy |", "| --- | ---: | ---: |"]
    for role, p in summary["probe_best"].items():
        lines.append(f"| {role} | {cell(p['layer'], 1.0, '')} | {cell(p['accuracy'])} |")
    pk = summary["patch_peak"]
    lines += [
        "",
        f"Largest understanding → generation patching effect (normalised, 1 = as with the answer stated): "
        f"{pk['effect']['mean']:.2f} [{pk['effect']['min']:.2f}–"
        f"{pk['effect']['max']:.2f}] at layer {cell(pk['layer'], 1.0, '')}.",
    ]
    return "\n".join(lines) + "\n"


def seeds_report(arch: str, seeds: Sequence[int], out: str | Path, **kw: Any) -> dict:
    """Train and analyse every seed; write ``out/seeds.json`` and ``out/seeds.md``; return the summary."""
    runs = train_seeds(arch, seeds, out, **kw)
    summary = summarize_seeds(runs)
    summary["arch"] = arch
    summary["runs"] = runs
    write_json(Path(out, "seeds.json"), summary)
    Path(out, "seeds.md").write_text(format_seed_table(summary, title=f"sandbox-{arch} over seeds"))
    return summary
