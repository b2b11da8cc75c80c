"""Integrity checks of an activation store (see :mod:`uniprobe.hooks.store`).

* **Files** — at open every shard must exist with its recorded size, inside DIR (a shard path or
  symbolic link that leads outside the store directory is refused), and the manifest must match its
  ``manifest_digest`` (not with ``verify="none"``). The sha256 of a shard is checked on its first
  read (``verify="lazy"``), for every shard at open (``"full"``) or never (``"none"``). Damage raises
  :class:`StoreCorruptError` naming the file, what differs, and the fix
  (:class:`IntegrityChecks`).

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

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from uniprobe.hooks.store.errors import MixedLabelTypesError, StoreCorruptError
from uniprobe.hooks.store.files import inside
from uniprobe.hooks.store.format import (
    DIGEST_KEY,
    EXAMPLE_KEYS,
    FIX_MANIFEST,
    FIX_SHARD,
    FLOAT_COLUMNS,
    GENERATED_KEY,
    INDEX_COLUMNS,
    MANIFEST,
    META_KEY,
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    ST_DTYPE,
    dtype_from_name,
    sha256_file,
    shard_name,
)

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


class _ManifestProblem(str):
    """A shard header that disagrees with the manifest (the fix is the manifest's, not the shard's)."""


class IntegrityChecks:
    """The checks of :class:`~uniprobe.hooks.store.ActivationStore` against damage (a mixin: the store
    holds ``path``, ``_m`` the manifest, ``_records`` index → shard record, ``_verify``, and the sets
    ``_checked`` / ``_hashed`` of shards whose header / sha256 matched)."""

    path: Path
    _m: dict
    _records: dict[int, dict]
    _verify: str
    _checked: set[int]
    _hashed: set[int]

    def _validate_manifest(self, allow_holes: bool) -> None:
        m, file = self._m, self.path / MANIFEST
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if m.get("schema_version", 1) != 1 and "identity" not in m:
            missing.append("identity")
        if missing:
            raise StoreCorruptError(
                f"{file} lacks keys {missing}; re-run capture with resume=True to rebuild it"
            )
        if not isinstance(m["schema_version"], int) or m["schema_version"] > SCHEMA_VERSION:
            raise StoreCorruptError(
                f"{file} has schema_version {m['schema_version']!r}; this toolkit reads up to "
                f"{SCHEMA_VERSION} — upgrade uniprobe"
            )
        if m["n_examples"] != len(m["examples"]):
            raise StoreCorruptError(
                f"{file} says n_examples={m['n_examples']} but lists {len(m['examples'])}"
            )
        if m["shards"] and (m["dtype"] is None or set(m["feature_shapes"]) != set(m["points"])):
            raise StoreCorruptError(
                f"{file} lists shards but lacks the dtype or feature shape of some points"
            )
        spans = self._spans_from_examples()
        seen = set()
        for r in m["shards"]:
            self._check_record_file(r)
            try:
                index = int(r["index"])
                ok = (
                    index < len(spans)
                    and r["file"] == shard_name(index)
                    and list(r["examples"]) == list(spans[index])
                    and r["n_examples"] == spans[index][1] - spans[index][0]
                    and set(r["rows"]) == set(m["points"])
                    and set(r["role_rows"]) == set(m["points"])
                    and isinstance(r["sha256"], str)
                    and isinstance(r["bytes"], int)
                    and index not in seen
                )
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise StoreCorruptError(
                    f"{file}: shard record {r!r} does not match the manifest's examples and points; "
                    "re-run capture with resume=True, or overwrite=True to start again"
                )
            seen.add(index)
        holes = [i for i in range(len(spans)) if i not in seen]
        if holes and not allow_holes:
            where = ", ".join(f"shard {i} (examples {spans[i][0]}..{spans[i][1] - 1})" for i in holes)
            raise StoreCorruptError(
                f"{file} lists examples of {where} but no finished shard for them; "
                "re-run capture with resume=True"
            )

    def _check_record_file(self, record: Any) -> None:
        """A shard record may only name a file directly inside the store directory."""
        name = record.get("file") if isinstance(record, dict) else None
        outside = isinstance(name, str) and (os.path.isabs(name) or Path(name).name != name)
        if outside or name in ("", ".", ".."):
            raise StoreCorruptError(
                f"{self.path / MANIFEST}: shard record {record.get('index')!r} names the file {name!r}, "
                f"which is not inside the store directory {self.path}; a store reads only its own files. "
                f"To fix: {FIX_MANIFEST}"
            )

    def _check_digest(self) -> None:
        """Schema 2: the manifest must match its ``manifest_digest`` (else it was edited afterwards)."""
        if self._m["schema_version"] < 2:
            return
        recorded = self._m.get(DIGEST_KEY)
        if recorded == manifest_digest(self._m):
            return
        file = self.path / MANIFEST
        what = "has no manifest_digest" if recorded is None else "no longer matches its manifest_digest"
        differences = []
        for index in sorted(self._records):
            header = self._header(index)
            if header is not None:
                differences += header_problems(
                    self._records[index]["file"], header, self._records[index], self._m
                )
        if differences:
            where = "; compared with the shard headers: " + "; ".join(differences[:8])
        else:
            where = (
                " (the shard headers agree with it, so the change is in what only the manifest carries: "
                "attrs, identity, the roles list, shard records or status)"
            )
        raise StoreCorruptError(
            f"{file} was changed after it was written: its content {what}{where}. To fix: {FIX_MANIFEST}"
        )

    def _header(self, index: int) -> dict | None:
        """The ``uniprobe.shard`` header of shard ``index`` (None if it cannot be read)."""
        try:
            with safe_open(str(self.path / self._records[index]["file"]), framework="pt") as f:
                return json.loads((f.metadata() or {})[META_KEY])
        except (SafetensorError, KeyError, ValueError, OSError):
            return None

    def _spans_from_examples(self) -> list[tuple[int, int]]:
        """``[first, last + 1)`` global example range of every shard index, from the examples' ``shard``."""
        spans: list[tuple[int, int]] = []
        for i, ex in enumerate(self._m["examples"]):
            ok = (
                isinstance(ex, dict)
                and isinstance(ex.get("labels"), dict)
                and isinstance(ex.get("layout"), list)
            )
            if not ok:
                raise StoreCorruptError(
                    f"{self.path / MANIFEST}: example {i} lacks 'labels' or 'layout': {ex!r}"
                )
            s = ex.get("shard")
            if s == len(spans) - 1:
                spans[-1] = (spans[-1][0], i + 1)
            elif s == len(spans):
                spans.append((i, i + 1))
            else:
                raise StoreCorruptError(
                    f"{self.path / MANIFEST}: example {i} has shard {s!r} but the examples so far end with "
                    f"shard {len(spans) - 1}; examples must be listed in shard order"
                )
        return spans

    # -- shard checks ---------------------------------------------------------------------------------
    def _file_problems(self, record: dict) -> list[str]:
        file = self.path / record["file"]
        if not file.exists():
            return [f"{file} is missing (manifest lists it as shard {record['index']})"]
        if not inside(self.path, file):
            return [
                f"{file} leads to {os.path.realpath(file)}, outside the store directory {self.path} "
                "(a symbolic link?); a store reads only its own files"
            ]
        size = file.stat().st_size
        if size != record["bytes"]:
            return [f"{file} has {size} bytes, manifest records {record['bytes']} (truncated or replaced?)"]
        return []

    def _shard_problems(self, record: dict, sha: bool) -> list[str]:
        """What is wrong with one shard: file, place, size, sha256 (if ``sha``), then its tensors and
        header against the manifest (header disagreements are :class:`_ManifestProblem`)."""
        problems = self._file_problems(record)
        if problems:
            return problems
        file = self.path / record["file"]
        if sha and record["index"] not in self._hashed:
            digest = sha256_file(file)
            if digest != record["sha256"]:
                return [
                    f"{file} has sha256 {digest[:16]}…, manifest records {record['sha256'][:16]}… (altered)"
                ]
        if record["index"] in self._checked:
            return []
        dtype = ST_DTYPE.get(dtype_from_name(self._m["dtype"])) if self._m["dtype"] else None
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = set(f.keys())
                absent = []
                for p in self._m["points"]:
                    n = record["rows"][p]
                    want = {"values": [n, *self._m["feature_shapes"].get(p, [])]}
                    want.update({c: [n] for c in INDEX_COLUMNS})
                    # optional columns (older shards lack them): checked where present
                    want.update({c: [n] for c in FLOAT_COLUMNS if f"{p}/{c}" in keys})
                    for col, shape in want.items():
                        key = f"{p}/{col}"
                        if key not in keys:
                            absent.append(key)
                            continue
                        s = f.get_slice(key)
                        want_dtype = dtype if col == "values" else "F32" if col in FLOAT_COLUMNS else "I64"
                        if s.get_shape() != shape:
                            problems.append(
                                f"{file}: {key!r} has shape {s.get_shape()}, manifest implies {shape}"
                            )
                        elif want_dtype and s.get_dtype() != want_dtype:
                            problems.append(
                                f"{file}: {key!r} has dtype {s.get_dtype()}, expected {want_dtype}"
                            )
                if "generated" in record:  # the shard's generated latents [n_examples, *latent]
                    shape = [record["n_examples"], *record["generated"]]
                    if GENERATED_KEY not in keys:
                        absent.append(GENERATED_KEY)
                    elif f.get_slice(GENERATED_KEY).get_shape() != shape:
                        got = f.get_slice(GENERATED_KEY).get_shape()
                        problems.append(f"{file}: 'generated' has shape {got}, manifest implies {shape}")
                if absent:
                    problems.insert(0, f"{file} has no tensor {', '.join(repr(k) for k in absent)}")
                problems += self._header_problems(file, f.metadata(), record)
        except SafetensorError as e:
            problems.append(f"{file} is not a readable safetensors file ({e})")
        return problems

    def _header_problems(self, file: Path, metadata: dict | None, record: dict) -> list[str]:
        try:
            header = json.loads((metadata or {})[META_KEY])
        except (KeyError, ValueError):
            return [f"{file} has no readable {META_KEY!r} header"]
        return [_ManifestProblem(p) for p in header_problems(file.name, header, record, self._m)]

    def _corrupt_message(self, problems: list[str]) -> str:
        fixes = []
        if any(not isinstance(p, _ManifestProblem) for p in problems):
            fixes.append(FIX_SHARD)
        if any(isinstance(p, _ManifestProblem) for p in problems):
            fixes.append(f"if the manifest was edited, {FIX_MANIFEST}")
        what = "; ".join(problems)
        return f"corrupt activation store {self.path}: {what}. To fix: {'; '.join(fixes)}."

    def _check_shard(self, index: int, sha: bool) -> None:
        if index in self._checked and (not sha or index in self._hashed):
            return
        problems = self._shard_problems(self._records[index], sha)
        if problems:
            raise StoreCorruptError(self._corrupt_message(problems))
        self._checked.add(index)
        if sha:
            self._hashed.add(index)

    @contextlib.contextmanager
    def _open_shard(self, index: int) -> Iterator[Any]:
        self._check_shard(index, sha=self._verify == "lazy")
        file = self.path / self._records[index]["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                yield f
        except SafetensorError as e:
            raise StoreCorruptError(self._corrupt_message([f"{file} cannot be read ({e})"])) from None

    def verify(self) -> None:
        """Check every finished shard: presence, size, sha256 and tensors against the manifest.

        Raises:
            StoreCorruptError: listing every bad shard file.
        """
        problems = []
        for index in sorted(self._records):
            bad = self._shard_problems(self._records[index], sha=True)
            problems += bad
            if not bad:
                self._checked.add(index)
                self._hashed.add(index)
        if problems:
            raise StoreCorruptError(self._corrupt_message(problems))
