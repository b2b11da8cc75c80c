"""Ranks capture contiguous slices of a run's batches into part stores; rank 0 merges them into one.

Rank ``r`` of ``w`` captures batches ``batch_slice(n_batches, r, w)`` (batches of the same size as a
single process makes, so every batch, its padding and its activations are the same) into
``store.parts/rank{r}-of{w}``. :func:`merge_parts` writes the parts' shards in rank order as shards
``0, 1, ...`` of one store, renumbering the global example indices. The merged store is resumable
like any capture: shards it already holds are skipped.

``store.parts`` carries a marker file (``PARTS.json``) from :func:`make_parts_dir`;
:func:`remove_parts` deletes only a folder with that marker, and in it only the part stores.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import INDEX_COLUMNS, ActivationStore, atomic_write_text
from uniprobe.hooks.store.format import FLOAT_COLUMNS, GENERATED_KEY

EXAMPLE_KEYS = ("id", "labels", "meta", "layout")
PARTS_MARKER = "PARTS.json"
PARTS_FORMAT = "uniprobe-sweep-parts"
PART_NAME = re.compile(r"rank\d+-of\d+")  # what part_path names a rank's store


def batch_slice(n_batches: int, rank: int, world: int) -> range:
    """The contiguous batches of ``rank``: sizes differ by at most one, earlier ranks take the extra."""
    base, extra = divmod(n_batches, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def parts_dir(store: Path) -> Path:
    return store.parent / f"{store.name}.parts"


def make_parts_dir(store: Path) -> Path:
    """Create ``store``'s parts folder with its marker (every rank may call it; it is idempotent)."""
    folder = parts_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / PARTS_MARKER
    if not marker.exists():
        atomic_write_text(marker, json.dumps({"format": PARTS_FORMAT, "store": store.name}) + "\n")
    return folder


def part_path(store: Path, rank: int, world: int) -> Path:
    """Where ``rank`` of ``world`` captures its slice of ``store``."""
    return parts_dir(store) / f"rank{rank}-of{world}"


def merge_parts(parts: list[Path], out: Path, identity: dict | None = None) -> ActivationStore:
    """Merge complete part stores (in order) into one store at ``out``; returns it opened.

    ``identity``: the capture identity of the whole capture
    (``uniprobe.hooks.store.identity.capture_identity`` over every example), recorded in the merged store
    as a single process would. Each part's shards are checked (sha256) before they are copied. Raises
    ``ValueError`` when a part is incomplete, or was captured with another model, other points or other
    settings than the first.
    """
    opened = []
    for p in parts:
        store = ActivationStore.open(p, verify="full")
        if not store.complete:
            raise ValueError(f"cannot merge {p}: its capture is unfinished (the rank stopped early?)")
        if store.manifest["roles"] != list(ROLES):
            raise ValueError(f"cannot merge {p}: its roles {store.manifest['roles']} are not {list(ROLES)}")
        opened.append(store)
    if not opened:
        raise ValueError("no part stores to merge")
    first = opened[0]
    for store in opened[1:]:
        if store.model != first.model or store.points != first.points:
            raise ValueError(f"cannot merge {store.path} with {first.path}: model or points differ")
        if _settings(store) != _settings(first):
            raise ValueError(f"cannot merge {store.path} with {first.path}: capture settings differ")
    merged = ActivationStore.create(
        out, model=first.model, points=first.points, attrs=first.attrs, resume=True, identity=identity
    )
    index = 0
    for store in opened:
        for record in sorted(store.manifest["shards"], key=lambda r: r["index"]):
            if not merged.has_shard(index):
                lo, hi = record["examples"]
                rows, latents = _shard_rows(store.path / record["file"], store.points, lo)
                examples = [{k: ex[k] for k in EXAMPLE_KEYS} for ex in store.examples[lo:hi]]
                merged.write_shard(index, rows, examples, latents)
            index += 1
    merged.finalize()
    return ActivationStore.open(out)


def _settings(store: ActivationStore) -> dict:
    """A part's capture identity without its prompts digest (each part holds other prompts)."""
    identity = store.manifest.get("identity") or {}
    return {k: v for k, v in identity.items() if k != "prompts"}


def _shard_rows(file: Path, points: list[str], first: int) -> tuple[dict[str, Rows], Any]:
    """Every point's rows of one shard file, with batch-local example indices (and timesteps, where the
    shard has them), and its generated latents ``[n, *latent]`` or None."""
    out = {}
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        for p in points:
            cols = {c: f.get_tensor(f"{p}/{c}") for c in INDEX_COLUMNS}
            cols.update({c: f.get_tensor(f"{p}/{c}") for c in FLOAT_COLUMNS if f"{p}/{c}" in keys})
            cols["example"] = cols["example"] - first
            out[p] = Rows(values=f.get_tensor(f"{p}/values"), **cols)
        latents = f.get_tensor(GENERATED_KEY) if GENERATED_KEY in keys else None
    return out, latents


def remove_parts(store: Path) -> bool:
    """Delete the part stores of ``store`` (after the merged store is complete); returns whether the
    parts folder is gone. A folder without the marker of :func:`make_parts_dir` is left as it is, and
    in a marked one only the ``rank{r}-of{w}`` stores, the marker and then the folder (if empty) go."""
    folder = parts_dir(store)
    if folder.is_symlink() or not _marked(folder):
        return False
    for path in folder.iterdir():
        if PART_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    (folder / PARTS_MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: anything else in it is not the sweep's
    return not folder.exists()


def _marked(folder: Path) -> bool:
    try:
        return json.loads((folder / PARTS_MARKER).read_text(encoding="utf-8")).get("format") == PARTS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
