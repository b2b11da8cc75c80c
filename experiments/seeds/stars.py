"""STARS self-training (UniSandbox) on the sandbox: CoT drawings, self-judged, distilled into direct drawing.

1. The model draws reasoning prompts of the *training* split (``draw as many X as E``, expressions
   never in the test set) with CoT: it answers ``what is E ?`` in the stream, then draws.
2. Its own understanding judges each drawing: ``how many X in <image> ?`` on its image must equal its
   CoT answer. Only those samples are kept (the exact judge scores the filter, for the record).
3. Generation is fine-tuned on (prompt *without* CoT → kept image), with replay of pre-training data.

Reported per level on the test arithmetic items: drawing accuracy without CoT before vs after (the
claim), with CoT and understanding (should not drop). Where the change sits: the arithmetic probe and
patching maps before vs after (:mod:`uniprobe.experiments.demo_sections`), and the per-layer relative weight
change of attention and MLP.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from uniprobe.experiments.progress import bar, chunks
from uniprobe.experiments.sandbox.evaluate import evaluate_items
from uniprobe.experiments.sandbox.train import fit, replay_data
from uniprobe.experiments.seeds.results import StarsResult
from uniprobe.experiments.tasks import generators as gen
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Item, Prompt
from uniprobe.experiments.tasks.suite import Suite, TrainExample

LEVELS = (1, 2, 3)


@dataclass
class StarsSettings:
    """Defaults sized for a couple of minutes on 2 cores."""

    prompts_per_level: int = 64
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 15
    replay: float = 0.5
    seed: int = 0
    maps: bool = True


def self_training_prompts(suite: Suite, settings: StarsSettings) -> list[Item]:
    """Reasoning prompts from the training split of expressions (never a test expression), as items
    carrying a CoT plan and an exact criterion."""
    rng = random.Random(settings.seed * 31 + 5)
    tiles = gen.countable_tiles()
    items = []
    for level in LEVELS:
        exprs = rng.sample(
            suite.arith_train[level], min(settings.prompts_per_level, len(suite.arith_train[level]))
        )
        for i, (expr, v) in enumerate(exprs):
            tile = rng.choice(tiles)
            obj = gen.tile_phrase(tile)
            items.append(
                Item(
                    id=f"stars-L{level}-{i:03d}", category="arithmetic", task="arith", level=level,
                    question=f"what is {expr} ?", answer=str(v), gen_prompt=f"draw as many {obj} as {expr}",
                    target=tuple(world.encode(world.count_grid(v, world.TILE_ID[tile]))),
                    criterion={"type": "count", "tile": tile, "n": v},
                    cot_questions=(f"what is {expr} ?",), cot_draw=f"draw {{0}} {obj}",
                    labels={"answer": str(v), "entity": tile, "template": "arith", "expr": expr},
                )
            )  # fmt: skip
    return items


def self_judge(model: Any, items: list[Item], progress: bool = True) -> tuple[list[TrainExample], dict]:
    """Draw with CoT, keep what the model's own understanding accepts.

    Returns the kept (prompt without CoT → drawing) examples and filter statistics: per level, how many
    were drawn, how many CoT answers were right, how many drawings were kept, right by the exact judge,
    and right among the kept (the filter's precision).
    """
    grids: list = []
    answers: list[str] = []
    counts: list[str] = []
    # in the model's own 64-prompt chunks (greedy decoding: same results), so the bar can count prompts
    with bar(total=3 * len(items), desc="STARS self-judge", unit="prompt", progress=progress) as pbar:
        for span in chunks(len(items), 64):
            part = [items[k] for k in span]
            drawn = model.generate_image([it.draw_prompt for it in part], cot=True)
            grids += drawn
            pbar.update(len(part))
            answers += [a.strip() for a in model.understand([it.und_prompt for it in part])]
            pbar.update(len(part))
            questions = [_count_question(it, g) for it, g in zip(part, drawn, strict=True)]
            counts += [c.strip() for c in model.understand(questions)]
            pbar.update(len(part))
    kept = []
    stats = defaultdict(lambda: {"drawn": 0, "answer_right": 0, "kept": 0, "right": 0, "kept_right": 0})
    for it, g, a, c in zip(items, grids, answers, counts, strict=True):
        right = world.satisfies(g, it.criterion)
        s = stats[it.level]
        s["drawn"] += 1
        s["answer_right"] += a == it.answer
        s["right"] += right
        if a.isdigit() and c == a:
            s["kept"] += 1
            s["kept_right"] += right
            kept.append(TrainExample(Prompt(it.gen_prompt), target=tuple(world.encode(g))))
    return kept, {str(k): v for k, v in sorted(stats.items())}


def _count_question(it: Item, grid: Any) -> Prompt:
    """``how many X in <image> ?`` about the model's own drawing ``grid`` (``int64 [H, W]``)."""
    phrase = gen.tile_phrase(it.labels["entity"])
    return Prompt(f"how many {phrase} in <image> ?", (tuple(world.encode(grid)),))


def per_level(
    model: Any, items: list[Item], progress: bool = True, desc: str = "evaluate"
) -> dict[str, dict]:
    """Accuracy per level: understanding, drawing without and with CoT."""
    res = evaluate_items(model, items, cot=True, progress=progress, desc=desc)
    out: dict[str, dict] = {}
    for level in LEVELS:
        rows = [r for r in res if r["level"] == level]
        out[str(level)] = {
            "n": len(rows),
            **{
                m: sum(r[m] for r in rows) / len(rows)
                for m in ("understanding", "generation", "generation_cot")
            },
        }
    return out


@torch.no_grad()
def weight_change(before: torch.nn.Module, after: torch.nn.Module) -> list[dict]:
    """Per backbone layer: relative Frobenius change ``||W' - W|| / ||W||`` of attention and MLP weights,
    plus one row per other top-level part (embeddings, heads, connector, decoder)."""
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    parts: dict[tuple, list[str]] = defaultdict(list)
    for name in b:
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            kind = "attention" if ".self_attn." in name else "mlp" if ".mlp." in name else "norm"
            parts[(layer, kind)].append(name)
        else:
            parts[(None, name.rsplit(".", 1)[0])].append(name)
    rows = []
    for (layer, kind), names in parts.items():
        num = sum(float((a[n] - b[n]).pow(2).sum()) for n in names) ** 0.5
        den = sum(float(b[n].pow(2).sum()) for n in names) ** 0.5
        rows.append({"layer": layer, "part": kind, "relative_change": num / max(den, 1e-12)})
    return sorted(rows, key=lambda r: (r["layer"] is None, r["layer"] or 0, r["part"]))


def run_stars(
    model: Any,
    out: str | Path,
    settings: StarsSettings | None = None,
    suite: Suite | None = None,
    progress: bool = True,
) -> StarsResult:
    """The whole protocol on a copy of ``model`` (returned as ``result["model"]``); writes ``stars.json``,
    ``stars.md`` and figures in ``out``."""
    from uniprobe.experiments.seeds.stars_report import format_stars, plot_stars

    settings = settings or StarsSettings()
    suite = suite or Suite(0)  # the suite the shipped checkpoints were trained on
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test = [it for it in suite.items if it.category == "arithmetic"]
    prompts = self_training_prompts(suite, settings)
    kept, filt = self_judge(model, prompts, progress=progress)
    if not kept:
        raise RuntimeError(
            "STARS kept no sample: the model's own judge accepted none of its CoT drawings. "
            "Is the checkpoint trained (uniprobe gap shows understanding and CoT accuracy)?"
        )
    result = StarsResult(model_arch=model.arch, settings=asdict(settings), filter=filt)
    result["before"] = per_level(model, test, progress, desc="STARS test, before")
    tuned = copy.deepcopy(model)
    rng = random.Random(settings.seed + 3)
    replay = suite.training_examples(
        settings.seed + 2000, **replay_data(model.arch, getattr(model, "training_recipe", None))
    )

    def stream():
        while True:
            yield next(replay) if rng.random() < settings.replay else rng.choice(kept)

    log = fit(
        tuned, stream(), settings.steps, settings.lr, settings.batch_size, warmup=settings.warmup,
        progress=progress, desc="STARS fine-tune",
    )  # fmt: skip
    result["final_loss"] = log[-1]["loss"]
    result["after"] = per_level(tuned, test, progress, desc="STARS test, after")
    result["weight_change"] = weight_change(model, tuned)
    if settings.maps:
        from uniprobe.experiments.demo_sections import capture_stores, run_patching, run_probes

        result["maps"] = {}
        for when, m in (("before", model), ("after", tuned)):
            d = out / when
            d.mkdir(exist_ok=True)
            stores = capture_stores(m, test, d, m.arch)
            result["maps"][when] = {
                "probe": run_probes(stores, m.arch, d),
                "patch": run_patching(m, suite.items, m.arch, d),
            }
    plot_stars(result, out / "stars.png")
    result["markdown"] = format_stars(result)
    result.save(out)  # stars.json, stars.md
    result["model"] = tuned
    return result
