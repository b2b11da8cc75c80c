"""Probe and patching maps for knowledge items: is a character's favourite fruit / flower readable at
the generation positions, and does the understanding run's state move the drawing?

Used by knowledge injection before and after fine-tuning; works on any sandbox model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from uniprobe.experiments.demo_sections import GEN_ROLE, _plot_patch, examples_of, patch_map
from uniprobe.experiments.tasks.prompts import Item
from uniprobe.experiments.tasks.suite import Suite, knowledge_items
from uniprobe.hooks.jsonio import write_json
from uniprobe.hooks.pipeline import capture_dataset

READS = (("text", "last"), (None, "mean"))  # (<boi>: the last prompt word), (generation positions: mean)


def favourite_items(items: list[Item]) -> list[Item]:
    """Forward knowledge items whose answer is one word (favourite fruit / flower)."""
    return [it for it in items if it.category == "knowledge_forward" and it.task in ("fruit", "flower")]


def knowledge_probe_map(
    model: Any, suite: Suite, new_items: list[Item], out: Path, tag: str, folds: int = 2, n_boot: int = 300
) -> list[dict]:
    """Probe the favourite fruit / flower in the generation runs, layer × role.

    Training split: the pre-trained characters' ``draw X 's favourite fruit|flower`` runs (folds by
    character); test split: the new characters' — so accuracy says whether the new fact sits where
    the old facts do, readable by the same linear readout. Values held by fewer than ``folds``
    pre-trained characters are left out (no room to cross-validate them).

    Returns result rows (``point``, ``layer``, ``role`` ``"gen:<role>"``, ``accuracy``, ``ci_*``,
    ``control``, ``n_test``...); writes ``probe-{tag}.json`` and ``probe-{tag}.png`` in ``out``.
    """
    from uniprobe.hooks.store import ActivationStore
    from uniprobe.probes.linear import ProbeGroup, encode_labels, train_probes
    from uniprobe.probes.plots import plot_probe_map
    from uniprobe.probes.splits import Split

    arch = model.arch
    old = favourite_items(knowledge_items(suite.characters))
    new = favourite_items(new_items)
    store = capture_dataset(
        model, examples_of(old + new, "gen"), "blocks.*.resid_post", out / f"store-{tag}",
        roles=["text", GEN_ROLE[arch]], mode="generate", batch_size=64, overwrite=True, progress=False,
    )  # fmt: skip
    assert isinstance(store, ActivationStore)
    n_old = len(old)
    answers = [it.answer for it in old + new]
    counts = Counter(answers[:n_old])
    keep = [counts[a] >= folds for a in answers]
    y, classes = encode_labels([a if k else None for a, k in zip(answers, keep, strict=True)])
    test = torch.zeros(len(answers), dtype=torch.bool)
    test[n_old:] = True
    fold = torch.full((len(answers),), -1, dtype=torch.long)
    names = sorted({it.labels["entity"] for it in old})
    for i, it in enumerate(old):  # whole characters per fold
        fold[i] = names.index(it.labels["entity"]) % folds
    split = Split(test, fold, "entity (train: pre-trained characters; test: new characters)", len(names))
    groups = []
    for point in store.points:
        for role, reduce in READS:
            role = role or GEN_ROLE[arch]
            m = store.matrix(point, role, reduce=reduce)
            groups.append(ProbeGroup(point, f"gen:{role}", m.values.float(), m.example.long()))
    res = train_probes(groups, y, classes, split, label="answer", folds=folds, n_boot=n_boot)
    rows = [dict(r) for r in res.rows]
    write_json(out / f"probe-{tag}.json", {"rows": rows, "meta": res.meta}, fallback=str)
    plot_probe_map(
        rows, out / f"probe-{tag}.png", title=f"sandbox-{arch} ({tag}): new facts readable in drawing runs?"
    )
    return rows


def knowledge_patch_map(model: Any, new_items: list[Item], out: Path, tag: str, n_pairs: int = 4) -> dict:
    """Understanding → generation patching on pairs of new characters with different favourites.

    Source: ``what is X 's favourite fruit ? <answer>``; target: ``draw Y 's favourite fruit <boi>``
    teacher-forced with X's fruit; clean: ``draw 1 <X's fruit>``. Sites: ``resid_pre`` at the name,
    ``'s``, ``favourite``, the attribute word, and the answer slot (``<answer>`` → ``<boi>``).
    Writes ``patch-{tag}.json`` and ``patch-{tag}.png``.
    """
    items = favourite_items(new_items)
    pairs = []
    for src in items:
        dst = next((d for d in items if d.task == src.task and d.answer != src.answer), None)
        if dst is not None:
            pairs.append((src, dst))
        if len(pairs) == n_pairs:
            break
    if not pairs:
        raise ValueError("no pair of new characters with different favourites to patch between")
    result = patch_map(model, model.arch, pairs, align_knowledge)
    write_json(out / f"patch-{tag}.json", result)
    _plot_patch(
        np.array(result["grid"]), result["columns"], out / f"patch-{tag}.png", model.arch,
        title=f"sandbox-{model.arch} ({tag}): knowledge, understanding → drawing",
    )  # fmt: skip
    return result


def align_knowledge(model: Any, source: Any, target: Any, src: Item) -> tuple[Any, list[str]]:
    """``X 's favourite ATTR`` ↔ ``Y 's favourite ATTR`` word by word, then ``<answer>`` ↔ ``<boi>``."""
    from uniprobe.probes.patching import alignment

    tok = model.tokenizer
    s_ids = source.kwargs["input_ids"][0].tolist()
    t_ids = target.kwargs["input_ids"][0].tolist()
    s0 = s_ids.index(tok["'s"]) - 1
    t0 = t_ids.index(tok["'s"]) - 1
    pairs = [(t0 + k, s0 + k) for k in range(4)]
    pairs.append((t_ids.index(tok["<boi>"]), len(s_ids) - 1))
    labels = ["name", "'s", "favourite", src.task, "answer slot"]
    return alignment(pairs, len(s_ids), len(t_ids), labels), labels
