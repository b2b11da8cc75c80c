"""Staged recipes: a chain of learning curves, each continuing the previous stage's checkpoint.

Issue 18 measured that the sandbox AR learns symbol binding (mapping) only alone and with small batches,
and that a model trained on mapping first still learns the rest when the mix comes after it in two
stages (``artifacts/sandbox/HELDOUT.md``, seventh session). This runs such a chain in one command::

    python -m uniprobe.experiments.sandbox.staged --seed 1 --out DIR

Each stage is :func:`~uniprobe.experiments.sandbox.curves.learning_curve` with ``save=True`` in
``DIR/<stage name>``, started from the stage before (``init``); stage ``k`` (from 0) uses seed
``seed + k``, so ``--seed 1`` is the chain measured first. ``DIR/staged.json`` records the plan; a rerun
with the same plan skips the stages whose checkpoint exists (an interrupted chain resumes), a rerun with
another plan is refused. The last stage's checkpoint is the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from uniprobe.experiments.sandbox.curves import learning_curve
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.jsonio import write_json

# the AR chain of the seventh session: one hop, the hop curriculum (both batch 16, alone), the
# reasoning_wide mix with batch 16 (mapping is kept while the rest starts), then arith_heavy_144 with
# batch 64 (arithmetic levels 1-3 at 1:4:4, counting and drawing learnt)
STAGED_AR: tuple[dict, ...] = (
    {"name": "1-mapping1", "task": "mapping1", "steps": 9600, "every": 1600, "batch_size": 16},
    {"name": "2-mapping", "task": "mapping", "steps": 9600, "every": 1600, "batch_size": 16},
    {"name": "3-mix", "task": "mix", "steps": 6000, "every": 1000, "batch_size": 16,
     "data": {"mix": "reasoning_wide"}},
    {"name": "4-final", "task": "mix", "steps": 3000, "every": 500, "batch_size": 64,
     "data": {"mix": "arith_heavy_144"}},
)  # fmt: skip


def run_staged(
    out: str | Path,
    seed: int = 1,
    stages: Sequence[dict] = STAGED_AR,
    arch: str = "ar",
    backbone: dict | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> list[dict]:
    """Run ``stages`` in turn under ``out``; returns the last curve row of each stage.

    ``stages``: dicts with ``name``, ``task``, ``steps``, ``every`` and optionally ``batch_size``,
    ``lr``, ``data`` (see :func:`learning_curve`). ``backbone`` shapes the first stage's fresh model
    (later stages inherit it). The final model is ``out/<last name>/checkpoint``.
    """
    out = Path(out)
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"stage names must be distinct and at least one, not {names}")
    plan = {"arch": arch, "seed": seed, "backbone": backbone, "stages": [dict(s) for s in stages]}
    plan_path = out / "staged.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != json.loads(json.dumps(plan)):
            raise UsageError(
                f"{out} holds a staged run with another plan ({plan_path}); finish it with the same "
                "settings or choose another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no staged run: choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_path, plan)
    init: Path | None = None
    last_rows: list[dict] = []
    for k, stage in enumerate(stages):
        folder = out / stage["name"]
        checkpoint = folder / "checkpoint"
        if (checkpoint / "model.safetensors").exists() and (folder / "curve.jsonl").exists():
            rows = [json.loads(x) for x in (folder / "curve.jsonl").read_text().splitlines()]
        else:  # a stage cut off before its checkpoint was written runs again from its start
            rows = learning_curve(
                stage["task"], stage["steps"], stage["every"], folder, arch=arch, seed=seed + k,
                lr=stage.get("lr"), batch_size=stage.get("batch_size"), threads=threads,
                backbone=backbone if init is None else None, data=stage.get("data"), init=init,
                save=True, progress=progress,
            )  # fmt: skip
        last_rows.append({"stage": stage["name"], **rows[-1]})
        init = checkpoint
    return last_rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of the chain (one sub-folder per stage)")
    p.add_argument("--seed", type=int, default=1, help="seed of the first stage; stage k uses seed + k")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        rows = run_staged(a.out, seed=a.seed, threads=a.threads)
    except UsageError as err:  # status 2, as the uniprobe CLI: bad settings, not a crash
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
