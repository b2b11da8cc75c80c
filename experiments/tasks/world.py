"""The tile-grid image world: tiles, grids, the image tokenizer, rendering and the exact judge.

An image is a ``GRID x GRID`` array of tile ids (``int64 [H, W]``). A tile is empty, a countable
object (kind x colour), a fruit, a flower, or one of the portrait attribute tiles. The tile codebook
*is* the image tokenizer: ``encode`` reads the grid row-major into tile codes, ``decode`` inverts it
exactly.

A portrait of a character is drawn in fixed cells, one per attribute (:data:`PORTRAIT_CELLS`):
cell 0 gender, 1 age group, 2 hair colour, 3 skin, 4 favourite fruit, 5 favourite flower; the rest
empty. Objects asked for by a count ("draw 3 red cups") fill cells in row-major order from cell 0.

The judge is plain code: :func:`describe` reads a grid into counts and portrait attributes and
:func:`satisfies` checks a grid against an item's criterion.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

GRID = 3
N_CELLS = GRID * GRID

COUNT_KINDS: tuple[str, ...] = ("apple", "cup", "star", "ball")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
FRUITS: tuple[str, ...] = ("banana", "grapes", "cherry", "lemon", "pear", "plum")
FLOWERS: tuple[str, ...] = ("rose", "tulip", "daisy", "lily", "iris", "lotus")
GENDERS: tuple[str, ...] = ("male", "female")
AGES: tuple[str, ...] = ("child", "adult", "elder")
HAIRS: tuple[str, ...] = ("black", "blond", "brown", "grey")
SKINS: tuple[str, ...] = ("pale", "tan", "dark")

ATTRIBUTES: tuple[str, ...] = ("gender", "age", "hair", "skin", "fruit", "flower")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "gender": GENDERS,
    "age": AGES,
    "hair": HAIRS,
    "skin": SKINS,
    "fruit": FRUITS,
    "flower": FLOWERS,
}
PORTRAIT_CELLS: dict[str, int] = {attr: i for i, attr in enumerate(ATTRIBUTES)}
MAX_COUNT = 5


def _tile_names() -> tuple[str, ...]:
    names = ["empty"]
    names += [f"{colour}_{kind}" for kind in COUNT_KINDS for colour in COLOURS]
    names += list(FRUITS) + list(FLOWERS)
    for attr in ("gender", "age", "hair", "skin"):
        names += [f"{attr}_{v}" for v in ATTRIBUTE_VALUES[attr]]
    return tuple(names)


TILES: tuple[str, ...] = _tile_names()
TILE_ID: dict[str, int] = {name: i for i, name in enumerate(TILES)}
N_TILES = len(TILES)
EMPTY = 0


def object_tile(kind: str, colour: str) -> int:
    """Tile id of a countable object, e.g. ``object_tile("cup", "red")``."""
    name = f"{colour}_{kind}"
    if name not in TILE_ID:
        raise ValueError(f"no object tile {name!r}; kinds are {COUNT_KINDS}, colours {COLOURS}")
    return TILE_ID[name]


def attribute_tile(attr: str, value: str) -> int:
    """Tile id that shows one portrait attribute (fruit and flower tiles are the plain fruit/flower)."""
    if attr not in ATTRIBUTE_VALUES or value not in ATTRIBUTE_VALUES[attr]:
        raise ValueError(f"no tile for {attr}={value!r}; valid: {ATTRIBUTE_VALUES.get(attr, ATTRIBUTES)}")
    return TILE_ID[value] if attr in ("fruit", "flower") else TILE_ID[f"{attr}_{value}"]


# -- grids ----------------------------------------------------------------------------------
def empty_grid() -> np.ndarray:
    """An all-empty grid, ``int64 [GRID, GRID]``."""
    return np.zeros((GRID, GRID), dtype=np.int64)


def count_grid(n: int, tile: int) -> np.ndarray:
    """``n`` copies of ``tile`` in row-major cells from cell 0; ``int64 [GRID, GRID]``."""
    if not 0 <= n <= N_CELLS:
        raise ValueError(f"count {n} does not fit a {GRID}x{GRID} grid (0..{N_CELLS})")
    flat = np.zeros(N_CELLS, dtype=np.int64)
    flat[:n] = tile
    return flat.reshape(GRID, GRID)


def portrait_grid(attrs: dict[str, str]) -> np.ndarray:
    """The portrait showing ``attrs`` (all six attributes); ``int64 [GRID, GRID]``."""
    missing = [a for a in ATTRIBUTES if a not in attrs]
    if missing:
        raise ValueError(f"portrait needs all attributes; missing {missing}")
    flat = np.zeros(N_CELLS, dtype=np.int64)
    for attr, cell in PORTRAIT_CELLS.items():
        flat[cell] = attribute_tile(attr, attrs[attr])
    return flat.reshape(GRID, GRID)


def encode(grid: np.ndarray) -> list[int]:
    """Grid ``[GRID, GRID]`` → ``N_CELLS`` tile codes, row-major."""
    arr = np.asarray(grid)
    if arr.shape != (GRID, GRID):
        raise ValueError(f"grid must have shape ({GRID}, {GRID}), got {arr.shape}")
    if arr.min() < 0 or arr.max() >= N_TILES:
        raise ValueError(f"tile ids must be in 0..{N_TILES - 1}")
    return [int(t) for t in arr.reshape(-1)]


def decode(tokens: Sequence[int]) -> np.ndarray:
    """``N_CELLS`` tile codes → grid ``int64 [GRID, GRID]`` (exact inverse of :func:`encode`)."""
    if len(tokens) != N_CELLS:
        raise ValueError(f"need {N_CELLS} tile codes for a {GRID}x{GRID} grid, got {len(tokens)}")
    arr = np.asarray(list(tokens), dtype=np.int64)
    if arr.min() < 0 or arr.max() >= N_TILES:
        raise ValueError(f"tile codes must be in 0..{N_TILES - 1}, got {arr.min()}..{arr.max()}")
    return arr.reshape(GRID, GRID)


# -- the judge ------------------------------------------------------------------------------
def describe(grid: np.ndarray) -> dict:
    """Read a grid: ``{"counts": {tile name: n}, "n_objects": int, "portrait": {attr: value|None}}``.

    ``portrait`` reads the fixed portrait cells; an attribute is ``None`` when its cell does not
    hold a tile of that attribute.
    """
    flat = np.asarray(grid).reshape(-1)
    counts = Counter(TILES[int(t)] for t in flat if t != EMPTY)
    portrait: dict[str, str | None] = {}
    for attr, cell in PORTRAIT_CELLS.items():
        name = TILES[int(flat[cell])]
        value = name if attr in ("fruit", "flower") else name.removeprefix(f"{attr}_")
        portrait[attr] = value if value in ATTRIBUTE_VALUES[attr] and name != "empty" else None
    return {"counts": dict(counts), "n_objects": int(sum(counts.values())), "portrait": portrait}


def satisfies(grid: np.ndarray, criterion: dict) -> bool:
    """Does ``grid`` meet an item's criterion?

    Criteria: ``{"type": "count", "tile": name, "n": int}`` — exactly ``n`` of that tile and nothing
    else; ``{"type": "portrait", "attrs": {...}}`` — the portrait cells show exactly these attributes
    and the other cells are empty.
    """
    d = describe(grid)
    if criterion["type"] == "count":
        return d["counts"] == ({criterion["tile"]: criterion["n"]} if criterion["n"] else {})
    if criterion["type"] == "portrait":
        flat = np.asarray(grid).reshape(-1)
        rest_empty = all(flat[i] == EMPTY for i in range(len(ATTRIBUTES), N_CELLS))
        return rest_empty and d["portrait"] == dict(criterion["attrs"])
    raise ValueError(f"unknown criterion type {criterion['type']!r}; expected 'count' or 'portrait'")


# -- rendering ------------------------------------------------------------------------------
_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 220),
    "yellow": (235, 200, 30),
}


def _mask(shape_id: int, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    r = np.hypot(yy - c, xx - c)
    shapes = [
        r < s * 0.38,  # disc
        (abs(yy - c) < s * 0.3) & (abs(xx - c) < s * 0.3),  # square
        (abs(yy - c) + abs(xx - c)) < s * 0.4,  # diamond
        (r < s * 0.4) & (r > s * 0.22),  # ring
        (abs(yy - c) < s * 0.1) | (abs(xx - c) < s * 0.1),  # cross
        (yy > s * 0.2) & (abs(xx - c) < (yy - s * 0.2) * 0.6),  # triangle
        ((yy // max(1, s // 4)) % 2 == 0) & (r < s * 0.42),  # striped disc
        (abs(yy - xx) < s * 0.15) | (abs(yy + xx - 2 * c) < s * 0.15),  # x
    ]
    return shapes[shape_id % len(shapes)]


def _tile_look(tile: int) -> tuple[int, tuple[int, int, int]]:
    name = TILES[tile]
    if "_" in name and name.split("_")[0] in _PALETTE:
        colour, kind = name.split("_")
        return COUNT_KINDS.index(kind), _PALETTE[colour]
    rng = np.random.default_rng(tile)  # fixed per tile: the same tile always looks the same
    return tile, tuple(int(v) for v in rng.integers(40, 230, size=3))


def render(grid: np.ndarray, scale: int = 16) -> np.ndarray:
    """Grid ``[GRID, GRID]`` → RGB image ``uint8 [GRID*scale, GRID*scale, 3]`` (white background)."""
    arr = np.asarray(grid)
    img = np.full((arr.shape[0] * scale, arr.shape[1] * scale, 3), 255, dtype=np.uint8)
    for (i, j), tile in np.ndenumerate(arr):
        if tile == EMPTY:
            continue
        shape_id, rgb = _tile_look(int(tile))
        cell = img[i * scale : (i + 1) * scale, j * scale : (j + 1) * scale]
        cell[_mask(shape_id, scale)] = rgb
        cell[[0, -1], :] = 200
        cell[:, [0, -1]] = 200
    return img
