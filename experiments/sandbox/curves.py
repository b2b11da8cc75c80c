"""Learning curves of one reasoning task trained alone: is it learnable by the sandbox backbone, and how fast?

Issue 18's recipe trials train arithmetic and mapping inside the full mix; when a task stays at chance
there, this asks the simpler question first: trained *alone* (the whole stream is
``Suite.training_examples``' warm-up of that task: ``arith_warmup`` or ``mapping_warmup``, so the
held-out test expressions and rule sets still occur nowhere), does held-out understanding rise, and
after how many steps? (``mapping1`` trains one-hop rule sets only; ``mix`` trains the arch's whole
training stream, updated by ``data``, e.g. the last stage of a staged recipe.) Every ``every`` steps the model
answers the suite's held-out test questions (arithmetic per level; mapping per level as A/B pairs,
right only when both variants are, and per prompt) and one JSON line is appended to ``curve.jsonl``::

    python -m uniprobe.experiments.sandbox.curves --task mapping --steps 3200 --every 400 --out DIR

One thread, no time budget: deterministic for a seed. The schedule is :func:`train.fit`'s (warm-up,
then one cosine decay over ``steps``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from uniprobe.experiments.sandbox.checkpoint import save_sandbox
from uniprobe.experiments.sandbox.evaluate import gap_table
from uniprobe.experiments.sandbox.train import DEFAULTS, fit, start_model
from uniprobe.experiments.sandbox.trials import heldout_scores
from uniprobe.experiments.tasks.suite import Suite
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.jsonio import write_json

TASKS = ("arith", "mapping", "mapping1", "mix")


def heldout_understanding(model, suite: Suite) -> dict[str, float]:
    """Greedy text answers to the held-out arithmetic and mapping questions of ``suite``.

    Returns ``{"arith L1": acc, ..., "mapping L1": pair acc, ..., "mapping L1 prompts": acc, ...}``
    (fractions in [0, 1]; a mapping pair counts when both its A and B questions are answered right,
    aggregated by :func:`~uniprobe.experiments.sandbox.evaluate.gap_table` as in the gap table).
    """
    items = [it for it in suite.items if it.category in ("arithmetic", "mapping")]
    answers = model.understand([it.question for it in items])  # no images in these items
    results = [
        {"group": it.group, "category": it.category, "task": it.task, "level": it.level,
         "understanding": a == it.answer}
        for it, a in zip(items, answers, strict=True)
    ]  # fmt: skip
    out = {
        f"{r['task']} L{r['level']}": round(r["understanding"], 4) for r in gap_table(model, results=results)
    }
    for level in (1, 2, 3):
        oks = [r["understanding"] for r in results if r["category"] == "mapping" and r["level"] == level]
        out[f"mapping L{level} prompts"] = round(sum(oks) / len(oks), 4)
    return dict(sorted(out.items()))


def learning_curve(
    task: str,
    steps: int,
    every: int,
    out: str | Path,
    arch: str = "ar",
    seed: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    threads: int | None = 1,
    backbone: dict | None = None,
    wide_level1: bool = True,
    weight_decay: float = 0.01,
    data: dict | None = None,
    init: str | Path | None = None,
    save: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train a fresh ``arch`` model on ``task`` alone for ``steps`` steps; every ``every`` steps (and at
    the end) append ``{"step", "loss", "seconds", **heldout_understanding}`` to ``out/curve.jsonl``
    (for ``"mix"``, which draws too, the trials' :func:`heldout_scores`: drawing and counting as well).

    ``task``: ``"arith"`` (levels 1-3 in turn; level 1 over every digit value with ``wide_level1``) or
    ``"mapping"`` (one hop in the first third of the run, up to two in the second, up to three after)
    or ``"mapping1"`` (one hop only: the first third of a warm-up three times the run's length), or
    ``"mix"`` (the arch's training stream of ``DEFAULTS`` with ``taught_reasoning=0``, updated by
    ``data``: e.g. ``{"mix": "reasoning_wide"}``; its warm-ups only if ``data`` sets them).
    ``weight_decay`` is AdamW's; ``data`` passes more :meth:`Suite.training_examples` keywords (e.g.
    ``mapping_chains``), not the ones the task sets. ``init``: continue from this checkpoint (e.g. a
    saved one-hop curve's) instead of a fresh model; it must hold out the test questions too.
    ``save``: also write the final model to ``out/checkpoint`` (its ``training.json`` records the
    curve's recipe and, with ``init``, the recipe it started from).
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if arch not in ("ar", "query"):
        raise UsageError(f"learning curves train sandbox-ar or sandbox-query from scratch, not {arch!r}")
    d = DEFAULTS[arch]
    seed = d["seed"] if seed is None else seed
    batch_size = batch_size or d["batch_size"]
    lr = lr or d["lr"]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    suite = Suite(0)
    model, start = start_model(arch, backbone, init, suite_seed=0)
    n = steps * batch_size
    extra = dict(data or {})
    # with other examples rehearsed inside the mapping warm-up, the run holds fewer mapping questions
    rehearsed = extra.get("mapping_rehearse_arith", 0.0) + extra.get("mapping_rehearse_mix", 0.0)
    n_mapping = round(n * (1.0 - rehearsed))
    warm = {
        "arith": {"arith_warmup": n},
        "mapping": {"mapping_warmup": n_mapping},
        "mapping1": {"mapping_warmup": 3 * n},
        "mix": {},
    }[task]
    if task == "mix":  # the arch's recipe under the user's keys (taught_reasoning is pinned to 0 below)
        extra = {k: v for k, v in d["data"].items() if k != "taught_reasoning"} | extra
    clash = sorted(set(extra) & {"taught_reasoning", "wide_level1", *warm})
    if clash:
        raise UsageError(f"data keys {clash} are set by the task and its options; drop them from data")
    stream = suite.training_examples(seed, taught_reasoning=0, wide_level1=wide_level1, **warm, **extra)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.jsonl"
    path.write_text("")
    recipe = {"task": task, "arch": arch, "seed": seed, "steps": steps, "lr": lr, "batch_size": batch_size,
              "backbone": backbone, "wide_level1": wide_level1, "weight_decay": weight_decay,
              "data": extra,
              "init": None if init is None else {"path": str(init), "training": start}}  # fmt: skip
    write_json(out / "recipe.json", recipe)
    rows: list[dict] = []
    log_path = out / "train_log.jsonl"  # fit logs every step; an evaluation quotes the last loss
    t0 = time.time()

    def after_step(step: int) -> None:
        if (step + 1) % every and step != steps - 1:
            return
        model.eval()
        last = json.loads(log_path.read_text().splitlines()[-1])
        row = {"step": step + 1, "loss": last["loss"], "seconds": round(time.time() - t0, 1)}
        row.update(heldout_scores(model, suite) if task == "mix" else heldout_understanding(model, suite))
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    fit(
        model, stream, steps, lr, batch_size, log_path=log_path, log_every=1, progress=progress,
        desc=f"curve {task}", after_step=after_step, weight_decay=weight_decay,
    )  # fmt: skip
    if save:  # the stream's keywords as training.json records them (held_out_categories reads data)
        training = {"arch": arch, "seed": seed, "suite_seed": 0, "steps": steps, "lr": lr,
                    "batch_size": batch_size, "data": {"taught_reasoning": 0, "wide_level1": wide_level1,
                    **warm, **extra}, "curve": {k: v for k, v in recipe.items() if k != "init"}}  # fmt: skip
        if init is not None:  # held_out_categories reads it: held out only if the start held it out
            training["init"] = recipe["init"]  # once: a copy under "curve" too doubled the record per stage
        save_sandbox(model, out / "checkpoint", training=training)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, default=400, help="evaluate every this many steps")
    p.add_argument("--out", required=True, help="folder for curve.jsonl, recipe.json and train_log.jsonl")
    p.add_argument("--arch", default="ar", choices=("ar", "query"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (the arch's default: 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (fit's default 0.01)")
    p.add_argument("--backbone", default=None, help="JSON: backbone config overrides")
    p.add_argument("--init", default=None, help="continue from this checkpoint (see --save)")
    p.add_argument("--save", action="store_true", help="also write the final model to OUT/checkpoint")
    p.add_argument(
        "--data",
        default=None,
        help="JSON: more Suite.training_examples keywords, e.g. '{\"mapping_chains\": 4}'",
    )
    a = p.parse_args(argv)
    rows = learning_curve(
        a.task, a.steps, a.every, a.out, arch=a.arch, seed=a.seed, lr=a.lr, batch_size=a.batch_size,
        threads=a.threads,
        weight_decay=a.weight_decay, data=json.loads(a.data) if a.data else None, init=a.init, save=a.save,
        backbone=json.loads(a.backbone) if a.backbone else None,
    )  # fmt: skip
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
