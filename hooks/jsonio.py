"""One JSON helper for every result file: the same conversions, atomic writes, readable errors.

    write_json(out / "r3.json", result.to_dict())    # tensors, numpy, Path, dataclasses → plain JSON
    data = read_json(out / "r3.json")                 # bad JSON → JsonFileError naming the file

:func:`plain` is the ``default=`` of ``json.dumps``: tensors and numpy arrays become lists (``tolist``),
numpy / torch scalars numbers (``item``), paths strings, dataclasses dicts, sets and frozensets sorted
lists. Anything else is an error unless a ``fallback`` (e.g. ``str``) is given — a result file that
silently holds ``"<object at 0x...>"`` is worse than a clear failure. Writes go through the store's
atomic writer: a reader sees the old file or the whole new one, never a part; a full disk raises the
store's disk-full error naming the file. No pickle, ever.

This module lives in ``hooks/`` (the lowest layer) so that probes and experiments can all use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniprobe.hooks.store.files import atomic_write_text


class JsonFileError(ValueError):
    """A JSON file that could not be parsed; the message names the file, line and column."""


def plain(obj: Any) -> Any:
    """The ``default=`` hook of ``json.dumps``: ``obj`` as plain JSON data, or a TypeError."""
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and numpy scalars
        return obj.tolist()
    if hasattr(obj, "item"):  # other 0-d scalars
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, *, indent: int | None = 1, fallback: Callable[[Any], Any] | None = None) -> str:
    """``obj`` as JSON text (no trailing newline), converting with :func:`plain`.

    Args:
        indent: as for ``json.dumps`` (``None``: one line).
        fallback: applied to objects :func:`plain` cannot convert (``str`` keeps the old
            lenient writers' behaviour); without it they raise TypeError.
    """
    if fallback is None:
        default = plain
    else:

        def default(o: Any) -> Any:
            try:
                return plain(o)
            except TypeError:
                return fallback(o)

    return json.dumps(obj, indent=indent, default=default)


def write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 1,
    fallback: Callable[[Any], Any] | None = None,
    what: str | None = None,
) -> Path:
    """Write ``obj`` as JSON (+ newline) to ``path`` atomically, creating its folder; returns ``path``."""
    path = Path(path)
    text = dumps(obj, indent=indent, fallback=fallback) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, what=what)
    return path


def to_plain(obj: Any, *, fallback: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` exactly as it reads back from its JSON file (tuples become lists, tensors lists)."""
    return json.loads(dumps(obj, indent=None, fallback=fallback))


def read_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file at ``path``.

    Raises:
        FileNotFoundError: no such file (the path is in the message).
        JsonFileError: the file is not valid JSON (truncated, edited by hand): names file, line, column.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonFileError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "was it truncated or edited by hand? Re-create it by running the step that wrote it."
        ) from None


def pack_rows(rows: list[dict]) -> dict:
    """Table rows compactly: ``{"columns": [...], "data": [[...], ...]}`` when every row has the same
    keys (the usual case), else ``{"rows": rows}``. :func:`unpack_rows` inverts it."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if all(len(r) == len(cols) for r in rows):
        return {"columns": cols, "data": [[r[c] for c in cols] for r in rows]}
    return {"rows": rows}


def unpack_rows(doc: dict) -> list[dict]:
    """The rows :func:`pack_rows` packed."""
    if "rows" in doc:
        return list(doc["rows"])
    return [dict(zip(doc["columns"], values, strict=True)) for values in doc["data"]]
