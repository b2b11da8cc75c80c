"""Task generators: arithmetic, symbolic mapping, characters, counting images. Labels computed in code.

Every generator takes a ``random.Random`` so everything is deterministic by seed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from uniprobe.experiments.tasks import world
from uniprobe.experiments.tasks.vocab import NAMES, SYMBOLS

ANSWERS: tuple[int, ...] = tuple(range(1, world.MAX_COUNT + 1))
LEVEL_OPS: dict[int, tuple[str, ...]] = {1: ("+", "-", "*", "/"), 2: ("+", "-"), 3: ("+", "-")}
LEVEL_OPERANDS: dict[int, range] = {1: range(0, 10), 2: range(0, 10), 3: range(0, 6)}


def evaluate_expression(expr: str) -> float:
    """Value of a space-separated expression with Python precedence (``"2 + 3 * 1"`` → 5.0)."""
    tokens = expr.split()
    for t in tokens:
        if not (t.isdigit() or t in "+-*/"):
            raise ValueError(f"bad token {t!r} in expression {expr!r}")
    return float(eval(" ".join(tokens), {"__builtins__": {}}, {}))  # noqa: S307 - digits and + - * / only


def expressions(level: int, answers: tuple[int, ...] = ANSWERS) -> list[tuple[str, int]]:
    """All expressions with ``level`` operations whose value is in ``answers`` (the drawable counts
    :data:`ANSWERS` unless given, e.g. ``tuple(range(10))`` for every digit), sorted.

    Returns:
        ``[(expr, value)]``, e.g. ``("7 - 3", 4)``; division must be exact at every step.
    """
    out = []
    ops, operands = LEVEL_OPS[level], LEVEL_OPERANDS[level]
    for nums in itertools.product(operands, repeat=level + 1):
        for opseq in itertools.product(ops, repeat=level):
            if any(op == "/" and (b == 0 or a % b) for a, op, b in zip(nums, opseq, nums[1:], strict=False)):
                continue
            expr = " ".join(str(x) for pair in zip(nums, opseq + ("",), strict=True) for x in pair).strip()
            value = evaluate_expression(expr)
            if value.is_integer() and int(value) in answers:
                out.append((expr, int(value)))
    return sorted(out)


@dataclass(frozen=True)
class Mapping:
    """Symbol chains of ``hops`` statements each (two unless asked); the query is the last symbol of one
    chain. ``ends[i]`` and ``values[i]`` belong to chain ``i``."""

    statements: str
    ends: tuple[str, ...]
    values: tuple[int, ...]


def random_mapping(rng: random.Random, hops: int, chains: int = 2) -> Mapping:
    """``chains`` chains ``s1 = v , s2 = s1 , ...`` with different values, written one chain after the
    other. Two chains (the test items') draw exactly as they always have; more chains are distractors
    for training (``chains * hops`` symbols and ``chains`` values must exist)."""
    if chains < 2 or chains * hops > len(SYMBOLS) or chains > len(ANSWERS):
        raise ValueError(
            f"{chains} chains of {hops} hops need {chains * hops} of {len(SYMBOLS)} symbols and "
            f"{chains} of {len(ANSWERS)} values; use 2 to {min(len(SYMBOLS) // hops, len(ANSWERS))} chains"
        )
    syms = rng.sample(SYMBOLS, chains * hops)
    vals = rng.sample(ANSWERS, chains)
    parts = []
    ends = []
    for c, v in enumerate(vals):
        chain = syms[c * hops : (c + 1) * hops]
        parts.append(f"{chain[0]} = {v}")
        parts += [f"{b} = {a}" for a, b in zip(chain, chain[1:], strict=False)]
        ends.append(chain[-1])
    return Mapping(" , ".join(parts), tuple(ends), tuple(vals))


@dataclass(frozen=True)
class Character:
    name: str
    attrs: dict

    def describe(self) -> str:
        return " ".join(self.attrs[a] for a in world.ATTRIBUTES)


def make_characters(
    rng: random.Random, n: int = len(NAMES), names: tuple[str, ...] = NAMES, avoid: set[tuple] | None = None
) -> list[Character]:
    """``n`` fictional characters named ``names[:n]`` with random attributes (no two share all six,
    nor any attribute tuple in ``avoid``)."""
    chars: list[Character] = []
    seen = set(avoid or ())
    for name in names[:n]:
        while True:
            attrs = {a: rng.choice(world.ATTRIBUTE_VALUES[a]) for a in world.ATTRIBUTES}
            key = tuple(attrs.values())
            if key not in seen:
                seen.add(key)
                break
        chars.append(Character(name, attrs))
    return chars


def countable_tiles() -> list[str]:
    """Tile names that counting prompts and questions use (objects, fruits, flowers)."""
    return [t for t in world.TILES[1:] if t.split("_")[0] not in ("gender", "age", "hair", "skin")]


def tile_phrase(tile: str) -> str:
    """Words naming a countable tile: ``"red_cup"`` → ``"red cup"``, ``"grapes"`` → ``"grapes"``."""
    return tile.replace("_", " ")


def counting_image(rng: random.Random, tile: str, n: int) -> tuple[int, ...]:
    """A random grid with exactly ``n`` of ``tile`` at random cells and random other tiles or empty."""
    others = [t for t in countable_tiles() if t != tile]
    cells = list(range(world.N_CELLS))
    rng.shuffle(cells)
    flat = [world.EMPTY] * world.N_CELLS
    for c in cells[:n]:
        flat[c] = world.TILE_ID[tile]
    for c in cells[n:]:
        if rng.random() < 0.5:
            flat[c] = world.TILE_ID[rng.choice(others)]
    return tuple(flat)


def random_attrs(rng: random.Random) -> dict:
    return {a: rng.choice(world.ATTRIBUTE_VALUES[a]) for a in world.ATTRIBUTES}
