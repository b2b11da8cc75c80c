"""Train a sandbox model on CPU: seeded, AdamW + linear warmup + cosine decay, loss on answers and images.

``train_sandbox("ar", "artifacts/sandbox/ar")`` writes the checkpoint (see ``checkpoint.py``) and
``train_log.jsonl`` (one JSON line per logged step: step, loss, text/image loss, lr, seconds).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.tasks.suite import Suite
from experiments.sandbox.base import SandboxModel
from experiments.sandbox.checkpoint import build_model, save_sandbox

DEFAULTS: dict[str, dict] = {
    "ar": {"steps": 5000, "lr": 1e-3, "batch_size": 64},
    "query": {"steps": 5000, "lr": 1e-3, "batch_size": 64},
}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr / 20``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr / 20 + (lr - lr / 20) * 0.5 * (1 + math.cos(math.pi * t))


def train_sandbox(
    arch: str,
    out: str | Path | None,
    steps: int | None = None,
    seed: int = 0,
    time_budget_s: float | None = 330.0,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup: int = 200,
    backbone: dict | None = None,
    suite_seed: int = 0,
    log_every: int = 25,
    progress: bool = True,
    threads: int | None = None,
) -> SandboxModel:
    """Train a fresh ``arch`` model (``"ar"`` | ``"query"``) and save it to ``out`` (if not None).

    Deterministic for a given seed (data stream and init) when ``time_budget_s`` is None. With a
    budget, the learning-rate schedule follows ``max(step, elapsed share of the budget)`` so the
    cosine decay completes on a slow machine, and training stops when the budget is spent (noted
    in the log); results then depend on machine speed.
    """
    d = DEFAULTS[arch]
    steps = steps or d["steps"]
    batch_size = batch_size or d["batch_size"]
    lr = lr or d["lr"]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    suite = Suite(suite_seed)
    model = build_model(arch, backbone=backbone)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    stream = suite.training_examples(seed)
    log_path = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_path = Path(out) / "train_log.jsonl"
        log_path.write_text("")
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train {arch}", disable=not progress, mininterval=2)
    for step in bar:
        # when the time budget binds, the schedule follows elapsed time so the cosine still completes
        elapsed = time.time() - t0
        progress_step = step if time_budget_s is None else max(step, int(steps * elapsed / time_budget_s))
        for g in opt.param_groups:
            g["lr"] = lr_at(progress_step, steps, lr, warmup)
        batch = model.training_batch(list(itertools.islice(stream, batch_size)))
        loss, parts = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - t0
        stop = time_budget_s is not None and elapsed > time_budget_s
        if step % log_every == 0 or step == steps - 1 or stop:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            rec = {"step": step, "loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()},
                   "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed, 1)}  # fmt: skip
            if stop:
                rec["stopped"] = f"time budget {time_budget_s}s reached"
            if log_path:
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        if stop:
            break
    model.eval()
    if out is not None:
        save_sandbox(model, out)
    return model
