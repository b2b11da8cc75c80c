"""Knowledge injection (UniSandbox knowledge transfer; GapEval knowledge manipulation) on the sandbox.

New characters (names the model never saw, ``vocab.NEW_NAMES``) are taught to a trained sandbox
model in one of two directions, each from the same starting weights:

- ``understanding``: text QA only — their six attributes, ``describe X ?`` and inverse questions on
  training pairs — mixed with replayed text-only QA of pre-training (no images in or out);
- ``generation``: drawing only — ``draw X 's favourite fruit`` / ``flower``, ``draw a portrait of X`` —
  mixed with replayed direct drawing of pre-training.

Before and after, on the new characters' items: understanding accuracy, forward and inverse
generation without and with CoT (:func:`uniprobe.experiments.sandbox.evaluate.evaluate_items`), plus what the
model still does on the original suite. For the understanding direction, the probe map (is the new
favourite fruit / flower linearly readable at the generation positions, with a readout trained on
the pre-trained characters?) and the patching map (does writing the understanding run's states
into the drawing run move the drawing?) — see :mod:`uniprobe.experiments.seeds.knowledge_maps`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniprobe.experiments.sandbox.evaluate import evaluate_items, gap_table, summarize
from uniprobe.experiments.sandbox.train import fit, replay_data
from uniprobe.experiments.seeds.results import InjectResult
from uniprobe.experiments.tasks import generators as gen
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Item, Prompt
from uniprobe.experiments.tasks.suite import (
    INVERSE_ATTRS,
    Suite,
    TrainExample,
    attr_question,
    inverse_items,
    inverse_question,
    knowledge_items,
)
from uniprobe.experiments.tasks.vocab import NEW_NAMES

DIRECTIONS = ("understanding", "generation")


@dataclass
class InjectSettings:
    """Defaults sized for about a minute of fine-tuning per direction on 2 cores."""

    n_characters: int = len(NEW_NAMES)
    n_inverse_test: int = 24
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 15
    replay: float = 0.5  # share of each batch replayed from pre-training (keeps old skills)
    seed: int = 0
    patch_pairs: int = 4


@dataclass
class Injection:
    """The new characters, their test items, and the inverse pairs that may be taught."""

    characters: list[gen.Character]
    items: list[Item]
    inverse_train: list[tuple[str, str, str]]


def make_injection(suite: Suite, settings: InjectSettings) -> Injection:
    """``settings.n_characters`` new characters (attribute tuples unlike any existing one) and items:
    forward (fruit, flower, portrait) for each, inverse on held-out pairs."""
    if not 2 <= settings.n_characters <= len(NEW_NAMES):
        raise ValueError(f"n_characters must be in 2..{len(NEW_NAMES)} (the reserved names {NEW_NAMES})")
    rng = random.Random(settings.seed * 104729 + 17)
    chars = gen.make_characters(rng, settings.n_characters, NEW_NAMES, avoid=suite.portrait_held)
    by_name = {c.name: c for c in chars}
    pairs = [
        (a.name, b.name, attr)
        for a in chars
        for b in chars
        for attr in INVERSE_ATTRS
        if a.name != b.name and a.attrs[attr] != b.attrs[attr]
    ]
    rng.shuffle(pairs)
    k = min(settings.n_inverse_test, len(pairs) // 2)
    items = knowledge_items(chars, prefix="new-") + inverse_items(pairs[:k], by_name, rng, prefix="new-")
    return Injection(chars, items, pairs[k:])


def _replay(suite: Suite, arch: str, seed: int, drawing: bool, recipe: dict | None) -> Iterator[TrainExample]:
    """Pre-training examples: text-only QA (no image in the prompt or context) or direct drawing, from
    the model's own mix (``recipe``: its ``training.json``; :func:`replay_data`)."""
    data = {**replay_data(arch, recipe), "gen_fraction": 1.0 if drawing else 0.0}
    for ex in suite.training_examples(seed + 1000, **data):
        if drawing or not (ex.prompt.images or any(p.images for p, _ in ex.prefix)):
            yield ex


def understanding_stream(
    suite: Suite, inj: Injection, arch: str, settings: InjectSettings, recipe: dict | None = None
) -> Iterator:
    """Text QA on the new characters (attributes, descriptions, inverse training pairs) + replay of the
    model's mix (``recipe``: its ``training.json``, None: ``DEFAULTS[arch]``'s)."""
    rng = random.Random(settings.seed + 1)
    replay = _replay(suite, arch, settings.seed, drawing=False, recipe=recipe)
    by_name = {c.name: c for c in inj.characters}
    while True:
        if rng.random() < settings.replay:
            yield next(replay)
            continue
        r = rng.random()
        c = rng.choice(inj.characters)
        if r < 0.6:
            attr = rng.choice(world.ATTRIBUTES)
            yield TrainExample(Prompt(attr_question(c.name, attr)), answer=c.attrs[attr])
        elif r < 0.8:
            yield TrainExample(Prompt(f"describe {c.name} ?"), answer=c.describe())
        else:
            a, b, attr = rng.choice(inj.inverse_train)
            one = by_name[a] if rng.random() < 0.5 else by_name[b]
            yield TrainExample(Prompt(inverse_question(a, b, attr, one.attrs[attr])), answer=one.name)


def generation_stream(
    suite: Suite, inj: Injection, arch: str, settings: InjectSettings, recipe: dict | None = None
) -> Iterator:
    """Drawing on the new characters (favourite fruit / flower, portrait) + replayed direct drawing
    (``recipe`` as in :func:`understanding_stream`)."""
    rng = random.Random(settings.seed + 2)
    replay = _replay(suite, arch, settings.seed, drawing=True, recipe=recipe)
    while True:
        if rng.random() < settings.replay:
            yield next(replay)
            continue
        c = rng.choice(inj.characters)
        if rng.random() < 0.6:
            attr = rng.choice(INVERSE_ATTRS)
            grid = world.count_grid(1, world.TILE_ID[c.attrs[attr]])
            yield TrainExample(Prompt(f"draw {c.name} 's favourite {attr}"), target=tuple(world.encode(grid)))
        else:
            grid = world.portrait_grid(c.attrs)
            yield TrainExample(Prompt(f"draw a portrait of {c.name}"), target=tuple(world.encode(grid)))


def measure(model: Any, inj: Injection, suite: Suite, progress: bool = True) -> dict:
    """Accuracies on the new characters' items (per kind and per row) and on the original suite
    (understanding of the pre-trained characters' facts and of direct items, direct drawing)."""
    results = evaluate_items(model, inj.items, cot=True, progress=progress, desc="inject: new facts")
    rows = gap_table(model, results=results)
    old = [it for it in suite.items if it.category in ("direct", "knowledge_forward")]
    old_res = evaluate_items(model, old, cot=False, progress=progress, desc="inject: original suite")

    def acc(category: str, metric: str) -> float:
        rows = [r for r in old_res if r["category"] == category]
        return sum(r[metric] for r in rows) / len(rows)

    return {
        "summary": {s["kind"]: s for s in summarize(rows)},
        "rows": rows,
        # what the model still does on the original suite: its taught facts, reading and direct drawing
        "original": {
            "knowledge_understanding": acc("knowledge_forward", "understanding"),
            "direct_understanding": acc("direct", "understanding"),
            "direct_generation": acc("direct", "generation"),
        },
    }


def run_inject(
    model: Any,
    out: str | Path,
    settings: InjectSettings | None = None,
    suite: Suite | None = None,
    progress: bool = True,
    maps: bool = True,
) -> InjectResult:
    """The whole protocol on ``model`` (left unchanged: each direction fine-tunes a copy).

    Writes ``out``: ``inject.json``, ``inject.md``, ``inject-accuracy.png``, and with ``maps`` the probe and
    patching maps before/after understanding-only injection (``probe-{before,after}.png``, ``patch-*.png``).
    """
    from uniprobe.experiments.seeds.inject_report import format_inject, plot_accuracy
    from uniprobe.experiments.seeds.knowledge_maps import knowledge_patch_map, knowledge_probe_map

    settings = settings or InjectSettings()
    suite = suite or Suite(0)  # the suite the shipped checkpoints were trained on
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = model.arch
    inj = make_injection(suite, settings)
    result = InjectResult(
        model_arch=arch,
        settings=asdict(settings),
        characters=[{"name": c.name, **c.attrs} for c in inj.characters],
        before=measure(model, inj, suite, progress),
    )
    models = {"before": model}
    streams = {"understanding": understanding_stream, "generation": generation_stream}
    for direction in DIRECTIONS:
        tuned = copy.deepcopy(model)
        log = fit(
            tuned, streams[direction](suite, inj, arch, settings, getattr(model, "training_recipe", None)),
            settings.steps, settings.lr,
            settings.batch_size, warmup=settings.warmup, progress=progress, desc=f"inject ({direction})",
        )  # fmt: skip
        result[direction] = {"after": measure(tuned, inj, suite, progress), "final_loss": log[-1]["loss"]}
        models[direction] = tuned
    if maps:
        result["maps"] = {}
        for when, m in (("before", models["before"]), ("after", models["understanding"])):
            result["maps"][when] = {
                "probe": knowledge_probe_map(m, suite, inj.items, out, tag=when),
                "patch": knowledge_patch_map(m, inj.items, out, tag=when, n_pairs=settings.patch_pairs),
            }
    plot_accuracy(result, out / "inject-accuracy.png")
    result["markdown"] = format_inject(result)
    result.save(out)  # inject.json, inject.md
    return result
