"""The evaluation protocols of a sandbox model written to a folder: what ``uniprobe seeds gapeval|r3``
and the sweep's ``gapeval`` / ``r3`` analyses run.

    score, rows, results = gapeval_report(model, Suite(0).items, "out/", title="sandbox-ar")
    r3 = r3_report(model, Suite(0).items, "out/", rounds=3, title="sandbox-ar: R3")
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def gapeval_report(
    model: Any,
    items: list,
    out: str | Path,
    *,
    title: str,
    md_title: str | None = None,
    progress: bool = True,
) -> tuple[float, list, list[dict]]:
    """GapEval gap score of ``items``: writes ``gapeval.json``, ``gapeval.md`` and ``gapeval.png``.

    Returns ``(score, category rows, per-item results)``; ``md_title`` heads the markdown (default
    ``title``, which names the figure); ``progress=False`` hides the evaluation's bar on stderr.
    """
    from uniprobe.experiments.sandbox.evaluate import evaluate_items
    from uniprobe.experiments.seeds.gapeval import format_gap_score, plot_gap_score, sandbox_gap_score

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate_items(model, items, cot=False, progress=progress, desc="GapEval")
    score, rows = sandbox_gap_score(results)
    (out / "gapeval.json").write_text(
        json.dumps({"score": score, "categories": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    md = format_gap_score(score, rows, title=md_title or title)
    (out / "gapeval.md").write_text(md + "\n")
    plot_gap_score(rows, score, str(out / "gapeval.png"), title=title)
    return score, rows, results


def r3_report(
    model: Any,
    items: list,
    out: str | Path,
    *,
    rounds: int,
    title: str,
    plot_title: str | None = None,
    progress: bool = True,
) -> Any:
    """The R3 loop (generate → understand → regenerate) on ``items``: writes ``r3.json``, ``r3.md``
    (headed ``title``) and, given ``plot_title``, ``r3.png``. Returns the :class:`R3Result`;
    ``progress=False`` hides the bar on stderr."""
    from uniprobe.experiments.seeds.r3 import format_r3, plot_r3, r3_loop

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = r3_loop(model, items, rounds=rounds, progress=progress)
    (out / "r3.json").write_text(json.dumps(asdict(res), indent=1) + "\n")
    (out / "r3.md").write_text(format_r3(res, title=title) + "\n")
    if plot_title is not None:
        plot_r3(res, str(out / "r3.png"), title=plot_title)
    return res
