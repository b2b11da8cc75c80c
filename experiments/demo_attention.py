"""The demo's "How does the answer travel?" section: attention from the drawing to the answer.

For a few level-2 arithmetic items the model understands ("what is E ?" answered right), on one sandbox
model (AR: the drawing positions ``image_gen`` plus ``<boi>``, which predicts the first tile; query /
MoT: the generation role, ``query`` or ``image_gen``):

- **mass**: in the CoT run, the attention mass the drawing positions put on the CoT answer tokens
  (role ``cot``: ``a <eos>``), per layer × head (:func:`~uniprobe.probes.attention.mass_table`);
- **CoT knockout**: the drawing → key-group edges removed at one layer, and at every layer at once
  (:func:`~uniprobe.probes.attention.knockout_sweep`): the CoT answer tokens, and the answer as the
  drawing prompt restates it (``draw a ENTITY <boi>``);
- **no-CoT knockout**: the same on the run without CoT, keys = the expression words, or the whole prompt;
- **steering**: at ``<boi>`` (AR) or the generation positions (query, MoT), add ``alpha ×`` the
  understanding run's answer direction (mean ``<answer>`` state of the understanding runs whose answer
  is ``a``, minus the mean over every arithmetic item; per layer, ``resid_pre``) — the
  :func:`~uniprobe.probes.attention.steer_sweep` over layers × alphas, then the best configuration's
  real drawings judged exactly.

The CoT run is teacher-forced: ``<bos> what is E ? <answer> | a <eos> (cot) | draw a ENTITY <boi> |
drawing`` with the right answer ``a`` (every chosen item is understood right, so it is the model's own
CoT). Metric everywhere: mean log p of the tiles of the right drawing (teacher-forced, judge-free; the
patching section's), per example, then the mean over items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from uniprobe.experiments.demo_sections import GEN_ROLE
from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.prompts import Item, Prompt
from uniprobe.hooks.adapters import adapter_for

ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # the first must be 0: the plain run
METRIC = "mean log p of the right drawing's tiles"


# -- the runs -----------------------------------------------------------------------------------
def cot_inputs(model: Any, items: list[Item]) -> Any:
    """The teacher-forced CoT streams of ``items`` as ModelInputs with their roles."""
    from uniprobe.experiments.sandbox.adapter import batch_to_inputs
    from uniprobe.experiments.sandbox.sequences import Segment, prompt_segments, qa_segments

    tok, streams = model.tokenizer, []
    for it in items:
        if len(it.cot_questions) != 1:
            raise ValueError(
                f"item {it.id} has {len(it.cot_questions)} CoT questions; this section needs one"
            )
        segs = model._bos() + qa_segments(tok, Prompt(it.cot_questions[0]), None)
        segs.append(Segment("cot", tok.encode(f"{it.answer} <eos>")))  # as generate_image(cot=True) writes
        segs += prompt_segments(tok, it.cot_draw.format(it.answer) + " <boi>")
        # AR: teacher-forced on the right tiles; query: its query tokens; MoT: empty latents (as it
        # starts a drawing; the right tiles there would hand the answer to the drawing)
        segs += model._draw_segments(list(it.target) if getattr(model, "arch", "") == "ar" else None)
        streams.append(segs)
    return batch_to_inputs(model._collate(streams))


def direct_inputs(model: Any, items: list[Item]) -> Any:
    """The runs without CoT (the drawing prompts; AR teacher-forced on the right tiles)."""
    examples = [{"prompt": it.draw_prompt, "target": list(it.target)} for it in items]
    return adapter_for(model).prepare(model, examples, "generation")


def drawing_metric(model: Any, it: Item) -> Any:
    """Mean log p of ``it``'s right tiles: AR from the positions that predict them, else per cell."""
    from uniprobe.probes.patching import GridLogProb, SequenceLogProb

    if getattr(model, "arch", "") == "ar":
        n = len(it.target)
        return SequenceLogProb(it.target, logits_fn=lambda o, n=n: o.image_logits[:, -n - 1 : -1], mean=True)
    return GridLogProb(it.target)


class PerRow:
    """Example ``b``'s own metric on its rows: the sweeps run configuration ``c`` × example ``b`` as row
    ``c·B + b`` (:mod:`~uniprobe.probes.patching.engine`), and every item has its own right drawing.
    Hand-written: the library's metrics share one target across the batch."""

    def __init__(self, metrics: list[Any]) -> None:
        self.metrics, self.name = metrics, f"per_row({metrics[0].name})"

    def __call__(self, outputs: Any) -> torch.Tensor:
        values = torch.stack([m(outputs) for m in self.metrics])  # [B, rows]
        rows = torch.arange(values.shape[1])
        return values[rows % len(self.metrics), rows]


def drawing_positions(inputs: Any, arch: str) -> list[int]:
    """Positions whose outputs make the drawing: the generation role (and ``<boi>`` for AR, which
    predicts the first tile)."""
    pos = inputs.layout.positions(0, GEN_ROLE[arch])
    return ([pos[0] - 1] if arch == "ar" else []) + pos


def word_positions(model: Any, inputs: Any, words: list[str], after: int = 0) -> list[int]:
    """Positions of the first occurrence of the consecutive ``words`` at or after ``after``."""
    ids = inputs.kwargs["input_ids"][0].tolist()
    want = [model.tokenizer[w] for w in words]
    for i in range(after, len(ids) - len(want) + 1):
        if ids[i : i + len(want)] == want:
            return list(range(i, i + len(want)))
    raise ValueError(f"{' '.join(words)!r} not found in the prompt")


def _check_words(model: Any, inputs: Any, pos: int, words: list[str]) -> None:
    """Every row has the same roles and row ``b`` holds ``words[b]`` at ``pos`` (else positions shared
    across the batch would select different things)."""
    roles, ids = inputs.layout.roles, inputs.kwargs["input_ids"][:, pos].tolist()
    if not bool((roles == roles[:1]).all()) or ids != [model.tokenizer[w] for w in words]:
        raise ValueError(f"the streams do not line up at position {pos}: expected {words}")


def restated_position(model: Any, cot: Any, items: list[Item]) -> int:
    """The position of the answer as the CoT run's drawing prompt restates it (``draw a ENTITY <boi>``:
    two after the last ``cot`` token), checked to hold each item's answer in its row."""
    pos = cot.layout.positions(0, "cot")[-1] + 2
    _check_words(model, cot, pos, [it.answer for it in items])
    return pos


def uniform_share(inputs: Any, queries: list[int]) -> float:
    """The mass on the ``cot`` keys a query would give by attending evenly to every earlier key (row 0;
    no padding): the mean over ``queries`` of ``#cot keys ≤ q / (q + 1)``."""
    cot = inputs.layout.mask("cot")[0]
    return float(np.mean([float(cot[: q + 1].sum()) / (q + 1) for q in queries]))


def understood_items(model: Any, items: list[Item], n: int) -> list[Item]:
    """The first ``n`` level-2 arithmetic items the model answers right (its understanding) whose drawing
    prompts have as many words as the first one's, so that every stream has the same positions."""
    pool = [it for it in items if it.category == "arithmetic" and it.level == 2]
    answers = model.understand([it.und_prompt for it in pool])
    right = [it for it, a in zip(pool, answers, strict=True) if a.strip() == it.answer]
    if not right:
        raise ValueError("the model answers no level-2 arithmetic item right: nothing to trace")
    words = len(right[0].gen_prompt.split())
    return [it for it in right if len(it.gen_prompt.split()) == words][:n]


# -- the analyses ---------------------------------------------------------------------------------
def _knock(model: Any, inputs: Any, query: list[int], groups: dict[str, list], metric: Any) -> dict:
    """Each key group knocked out at each layer and at every layer → ``{group: [per layer..., all]}``."""
    from uniprobe.probes.attention import Knockout, knockout_sweep

    n_layers = adapter_for(model).n_layers(model)
    kos = []
    for name, keys in groups.items():
        how = {"key_roles": keys} if isinstance(keys[0], str) else {"key_positions": keys}
        for layers in [(i,) for i in range(n_layers)] + [tuple(range(n_layers))]:
            kos.append(Knockout(layers, query_positions=query, label=name, **how))
    res = knockout_sweep(model, inputs, kos, metric)
    values = res.values.view(len(groups), n_layers + 1)
    return {"clean": res.clean, **{g: values[k].tolist() for k, g in enumerate(groups)}}


def answer_directions(model: Any, items: list[Item], points: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{answer: {point: [d]}}``: mean understanding-run state at ``<answer>`` (the last position) of the
    arithmetic items with that answer, minus the mean over every arithmetic item."""
    from uniprobe.probes.patching.engine import collect_states

    adapter = adapter_for(model)
    arith = [it for it in items if it.category == "arithmetic"]
    inputs = adapter.prepare(model, [{"prompt": it.und_prompt} for it in arith])
    _, states = collect_states(model, adapter, inputs, points)
    labels = np.array([it.answer for it in arith])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for a in sorted(set(labels)):
        rows = torch.as_tensor(labels == a)
        out[a] = {p: states[p][rows, -1].float().mean(0) - states[p][:, -1].float().mean(0) for p in points}
    return out


def _drawn_right(model: Any, chosen: list[Item], steers: list) -> int:
    """How many of ``chosen`` the model draws right (greedy, judged exactly) under ``steers``."""
    from uniprobe.probes.attention import steered_generation

    adapter = adapter_for(model)
    inputs = adapter.prepare(model, [{"prompt": it.draw_prompt} for it in chosen], "generation")
    # the sandbox re-runs the whole stream per tile (no cache): its own loop, positions stay absolute
    out = steered_generation(model, inputs, steers, generate=lambda m, i: adapter.generate(m, i))
    tiles = out[0] if isinstance(out, tuple) else out
    grids = [world.decode(t.tolist()) for t in tiles]
    return sum(bool(world.satisfies(g, it.criterion)) for g, it in zip(grids, chosen, strict=True))


def _steer(model: Any, arch: str, chosen: list[Item], directions: dict, points: list[str]) -> dict:
    """Steer each item's run without CoT toward its own answer: grid ``[layer, alpha]`` of the metric
    (mean over items), the best cell, and how many items are drawn right there and unsteered."""
    from uniprobe.probes.attention import Steer, steer_sweep

    grids, plain = [], []
    inputs = direct_inputs(model, chosen)
    where = {"positions": [drawing_positions(inputs, arch)[0]]} if arch == "ar" else {"role": GEN_ROLE[arch]}
    for it in chosen:  # one direction per answer: one sweep per item
        one = direct_inputs(model, [it])
        res = steer_sweep(
            model, one, directions[it.answer], ALPHAS, points, drawing_metric(model, it), **where
        )
        grids.append(res.values.numpy())
        plain.append(res.plain)
    grid = np.mean(grids, axis=0)  # [layer, alpha]
    # the best *steered* configuration (alpha > 0), even when it is worse than the plain run
    layer, a = np.unravel_index(np.argmax(grid[:, 1:]), grid[:, 1:].shape)
    a = int(a) + 1  # column 0 is alpha 0
    point = points[layer]  # the grid's rows are the steered points, not always every layer
    best = {
        "layer": int(point.split(".")[1]),
        "point": point,
        "alpha": ALPHAS[a],
        "metric": float(grid[layer, a]),
    }
    steers = [
        Steer(point, directions[it.answer][point], ALPHAS[a], rows=[k], **where)
        for k, it in enumerate(chosen)
    ]
    where_text = "<boi>" if arch == "ar" else f"the {GEN_ROLE[arch]} positions"
    return {"grid": grid.tolist(), "alphas": list(ALPHAS), "points": points, "plain": float(np.mean(plain)),
            "best": best, "drawn_plain": _drawn_right(model, chosen, []),
            "drawn_steered": _drawn_right(model, chosen, steers), "where": where_text}  # fmt: skip


def run_attention(model: Any, items: list[Item], arch: str, out: Path, n_items: int = 4) -> dict:
    """Every analysis of the section on ``n_items`` understood level-2 arithmetic items; writes
    ``attention-{arch}.json`` and the figures ``attn-mass-{arch}.png`` / ``attn-flow-{arch}.png``."""
    from uniprobe.experiments.demo_attention_plots import plot_attention
    from uniprobe.probes.attention import mass_table

    chosen = understood_items(model, items, n_items)
    role = GEN_ROLE[arch]
    n_layers = adapter_for(model).n_layers(model)
    metric = PerRow([drawing_metric(model, it) for it in chosen])
    cot = cot_inputs(model, chosen)
    mass = mass_table(model, cot, [role], ["cot"]).values
    restated = restated_position(model, cot, chosen)
    groups = {"CoT answer": ["cot"], "restated answer": [restated]}
    cot_ko = _knock(model, cot, drawing_positions(cot, arch), groups, metric)
    direct = direct_inputs(model, chosen)
    expr = word_positions(model, direct, chosen[0].labels["expr"].split())
    direct_ko = _knock(
        model, direct, drawing_positions(direct, arch), {"expression": expr, "whole prompt": ["text"]}, metric
    )
    points = [f"blocks.{i}.resid_pre" for i in range(n_layers)]
    directions = answer_directions(model, items, points)
    # a point where every understanding run holds the same state (layer 0: the <answer> embedding)
    # has no answer direction: steering there adds nothing
    points = [p for p in points if any(float(d[p].norm()) > 1e-6 for d in directions.values())]
    steer = _steer(model, arch, chosen, directions, points)
    result = {
        "items": [it.id for it in chosen],
        "metric": METRIC,
        "gen_role": role,
        "mass": mass.tolist(),  # [layer, head], mean over items
        "uniform_share": uniform_share(cot, cot.layout.positions(0, role)),  # the mass's queries
        "cot_knockout": cot_ko,
        "direct_knockout": direct_ko,
        "steer": steer,
    }
    (out / f"attention-{arch}.json").write_text(json.dumps(result, indent=1))
    plot_attention(result, out, arch)
    return result
