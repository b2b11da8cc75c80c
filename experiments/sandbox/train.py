"""Train a sandbox model on CPU: seeded, AdamW + linear warmup + cosine decay, loss on answers and images.

``train_sandbox("ar", "artifacts/my-sandbox-ar")`` writes the checkpoint (see ``checkpoint.py``) and
``train_log.jsonl`` (one JSON line per logged step: step, loss, text/image loss, lr, seconds).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from uniprobe.experiments.progress import bar
from uniprobe.experiments.sandbox.base import SandboxModel
from uniprobe.experiments.sandbox.checkpoint import build_model, load_sandbox, save_sandbox
from uniprobe.experiments.tasks.suite import Suite, TrainExample, held_out_categories
from uniprobe.hooks.errors import UsageError

DEFAULTS: dict[str, dict] = {
    # the one-stage AR recipe that trained sandbox-ar before issue 18 (20% of its questions are the test
    # reasoning questions): the base of the trials and curves. sandbox-ar now ships from the staged chain
    # staged.STAGED_AR_LONGER_WD_REMAP_ARITH2_DRAW (``train-sandbox --arch ar --chain
    # mix-first-longer-wd-remap-arith2-draw``), whose first three stages are staged.STAGED_AR (``mix-first``)
    "ar": {
        "seed": 0,
        "steps": 1400,
        "lr": 1e-3,
        "batch_size": 64,
        "data": {
            "gen_fraction": 0.22,
            "prefix_p": 0.15,
            "direct_heldout": True,
            "mix": "count_heavier",
            "taught_reasoning": 0.2,
        },
    },
    # the one-stage query recipe that trained sandbox-query before issue 18 (taught the test reasoning
    # questions); sandbox-query now ships from the staged chain staged.STAGED_CONSOLIDATE_WD
    # (``train-sandbox --arch query --chain mix-first-consolidate-wd``), whose stages update this data.
    # The query model's parallel decoder does not compose held-out (count, object) pairs: train on all.
    # Seed 2: with this recipe seeds 0 / 1 / 2 counted objects in test images right 85 / 90 / 92.5% of
    # the time, and seed 1's portrait drawing collapsed (20%); see artifacts/sandbox/RESULTS.md
    "query": {
        "seed": 2,
        "steps": 1400,
        "lr": 1e-3,
        "batch_size": 64,
        "data": {
            "gen_fraction": 0.15,
            "prefix_p": 0.12,
            "direct_heldout": False,
            "mix": "count_heavier",
            "taught_reasoning": 0.2,
        },
    },
    # sandbox-mot ships from mot_train.train_mot (warm start from sandbox-query, then the generation
    # path only); this entry is the base of its replay (STARS, injection: updated by its source's data)
    # and the recipe of a from-scratch train_sandbox("mot")
    "mot": {
        "seed": 0,
        "steps": 1400,
        "lr": 1e-3,
        "batch_size": 64,
        "data": {
            "gen_fraction": 0.15,
            "prefix_p": 0.12,
            "direct_heldout": False,
            "mix": "count_heavier",
            "taught_reasoning": 0.2,
        },
    },
}


# Suite.training_examples keywords that shape a warm-up curriculum, not the mix a replay draws from
WARMUP_KEYS: tuple[str, ...] = (
    "arith_warmup", "mapping_warmup", "arith_levels", "mapping_rehearse_arith", "mapping_rehearse_mix",
)  # fmt: skip


def replay_data(arch: str, recipe: dict | None) -> dict:
    """The :meth:`Suite.training_examples` keywords that replay a model's pre-training mix while it is
    fine-tuned (STARS, knowledge injection): ``DEFAULTS[arch]["data"]`` updated by the model's own
    recipe (``training.json``'s ``data``, the last stage's for a chain) without its warm-ups. So a
    replay never teaches what the model's training held out: a staged model trained with
    ``taught_reasoning=0`` is not shown the test reasoning questions by its replay. For the recipes
    of ``DEFAULTS`` (one-stage models) it is ``DEFAULTS[arch]["data"]`` itself."""
    data = dict(DEFAULTS[arch]["data"])
    if recipe is not None:
        data.update({k: v for k, v in recipe.get("data", {}).items() if k not in WARMUP_KEYS})
    return data


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr / 20``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr / 20 + (lr - lr / 20) * 0.5 * (1 + math.cos(math.pi * t))


def length_chunks(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Indices sorted by length, cut into micro-batches of at most ``max_rows`` rows and (if given)
    at most ``max_tokens`` padded positions (rows x longest row): short examples share big
    micro-batches, long ones get small ones, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        fits = cur is not None and len(cur) < max_rows
        if fits and max_tokens is not None:
            fits = (len(cur) + 1) * lengths[i] <= max_tokens  # i is the longest so far
        if fits:
            cur.append(i)
        else:
            chunks.append([i])
    return chunks


def accumulate_step(
    model: SandboxModel, examples: list, micro_batch: int, max_tokens: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Backward the token-mean loss of ``examples``, in length-sorted micro-batches (less padding).

    Micro-batches hold at most ``micro_batch`` rows and, if ``max_tokens`` is given, at most that
    many padded positions. The gradient is that of the whole batch's token mean either way (each
    micro-batch's summed loss is divided by the batch's token count), up to float rounding.
    Returns the detached mean loss and the mean per part.
    """
    streams = [model.example_stream(e) for e in examples]
    lengths = [sum(len(s.ids) for s in segs) for segs, _ in streams]
    chunks = length_chunks(lengths, micro_batch, max_tokens)
    n_total = sum(sum(len(s.ids) for s in segs if s.loss) for segs, _ in streams)
    if model.arch == "query":  # the decoder's targets are not segments
        n_total += sum(model.n_cells for _, grid in streams if grid is not None)
    sums = {"text": 0.0, "n_text": 0, "image": 0.0, "n_image": 0}
    total = 0.0
    for chunk in chunks:
        batch = model._collate([streams[i][0] for i in chunk], [streams[i][1] for i in chunk])
        s, _, p = model.loss_sums(batch)
        (s / n_total).backward()
        total += s.item()
        for k in sums:
            sums[k] += p[k]
    parts = {"text": sums["text"] / max(1, sums["n_text"]), "image": sums["image"] / max(1, sums["n_image"])}
    return torch.tensor(total / max(1, sums["n_text"] + sums["n_image"])), parts


def start_model(
    arch: str, backbone: dict | None, init: str | Path | None, suite_seed: int
) -> tuple[SandboxModel, dict | None]:
    """A fresh ``arch`` model, or the ``init`` checkpoint and its training record."""
    if init is None:
        return build_model(arch, backbone=backbone), None
    if backbone is not None:
        raise UsageError("init= continues a checkpoint with its own backbone: drop backbone=")
    model = load_sandbox(init)
    if model.arch != arch:
        raise UsageError(f"init={str(init)!r} is a sandbox-{model.arch} checkpoint, not sandbox-{arch}")
    start = model.training_recipe
    if start is None or "arithmetic" not in held_out_categories(start, suite_seed):
        raise UsageError(
            f"init={str(init)!r} has no training.json that holds the test questions out (taught_reasoning 0, "
            f"suite seed {suite_seed}): what it was taught would be scored as held out"
        )
    return model, start


def train_sandbox(
    arch: str,
    out: str | Path | None,
    steps: int | None = None,
    seed: int | None = None,
    time_budget_s: float | None = 330.0,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup: int = 200,
    backbone: dict | None = None,
    suite_seed: int = 0,
    log_every: int = 25,
    progress: bool = True,
    threads: int | None = None,
    micro_batch: int = 16,
    max_tokens: int | None = None,
    data: dict | None = None,
    init: str | Path | None = None,
) -> SandboxModel:
    """Train a fresh ``arch`` model (``"ar"`` | ``"query"`` | ``"mot"``) and save it to ``out`` (if not None).

    ``init``: continue this checkpoint (e.g. one a learning curve saved) instead of a fresh model; its
    training record goes into the new one's under ``"init"``, so a test category counts as held out
    only when both stages held it out (:func:`~uniprobe.experiments.tasks.suite.held_out_categories`).

    ``seed`` (data stream and init) defaults to the arch's (``DEFAULTS``: the shipped query checkpoint's,
    and the one-stage AR's).
    Deterministic for a given seed and thread count when ``time_budget_s`` is None. With a
    budget, the learning-rate schedule follows ``max(step, elapsed share of the budget)`` so the
    cosine decay completes on a slow machine, and training stops when the budget is spent (noted
    in the log); results then depend on machine speed.

    Micro-batches are length-sorted and capped at ``micro_batch`` rows and ``max_tokens`` padded
    positions (see :func:`length_chunks`). ``data`` overrides keys of the per-arch data mix
    (the keyword arguments of ``Suite.training_examples``).
    Measured here, the step is matmul-bound (``aten::mm`` ~half the time at ~36 GFLOP/s on a core):
    ``micro_batch=64, max_tokens=1024`` or SDPA attention change s/step by <10%, so the defaults
    (16 rows, no token cap) stay, which keeps the checkpoints reproducible.
    """
    d = DEFAULTS[arch]
    seed = d["seed"] if seed is None else seed
    steps = steps or d["steps"]
    batch_size = batch_size or d["batch_size"]
    lr = lr or d["lr"]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    suite = Suite(suite_seed)
    model, start = start_model(arch, backbone, init, suite_seed)
    stream = suite.training_examples(seed, **{**d["data"], **(data or {})})
    log_path = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_path = Path(out) / "train_log.jsonl"
    fit(
        model, stream, steps, lr, batch_size, warmup=warmup, time_budget_s=time_budget_s, log_path=log_path,
        log_every=log_every, progress=progress, micro_batch=micro_batch, max_tokens=max_tokens,
        desc=f"train {arch}",
    )  # fmt: skip
    # what training.json records: enough to say which test items occurred nowhere in training
    model.training_recipe = {
        "arch": arch, "seed": seed, "suite_seed": suite_seed, "steps": steps, "lr": lr,
        "batch_size": batch_size, "time_budget_s": time_budget_s, "data": {**d["data"], **(data or {})},
    }  # fmt: skip
    if init is not None:
        model.training_recipe["init"] = {"path": str(init), "training": start}
    if out is not None:
        save_sandbox(model, out, training=model.training_recipe)
    return model


def train_any(
    arch: str,
    out: str | Path | None,
    steps: int | None = None,
    seed: int | None = None,
    time_budget_s: float | None = None,
    threads: int | None = None,
    source: str | Path | None = None,
    progress: bool = True,
    chain: str | None = None,
    **kw: Any,
) -> SandboxModel:
    """Each architecture's recipe: :func:`train_sandbox` for ``ar`` / ``query``; for ``mot``
    :func:`~uniprobe.experiments.sandbox.mot_train.train_mot` (warm start from ``source``, default
    ``sandbox-query``, then the generation path). ``kw``: ``train_sandbox``'s other keywords (``mot``
    takes only ``data``, its drawing stream's keys, and ``weight_decay``, AdamW's in every stage).

    ``chain`` (``ar`` / ``query``): instead, a staged chain of
    :data:`~uniprobe.experiments.sandbox.staged.CHAINS` (e.g. ``"mix-first-longer-wd-remap-arith2-draw"``,
    sandbox-ar's recipe, whose understanding generalises), run by
    :func:`~uniprobe.experiments.sandbox.staged.run_staged` in ``<out>-stages/`` (an interrupted chain
    resumes there) and its last checkpoint copied to ``out``; ``seed`` is the first stage's (default: the
    chain's as measured); only ``backbone`` may be added.
    """
    if chain is not None:
        given = sorted(set(kw) - {"backbone"}) + [
            name for name, v in (("steps", steps), ("time_budget_s", time_budget_s), ("source", source)) if v
        ]
        if out is None or given:
            raise UsageError(
                f"a chain sets each stage's steps and data itself and writes its stages beside out: "
                f"{'give out' if out is None else f'drop {given}'} (or change the stages in staged.CHAINS)"
            )
        return _train_chain(arch, Path(out), chain, seed, threads, progress, kw.get("backbone"))
    if arch == "mot":
        from uniprobe.experiments.sandbox.mot_train import train_mot

        extra = sorted(set(kw) - {"data", "weight_decay"})
        if extra:
            raise UsageError(f"sandbox-mot's recipe (mot_train.RECIPE) does not take {extra}; drop them")
        return train_mot(
            out, threads=threads, progress=progress, seed=seed, steps=steps, source=source,
            data=kw.get("data"), time_budget_s=time_budget_s, weight_decay=kw.get("weight_decay"),
        )  # fmt: skip
    if source is not None:
        raise UsageError(f"source= is sandbox-mot's warm start; sandbox-{arch} trains from scratch: drop it")
    return train_sandbox(
        arch, out, steps=steps, seed=seed, time_budget_s=time_budget_s, threads=threads,
        progress=progress, **kw,
    )  # fmt: skip


def _train_chain(
    arch: str,
    out: Path,
    chain: str,
    seed: int | None,
    threads: int | None,
    progress: bool,
    backbone: dict | None,
) -> SandboxModel:
    """:func:`train_any` with ``chain``: run the chain's stages, copy the last checkpoint to ``out``."""
    import shutil

    from uniprobe.experiments.sandbox.staged import CHAINS, run_staged

    if chain not in CHAINS:
        raise UsageError(f"unknown chain {chain!r}: use one of {', '.join(sorted(CHAINS))}")
    if arch not in ("ar", "query"):
        raise UsageError(f"staged chains train sandbox-ar or sandbox-query from scratch, not sandbox-{arch}")
    stages, measured = CHAINS[chain]
    stages_dir = out.with_name(out.name + "-stages")
    run_staged(
        stages_dir, seed=measured if seed is None else seed, stages=stages, arch=arch,
        backbone=backbone, threads=threads, progress=progress,
    )  # fmt: skip
    last = stages_dir / stages[-1]["name"] / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(last.iterdir()):  # the checkpoint's files, SHA256SUMS and training.json included
        shutil.copy2(f, out / f.name)
    return load_sandbox(out)


def fit(
    model: SandboxModel,
    stream: Iterator[TrainExample],
    steps: int,
    lr: float,
    batch_size: int,
    warmup: int = 200,
    time_budget_s: float | None = None,
    log_path: str | Path | None = None,
    log_every: int = 25,
    progress: bool = True,
    micro_batch: int = 16,
    max_tokens: int | None = None,
    desc: str = "train",
    weight_decay: float = 0.01,
    after_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """The training loop shared by pre-training and the protocols' fine-tuning.

    AdamW (betas 0.9/0.98) with :func:`lr_at`'s warmup + cosine schedule, gradient clipping at 1,
    ``batch_size`` examples of ``stream`` per step. Returns the logged records (also appended to
    ``log_path`` as JSON lines: step, loss, text/image loss, lr, seconds). Leaves ``model`` in eval mode.
    ``after_step(step)`` runs after each optimiser step (a learning curve's evaluations); if it puts the
    model in eval mode, training mode is restored before the next step.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    if log_path is not None:
        Path(log_path).write_text("")
    records: list[dict] = []
    t0 = time.time()
    pbar = bar(range(steps), desc=desc, progress=progress)  # stderr; TQDM_DISABLE / CI obeyed
    for step in pbar:
        # when the time budget binds, the schedule follows elapsed time so the cosine still completes
        elapsed = time.time() - t0
        progress_step = step if time_budget_s is None else max(step, int(steps * elapsed / time_budget_s))
        for g in opt.param_groups:
            g["lr"] = lr_at(progress_step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss, parts = accumulate_step(
            model, list(itertools.islice(stream, batch_size)), micro_batch, max_tokens
        )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - t0
        stop = time_budget_s is not None and elapsed > time_budget_s
        if step % log_every == 0 or step == steps - 1 or stop:
            pbar.set_postfix(loss=f"{loss.item():.3f}")
            rec = {
                "step": step,
                "loss": round(loss.item(), 5),
                **{k: round(v, 5) for k, v in parts.items()},
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(elapsed, 1),
            }
            if stop:
                rec["stopped"] = f"time budget {time_budget_s}s reached"
            records.append(rec)
            if log_path is not None:
                with Path(log_path).open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        if after_step is not None:
            after_step(step)
            model.train()
        if stop:
            break
    model.eval()
    return records
