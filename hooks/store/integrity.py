"""Integrity checks of an activation store beyond the shards' sha256 (see :mod:`uniprobe.hooks.store`).

* **Manifest digest** — ``manifest["manifest_digest"]`` is the sha256 of every other manifest field
  (canonical JSON: sorted keys, no spaces). It covers what only the manifest carries (``attrs``,
  ``identity``, the ``roles`` list, shard records, ``complete``) and is checked at open, so an edit
  of ``manifest.json`` must also recompute the digest to pass.
* **Shard headers** — every shard's safetensors header repeats what the shard was written with:
  index, first global example, model, points, dtype, row counts, the roles list, the capture
  identity and its examples (``id``, ``labels``, ``meta``, ``layout``). :func:`header_problems`
  compares them with the manifest on the first read of each shard and in ``verify()``, so an edit
  that also recomputes the digest still has to rewrite the shards (and then their sha256 records).
* **Label types** — one label key holds values of one JSON type across a store: ``0`` and ``"0"``
  (or ``1`` and ``1.0``) would silently become two classes. :class:`LabelTypes` refuses the mix at
  write time with :class:`MixedLabelTypesError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from uniprobe.hooks.store_errors import MixedLabelTypesError

DIGEST_KEY = "manifest_digest"
EXAMPLE_KEYS = ("id", "labels", "meta", "layout")
_MAX_REPORTED = 8  # differences named in one error; the rest are counted


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 (hex) of the manifest's fields other than :data:`DIGEST_KEY`, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def header_problems(
    name: str, header: Mapping[str, Any], record: Mapping[str, Any], manifest: Mapping
) -> list[str]:
    """Where a shard's header (``name``) disagrees with the manifest's record and examples of it.

    Args:
        header: the shard's ``uniprobe.shard`` metadata (parsed JSON).
        record: the manifest's record of this shard (``index``, ``examples`` = ``[first, last + 1]``, ...).
        manifest: the whole manifest.

    Returns:
        One line per disagreement (at most a few, then a count), each naming the field, the
        manifest's value and the shard's.
    """
    out: list[str] = []

    def differ(field: str, in_manifest: Any, in_shard: Any) -> None:
        out.append(f"{field} is {_short(in_manifest)} in the manifest but {_short(in_shard)} in {name}")

    first, last = record["examples"]
    pairs = [
        ("index", record["index"], header.get("index")),
        ("first example", first, header.get("first")),
        ("model", manifest["model"], header.get("model")),
        ("points", manifest["points"], header.get("points")),
        ("dtype", manifest["dtype"], header.get("dtype")),
        ("rows per point", record["rows"], header.get("rows")),
        ("rows per role", record["role_rows"], header.get("role_rows")),
    ]
    # written by schema 2 on: the roles list and the capture identity (absent in older shards)
    for key in ("roles", "identity"):
        if key in header:
            pairs.append((key, manifest.get(key), header[key]))
    for field, m_value, s_value in pairs:
        if m_value != s_value:
            differ(field, m_value, s_value)
    shard_examples = header.get("examples")
    if not isinstance(shard_examples, list) or len(shard_examples) != last - first:
        n = len(shard_examples) if isinstance(shard_examples, list) else "no"
        out.append(f"the manifest lists {last - first} examples for {name}, its header {n}")
        return out
    for j, (m_ex, s_ex) in enumerate(zip(manifest["examples"][first:last], shard_examples, strict=True)):
        for key in EXAMPLE_KEYS:
            if m_ex.get(key) != s_ex.get(key):
                differ(f"example {first + j} {key}", m_ex.get(key), s_ex.get(key))
    if len(out) > _MAX_REPORTED:
        out[_MAX_REPORTED:] = [f"and {len(out) - _MAX_REPORTED} more differences"]
    return out


def label_type(value: Any) -> str | None:
    """The JSON type of a label value (``None``: absent, never a conflict)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars, as stored
        value = value.item()
    if value is None:
        return None
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list")):
        if isinstance(value, t):
            return name
    return "dict" if isinstance(value, Mapping) else type(value).__name__


class LabelTypes:
    """The type of every label key seen so far in a store; refuses a second type for a key."""

    def __init__(self, examples: Iterable[Mapping[str, Any]] = ()) -> None:
        self.types: dict[str, str] = {}
        self._seen: list[Mapping[str, Any]] = []
        self.add(list(examples))

    def add(self, examples: Sequence[Mapping[str, Any]]) -> None:
        """Record the label types of ``examples`` (dicts with ``id`` and ``labels``).

        Raises:
            MixedLabelTypesError: a key gets a second type; nothing is recorded then.
        """
        types = dict(self.types)
        for ex in examples:
            for key, value in ex.get("labels", {}).items():
                t = label_type(value)
                if t is not None and types.setdefault(key, t) != t:
                    raise MixedLabelTypesError(_mixed_message(key, [*self._seen, *examples]))
        self.types = types
        self._seen.extend(examples)


def _mixed_message(key: str, examples: Sequence[Mapping[str, Any]]) -> str:
    by_type: dict[str, list] = {}
    for ex in examples:
        value = ex.get("labels", {}).get(key)
        t = label_type(value)
        if t is not None:
            by_type.setdefault(t, []).append((ex.get("id"), value))
    parts = []
    for t, hits in by_type.items():
        more = f" and {len(hits) - 3} more" if len(hits) > 3 else ""
        ids = ", ".join(repr(i) for i, _ in hits[:3]) + more
        parts.append(f"{t} in {len(hits)} examples (ids {ids}; e.g. {hits[0][1]!r})")
    return (
        f"label {key!r} mixes value types across examples: {'; '.join(parts)}. Probes would treat "
        f'such values (0 and "0", 1 and 1.0) as different classes; give every example\'s {key!r} one '
        "type (e.g. all ints or all strings) in the prompts/labels and capture again"
    )
