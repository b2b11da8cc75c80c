"""The gap table: understanding vs generation (judged) vs generation with CoT, per task and level.

``evaluate_items`` runs a model on test items in both forms and judges every drawing with
``world.satisfies``; ``gap_table`` aggregates per (category, task, level). Mapping items count per
A/B group: a group is right only if both variants are. ``format_gap_table`` renders markdown.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from uniprobe.experiments.progress import bar, chunks
from uniprobe.experiments.sandbox.base import SandboxModel
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Item
from uniprobe.experiments.tasks.suite import Suite, held_out_categories

KIND: dict[str, str] = {
    "direct": "direct",
    "arithmetic": "reasoning",
    "mapping": "reasoning",
    "knowledge_forward": "knowledge (forward)",
    "knowledge_inverse": "knowledge (inverse)",
}


def evaluate_items(
    model: SandboxModel,
    items: Sequence[Item],
    cot: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> list[dict]:
    """Per item: ``understanding`` answer and correctness, ``generation`` grid and verdict, and with
    ``cot`` the CoT grid and verdict. Grids are ``int64 [H, W]`` numpy arrays.

    The model runs one ``batch_size`` chunk at a time (the chunks its own batching would make, and
    decoding is greedy, so the results are the same) so that a bar on stderr can count prompts.
    """
    items = list(items)
    answers: list[str] = []
    grids: list = []
    cot_grids: list | None = [] if cot else None
    passes = 3 if cot else 2  # understanding, drawing, drawing with CoT
    with bar(total=passes * len(items), desc=desc, unit="prompt", progress=progress) as pbar:
        for span in chunks(len(items), batch_size):
            part = [items[k] for k in span]
            answers += model.understand([it.und_prompt for it in part], batch_size=batch_size)
            pbar.update(len(part))
            grids += model.generate_image([it.draw_prompt for it in part], cot=False, batch_size=batch_size)
            pbar.update(len(part))
            if cot_grids is not None:
                cot_grids += model.generate_image(
                    [it.draw_prompt for it in part], cot=True, batch_size=batch_size
                )
                pbar.update(len(part))
    out = []
    for k, it in enumerate(items):
        rec = {
            "id": it.id,
            "group": it.group,
            "category": it.category,
            "task": it.task,
            "level": it.level,
            "answer": answers[k],
            "understanding": answers[k] == it.answer,
            "grid": grids[k],
            "generation": world.satisfies(grids[k], it.criterion),
        }
        if cot_grids is not None:
            rec["cot_grid"] = cot_grids[k]
            rec["generation_cot"] = world.satisfies(cot_grids[k], it.criterion)
        out.append(rec)
    return out


def gap_table(
    model: SandboxModel,
    suite: Suite | None = None,
    items: Sequence[Item] | None = None,
    cot: bool = True,
    batch_size: int = 64,
    results: list[dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Rows ``{"kind", "category", "task", "level", "n", "held_out", "understanding", "generation",
    "generation_cot"}``.

    Accuracies are fractions in [0, 1]; ``n`` counts items (mapping: A/B groups). ``held_out`` is
    true when the row's items occur nowhere in the model's training (its ``training_recipe``, read
    from ``training.json``, by :func:`~uniprobe.experiments.tasks.suite.held_out_categories`; the
    items are taken to be ``suite``'s, default ``Suite(0)``); a model with no recorded recipe holds
    nothing out. Pass ``results`` from :func:`evaluate_items` to aggregate without running the model
    again (records with ``understanding`` only give rows without the drawing columns);
    ``progress=False`` hides the evaluation's bar.
    """
    suite_seed = suite.seed if suite is not None else 0
    held = held_out_categories(getattr(model, "training_recipe", None), suite_seed)
    if results is None:
        items = items if items is not None else (suite or Suite(0)).items
        results = evaluate_items(model, items, cot=cot, batch_size=batch_size, progress=progress)
    # the metrics the results carry: text-only results (understanding alone) aggregate the same way
    metrics = [m for m in ("understanding", "generation", "generation_cot") if m in results[0]]
    groups: dict[tuple, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_group[r["group"]].append(r)
    for members in by_group.values():
        r0 = members[0]
        key = (r0["category"], r0["task"], r0["level"])
        for m in metrics:
            groups[key][m].append(all(r[m] for r in members))
    order = {c: i for i, c in enumerate(KIND)}
    rows = []
    for (cat, task, level), vals in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])
    ):
        row = {
            "kind": KIND[cat],
            "category": cat,
            "task": task,
            "level": level,
            "n": len(vals["understanding"]),
            "held_out": cat in held,
        }
        for m in metrics:
            row[m] = sum(vals[m]) / len(vals[m])
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Item-weighted accuracy per kind (direct / reasoning / knowledge forward / inverse)."""
    acc: dict[str, dict] = {}
    for r in rows:
        a = acc.setdefault(r["kind"], {"kind": r["kind"], "n": 0})
        a["n"] += r["n"]
        for m in ("understanding", "generation", "generation_cot"):
            if m in r:
                a[m] = a.get(m, 0.0) + r[m] * r["n"]
    for a in acc.values():
        for m in ("understanding", "generation", "generation_cot"):
            if m in a:
                a[m] /= a["n"]
    return list(acc.values())


def format_gap_table(rows: Sequence[dict], title: str = "") -> str:
    """Markdown: one line per row, then the per-kind summary."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f}%"

    lines = [f"### {title}", ""] if title else []
    lines += [
        "| kind | category | task | level | n | understanding | generation | generation + CoT |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['category']} | {r['task']} | {r['level']} | {r['n']} "
            f"| {pct(r['understanding'])} "
            f"| {pct(r['generation'])} | {pct(r.get('generation_cot'))} |"
        )
    lines += [
        "",
        "| kind | n | understanding | generation | generation + CoT |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in summarize(rows):
        lines.append(
            f"| {s['kind']} | {s['n']} | {pct(s['understanding'])} | {pct(s['generation'])} "
            f"| {pct(s.get('generation_cot'))} |"
        )
    held = sorted({r["category"] for r in rows if r.get("held_out")})
    if held:
        lines += ["", f"Held out (these items occur nowhere in training): {', '.join(held)}."]
    return "\n".join(lines) + "\n"
