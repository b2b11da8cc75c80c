"""ActivationStore: captured activations on disk, as safetensors shards plus a JSON manifest.

A store is a directory::

    DIR/manifest.json             what the store holds; rewritten atomically after every shard
    DIR/shard-00000.safetensors   one shard per captured batch
    DIR/shard-00001.safetensors   ...
    DIR/.uniprobe-writer.lock     only while a writer is open (not data; see below)

A shard holds, for every hook point ``P``, the columns of a :class:`~uniprobe.hooks.rows.Rows` table:
``P/values`` ``[n, *feature]`` and the int64 ``[n]`` columns ``P/example`` (*global* example index),
``P/pos``, ``P/role``, ``P/step`` and ``P/branch``. Its safetensors header also carries the shard's own
record (index, first global example, the example dicts, model, points, dtype, row counts and, from
schema 2 on, the roles list and the capture identity), so a lost or damaged manifest can be rebuilt by
a resumed capture, and a manifest edited afterwards is caught.

The manifest records ``schema_version``, ``toolkit_version``, ``model`` (the caller's dict), ``points``,
``feature_shapes``, ``dtype``, ``roles``, ``n_examples``, ``examples`` (``id``, ``labels``, ``meta``,
``layout`` as role ids, ``shard``), ``shards`` (``file``, ``index``, ``sha256``, ``bytes``,
``n_examples``, ``examples`` = ``[first, last + 1]``, ``rows`` and ``role_rows`` per point),
``complete``, ``created``, free ``attrs`` and, from schema 2 on, ``identity`` (the capture's settings,
or null) and ``manifest_digest``.

**Schema versions.** This toolkit writes schema 2 and reads 1 and 2. Schema 1 stores (no identity,
no digest, shard headers without roles list and identity) open and read as before, with the checks
their files allow; resuming one upgrades its manifest to schema 2 (with a warning that the capture
identity of its finished shards cannot be checked).

**Global example indices** are cumulative over shard indices: the examples of shard ``i`` are numbered
from the number of examples in shards ``0..i-1``. Shards are therefore written in index order. A resumed
capture skips finished shards (:meth:`ActivationStore.has_shard`) and writes the rest in order. A shard
file that went bad can be deleted and rewritten by a resumed capture; its examples keep their global
indices, so the rewritten batch must hold the same example ids (capture must batch deterministically).

**Resume continues exactly the capture that was started.** ``create(..., identity=...)`` records the
capture's identity (:mod:`uniprobe.hooks.store_identity`: digest of the prompts, batch size, roles, positions,
mode, dtype, adapter, backend); ``resume=True`` refuses another model, other points or another identity
with :class:`ResumeMismatchError` naming every differing field (old vs new). Stores made through the API
without an identity resume as before.

**One writer at a time.** ``create`` (new, ``overwrite`` or ``resume``) takes the writer lock
``DIR/.uniprobe-writer.lock`` (an ``O_EXCL`` lock file: :mod:`uniprobe.hooks.store_lock` says why not
``flock``); a second writer gets :class:`StoreLockedError` naming the holder's pid and host. The lock is
released by :meth:`ActivationStore.finalize`, :meth:`ActivationStore.close` (also ``with
ActivationStore.create(...) as store:``), garbage collection, and errors inside ``create``; a stale lock
of a dead process on this host is recovered with a warning. Readers (:meth:`ActivationStore.open`) take no
lock.

**Writes are atomic**: a shard goes to a temp file in DIR, is fsynced and ``os.replace``-d into place,
then the manifest is rewritten the same way (:mod:`uniprobe.hooks.store_files`). Files get the mode the
user's umask gives (as the manifest always had; shards were private ``0600`` before). An interrupted
capture keeps every finished shard, and the manifest lists only shards whose file is complete, with its
byte size and sha256. A full disk (``ENOSPC``/``EDQUOT``) raises :class:`StoreDiskFullError` naming the
store, the bytes needed and the free space, and leaves no temp file behind.

**Reads are lazy**: ``safetensors.safe_open`` memory-maps a shard and only requested tensors are read.
At open every shard must exist with its recorded size, inside DIR (a shard path or symbolic link that
leads outside the store directory is refused), and the manifest must match its ``manifest_digest`` (not
with ``verify="none"``). On the first read of each shard its header is compared with the manifest
(:mod:`uniprobe.hooks.store_integrity`); the sha256 is checked on that first read (``verify="lazy"``),
for every shard at open (``"full"``) or never (``"none"``). Damage raises :class:`StoreCorruptError`
naming the file, what differs, and the fix.

**Labels** of one key must share one JSON type across the store (``0`` and ``"0"`` would become two
classes): :meth:`ActivationStore.write_shard` raises :class:`MixedLabelTypesError` naming the key and
example ids of each type.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from uniprobe.hooks.layout import ROLE_ID, ROLES, role_ids
from uniprobe.hooks.rows import BRANCHES, Rows
from uniprobe.hooks.store_errors import (
    IncompleteStoreWarning,
    MixedLabelTypesError,
    ResumeMismatchError,
    StoreCorruptError,
    StoreDiskFullError,
    StoreExistsError,
    StoreLockedError,
)
from uniprobe.hooks.store_files import atomic_write, atomic_write_text, human_bytes, inside, is_temp_name
from uniprobe.hooks.store_identity import identity_differences
from uniprobe.hooks.store_integrity import DIGEST_KEY, LabelTypes, header_problems, manifest_digest
from uniprobe.hooks.store_lock import LOCK_NAME, StoreLock, is_lock_name

__all__ = [
    "SCHEMA_VERSION",
    "ActivationStore",
    "IncompleteStoreWarning",
    "Matrix",
    "MixedLabelTypesError",
    "ResumeMismatchError",
    "StoreCorruptError",
    "StoreDiskFullError",
    "StoreExistsError",
    "StoreLockedError",
    "atomic_write_text",
]

SCHEMA_VERSION = 2  # written; 1 is still read (see the module docstring)
MANIFEST = "manifest.json"
INDEX_COLUMNS: tuple[str, ...] = ("example", "pos", "role", "step", "branch")
VERIFY_MODES: tuple[str, ...] = ("lazy", "full", "none")
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
_META_KEY = "uniprobe.shard"
_EXAMPLE_KEYS = ("id", "labels", "meta", "layout")
_REQUIRED_KEYS = (
    "schema_version",
    "model",
    "points",
    "feature_shapes",
    "dtype",
    "roles",
    "n_examples",
    "examples",
    "shards",
    "complete",
)
_REQUIRED_V2 = ("identity", DIGEST_KEY)
# safetensors header dtype codes, to check a shard's dtypes without reading its data
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FIX = "delete that shard file and re-run capture with --resume (resume=True) to rewrite it"
_FIX_MANIFEST = (
    "restore the original manifest.json, or re-run capture with --resume (resume=True) to rebuild it "
    "from the shard headers"
)


@dataclass
class Matrix:
    """One row per example, reduced from a store (see :meth:`ActivationStore.matrix`).

    Attributes:
        values: ``[n_kept, *feature]`` (``[n_kept, d_model]`` for residual points), the store's dtype.
        example: ``[n_kept]`` int64 global example indices, ascending.
        labels: label key → list of ``n_kept`` values (``None`` where an example lacks the key).
    """

    values: torch.Tensor
    example: torch.Tensor
    labels: dict[str, list]

    def __len__(self) -> int:
        return self.values.shape[0]


class _ManifestProblem(str):
    """A shard header that disagrees with the manifest (the fix is the manifest's, not the shard's)."""


# -- small helpers ----------------------------------------------------------------------------------


def _toolkit_version() -> str:
    try:
        return importlib.metadata.version("uniprobe")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_files(path: Path) -> dict[int, Path]:
    if not path.is_dir():
        return {}
    out = {}
    for p in path.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and tensors show up in labels; store them as plain JSON
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_value(obj: Any, what: str) -> Any:
    """``obj`` as it will read back from JSON (tuples become lists), or a ValueError naming ``what``."""
    try:
        return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON data (no pickle in stores): {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreCorruptError(f"manifest names an unknown dtype {name!r}")
    return dtype


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dumps_manifest(manifest: dict) -> str:
    """Readable JSON: one top-level key per line, one example / shard per line."""
    lines = []
    for key, value in manifest.items():
        if key in ("examples", "shards") and value:
            items = ",\n".join("    " + json.dumps(v) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _near(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def _diff_lists(have: list, want: list) -> str:
    missing = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    if not missing and not extra:
        return f"same points in a different order (store {have}, requested {want})"
    return f"requested but not in store: {missing}; in store but not requested: {extra}"


def _diff_dicts(have: dict, want: dict) -> str:
    absent = object()
    return "; ".join(
        f"{k}: store {have.get(k, '<missing>')!r} vs requested {want.get(k, '<missing>')!r}"
        for k in sorted(set(have) | set(want))
        if have.get(k, absent) != want.get(k, absent)
    )


def _read_manifest_json(path: Path) -> dict:
    """The parsed manifest of the store at ``path`` (no consistency checks)."""
    file = path / MANIFEST
    if not file.exists():
        n = len(_shard_files(path))
        if n:
            raise StoreCorruptError(
                f"{file} is missing but {path} holds {n} shard files; re-run capture with --resume "
                "(resume=True) to rebuild the manifest from the shard headers"
            )
        raise FileNotFoundError(f"no activation store at {path} (no {MANIFEST}); run capture to create one")
    if not inside(path, file):
        raise StoreCorruptError(
            f"{file} is a symbolic link to {os.path.realpath(file)}, outside the store directory; a store "
            f"reads only its own files: replace the link with the manifest file itself"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorruptError(
            f"{file} is not valid JSON ({e}); re-run capture with --resume (resume=True) to rebuild it "
            "from the shard headers"
        ) from None
    if not isinstance(manifest, dict):
        raise StoreCorruptError(f"{file} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def _new_manifest(model: dict, points: list[str], attrs: dict, identity: dict | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": _toolkit_version(),
        "model": model,
        "points": points,
        "feature_shapes": {},
        "dtype": None,
        "roles": list(ROLES),
        "n_examples": 0,
        "examples": [],
        "shards": [],
        "complete": False,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "attrs": attrs,
        "identity": identity,
    }


# -- the store --------------------------------------------------------------------------------------


class ActivationStore:
    """Captured activations in a directory of safetensors shards with a JSON manifest.

    Make one with :meth:`create` (for writing, also readable) or :meth:`open` (read-only).
    See the module docstring for the on-disk format and guarantees.
    """

    def __init__(self, path: Path, manifest: dict, *, writable: bool, verify: str, allow_holes: bool) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self._m = manifest
        self._writable = writable
        self._verify = verify
        self._lock: StoreLock | None = None
        self._release: weakref.finalize | None = None
        self._label_types: LabelTypes | None = None  # built on the first write
        self._checked: set[int] = set()  # shards whose header matched the manifest
        self._hashed: set[int] = set()  # shards whose sha256 matched the manifest
        self._validate_manifest(allow_holes)
        self._records: dict[int, dict] = {int(r["index"]): r for r in manifest["shards"]}
        self._spans = self._spans_from_examples()
        store_roles = list(manifest["roles"])
        unknown = [r for r in store_roles if r not in ROLE_ID]
        if unknown:
            raise ValueError(
                f"store {path} uses roles {unknown} that this toolkit does not know (toolkit roles: {ROLES})"
            )
        # store role id -> toolkit role id (stores written by an older toolkit may number roles differently)
        self._role_map = (
            None if store_roles == list(ROLES) else torch.tensor([ROLE_ID[r] for r in store_roles])
        )

    # -- making stores ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        model: dict,
        points: list[str],
        attrs: dict | None = None,
        overwrite: bool = False,
        resume: bool = False,
        identity: dict | None = None,
    ) -> ActivationStore:
        """A store at ``path`` to write shards into, holding the store's writer lock.

        The lock is released by :meth:`finalize`, :meth:`close` (or leaving ``with ... as store:``)
        and garbage collection.

        Args:
            path: the store directory (created if needed).
            model: JSON description of the model (``model_class``, ``config_hash``, ``adapter``, ...).
            points: hook points every shard holds.
            attrs: free JSON attributes kept in the manifest (merged into existing ones on resume).
            overwrite: delete an existing store's manifest and shards first.
            resume: reopen an existing store (same ``model``, ``points`` and ``identity``) to add the
                missing shards. Shards whose file is missing or has the wrong size are dropped so they
                can be rewritten; a missing, unreadable or edited manifest is rebuilt from the shard
                headers.
            identity: JSON description of the capture that fills the store (see
                :func:`uniprobe.hooks.store_identity.capture_identity`), or None for a store written through
                the API; a resume must pass the same.

        Raises:
            StoreExistsError: a store exists at ``path`` and neither ``resume`` nor ``overwrite`` was given.
            StoreLockedError: another writer holds the store.
            ResumeMismatchError: ``resume`` with another ``model``, ``points`` or ``identity`` than the
                store's (a ``ValueError``).
        """
        if overwrite and resume:
            raise ValueError("pass resume=True or overwrite=True, not both")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory; a store is a directory")
        model = _json_value(model, "model")
        if not isinstance(model, dict):
            raise TypeError(f"model must be a dict, got {type(model).__name__}")
        points = list(points)
        if not points or not all(isinstance(p, str) and p for p in points):
            raise ValueError(f"points must be a non-empty list of hook-point names, got {points!r}")
        dupes = sorted(p for p, c in Counter(points).items() if c > 1)
        if dupes:
            raise ValueError(f"points are listed more than once: {dupes}")
        attrs = _json_value(attrs or {}, "attrs")
        identity = _json_value(identity, "identity")
        if identity is not None and not isinstance(identity, dict):
            raise TypeError(f"identity must be a dict or None, got {type(identity).__name__}")

        path.mkdir(parents=True, exist_ok=True)
        lock = StoreLock.acquire(path)  # before looking: nobody changes the store while we decide
        try:
            store = cls._create_locked(path, model, points, attrs, identity, overwrite, resume)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        store._release = weakref.finalize(store, lock.release)
        return store

    @classmethod
    def _create_locked(
        cls,
        path: Path,
        model: dict,
        points: list[str],
        attrs: dict,
        identity: dict | None,
        overwrite: bool,
        resume: bool,
    ) -> ActivationStore:
        shard_files = _shard_files(path)
        if (path / MANIFEST).exists() or shard_files:
            if resume:
                return cls._resume(path, model, points, attrs, identity)
            if not overwrite:
                raise StoreExistsError(cls._exists_message(path, shard_files))
            cls._wipe(path)
        manifest = _new_manifest(model, points, attrs, identity)
        store = cls(path, manifest, writable=True, verify="lazy", allow_holes=True)
        store._write_manifest()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "lazy") -> ActivationStore:
        """Open the store at ``path`` read-only (no lock: reading beside a writer is safe).

        Args:
            verify: when to check shard sha256s: ``"lazy"`` (first read of each shard), ``"full"``
                (all at open, with every shard header), ``"none"``. File presence, sizes and places are
                always checked at open; the manifest digest unless ``"none"``.

        Raises:
            FileNotFoundError: nothing at ``path``.
            StoreCorruptError: unreadable or edited manifest, missing/truncated/altered shard, a shard
                outside the store directory, or shards that disagree with the manifest.
        """
        path = Path(path)
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        store = cls(path, _read_manifest_json(path), writable=False, verify=verify, allow_holes=False)
        problems = []
        for index in sorted(store._records):
            problems += store._file_problems(store._records[index])
        if problems:
            raise StoreCorruptError(store._corrupt_message(problems))
        if verify != "none":
            store._check_digest()
        if verify == "full":
            store.verify()
        return store

    @staticmethod
    def _exists_message(path: Path, shard_files: dict[int, Path]) -> str:
        try:
            manifest = _read_manifest_json(path)
            n_done = len(manifest.get("shards", []))
            state = "complete" if manifest.get("complete") else "incomplete"
            what = f"{n_done} finished shards, {manifest.get('n_examples', '?')} examples, {state}"
        except (StoreCorruptError, FileNotFoundError):
            what = f"{len(shard_files)} shard files, manifest missing or unreadable"
        return (
            f"an activation store already exists at {path} ({what}); pass resume=True (--resume) to "
            "continue it, or overwrite=True (--overwrite) to delete it and start again"
        )

    @staticmethod
    def _is_own_file(name: str) -> bool:
        """Whether ``name`` is one of a store's own files: manifest, shards, temp files, lock files."""
        return name == MANIFEST or bool(_SHARD_RE.match(name)) or is_temp_name(name) or is_lock_name(name)

    @classmethod
    def _wipe(cls, path: Path) -> None:
        """Delete the store's own files (manifest, shards, temp files, stale lock files), never the
        writer lock held while wiping; anything else in DIR stays."""
        for p in path.iterdir():
            if cls._is_own_file(p.name) and p.name != LOCK_NAME:
                p.unlink()

    @classmethod
    def _resume(
        cls, path: Path, model: dict, points: list[str], attrs: dict, identity: dict | None
    ) -> ActivationStore:
        manifest = cls._resumable_manifest(path, model, points, attrs, identity)
        if manifest.get("schema_version") == 1:
            warnings.warn(
                f"{path} was written by an older uniprobe (store schema 1, no capture identity): this "
                "resume cannot check that its finished shards were captured with the same prompts and "
                f"settings; its manifest is upgraded to schema {SCHEMA_VERSION}",
                stacklevel=4,
            )
            manifest.update(schema_version=SCHEMA_VERSION, identity=identity)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"cannot resume {path}: it has schema_version {manifest.get('schema_version')!r}, "
                f"this toolkit writes {SCHEMA_VERSION}; capture into a new directory"
            )
        problems = []
        if manifest.get("points") != points:
            problems.append(f"points differ ({_diff_lists(manifest.get('points', []), points)})")
        if manifest.get("model") != model:
            problems.append(f"model differs ({_diff_dicts(manifest.get('model', {}), model)})")
        if manifest.get("roles") != list(ROLES):
            problems.append(f"roles differ (store {manifest.get('roles')}, toolkit {list(ROLES)})")
        problems += identity_differences(manifest.get("identity") or {}, identity or {})
        if problems:
            raise ResumeMismatchError(
                f"cannot resume the store at {path}: this run differs from the capture that started it — "
                f"{'; '.join(problems)}. A resumed capture must continue exactly the capture that was "
                "started: re-run with the same model, points, prompts file and settings (batch size, "
                "roles, positions, mode, dtype, adapter, backend), pass overwrite=True (--overwrite) to "
                "start again, or capture into a new directory"
            )
        manifest.setdefault("attrs", {}).update(attrs)
        store = cls(path, manifest, writable=True, verify="lazy", allow_holes=True)
        for index in sorted(store._records):
            bad = store._file_problems(store._records[index])
            if bad:
                warnings.warn(
                    f"{'; '.join(bad)}; shard {index} will be rewritten by this capture", stacklevel=4
                )
                del store._records[index]
                store._m["complete"] = False
        for p in path.iterdir():  # temp files of an interrupted write (we hold the lock: none is live)
            if is_temp_name(p.name):
                p.unlink()
        return store

    @classmethod
    def _resumable_manifest(
        cls, path: Path, model: dict, points: list[str], attrs: dict, identity: dict | None
    ) -> dict:
        """The manifest to resume from: as written, or rebuilt from the shard headers when it is
        missing, unreadable or was edited after it was written."""
        try:
            manifest = _read_manifest_json(path)
            edited = manifest.get(DIGEST_KEY) != manifest_digest(manifest)
            if manifest.get("schema_version", 0) >= 2 and edited:
                raise StoreCorruptError(f"{path / MANIFEST} was edited after it was written (digest differs)")
        except StoreCorruptError as e:
            warnings.warn(f"{e}; rebuilding it from the shard headers", stacklevel=5)
            manifest = cls._rebuild_manifest(path, model, points, attrs, identity)
        return manifest

    @staticmethod
    def _rebuild_manifest(
        path: Path, model: dict, points: list[str], attrs: dict, identity: dict | None
    ) -> dict:
        """A manifest from the shard headers: shards 0, 1, ... up to the first gap or unreadable one.

        The roles list and identity come from the headers (schema 2), else from this toolkit / the
        caller; the resume then compares them with what the caller asks for.
        """
        manifest = _new_manifest(model, points, attrs, identity)
        files = _shard_files(path)
        for index in sorted(files):
            file = files[index]
            if not inside(path, file):
                warnings.warn(
                    f"{file} leads outside {path}; it and later shards will be rewritten", stacklevel=6
                )
                break
            try:
                with safe_open(str(file), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})[_META_KEY])
                    shapes = {p: f.get_slice(f"{p}/values").get_shape()[1:] for p in meta["points"]}
            except (SafetensorError, KeyError, ValueError, OSError) as e:
                warnings.warn(
                    f"cannot read {file} ({e}); it and later shards will be rewritten", stacklevel=6
                )
                break
            if index != len(manifest["shards"]) or meta["first"] != manifest["n_examples"]:
                warnings.warn(
                    f"shard {index} follows a gap; it and later shards will be rewritten", stacklevel=6
                )
                break
            if meta["points"] != points or meta["model"] != model:
                raise ResumeMismatchError(
                    f"cannot resume {path}: {file} was captured with model {meta['model']} and points "
                    f"{meta['points']}, not the requested {model} and {points}; pass overwrite=True "
                    "(--overwrite) to start again"
                )
            if index == 0:  # schema 2 headers carry what only the manifest carried before
                manifest["roles"] = meta.get("roles", manifest["roles"])
                manifest["identity"] = meta.get("identity", identity)
            n = len(meta["examples"])
            first = manifest["n_examples"]
            manifest["examples"] += [{**ex, "shard": index} for ex in meta["examples"]]
            manifest["n_examples"] += n
            manifest["feature_shapes"] = {p: list(s) for p, s in shapes.items()}
            manifest["dtype"] = meta["dtype"]
            manifest["shards"].append(
                {
                    "file": file.name,
                    "index": index,
                    "sha256": _sha256(file),
                    "bytes": file.stat().st_size,
                    "n_examples": n,
                    "examples": [first, first + n],
                    "rows": meta["rows"],
                    "role_rows": meta["role_rows"],
                }
            )
        manifest["attrs"]["rebuilt_manifest"] = datetime.now(UTC).isoformat(timespec="seconds")
        return manifest

    # -- manifest consistency -----------------------------------------------------------------------
    def _validate_manifest(self, allow_holes: bool) -> None:
        m, file = self._m, self.path / MANIFEST
        missing = [k for k in _REQUIRED_KEYS if k not in m]
        if m.get("schema_version", 1) != 1 and "identity" not in m:
            missing.append("identity")
        if missing:
            raise StoreCorruptError(
                f"{file} lacks keys {missing}; re-run capture with --resume to rebuild it"
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
                    and r["file"] == _shard_name(index)
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
                    "re-run capture with --resume, or --overwrite to start again"
                )
            seen.add(index)
        holes = [i for i in range(len(spans)) if i not in seen]
        if holes and not allow_holes:
            where = ", ".join(f"shard {i} (examples {spans[i][0]}..{spans[i][1] - 1})" for i in holes)
            raise StoreCorruptError(
                f"{file} lists examples of {where} but no finished shard for them; "
                "re-run capture with --resume"
            )

    def _check_record_file(self, record: Any) -> None:
        """A shard record may only name a file directly inside the store directory."""
        name = record.get("file") if isinstance(record, dict) else None
        outside = isinstance(name, str) and (os.path.isabs(name) or Path(name).name != name)
        if outside or name in ("", ".", ".."):
            raise StoreCorruptError(
                f"{self.path / MANIFEST}: shard record {record.get('index')!r} names the file {name!r}, "
                f"which is not inside the store directory {self.path}; a store reads only its own files. "
                f"To fix: {_FIX_MANIFEST}"
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
            f"{file} was changed after it was written: its content {what}{where}. To fix: {_FIX_MANIFEST}"
        )

    def _header(self, index: int) -> dict | None:
        """The ``uniprobe.shard`` header of shard ``index`` (None if it cannot be read)."""
        try:
            with safe_open(str(self.path / self._records[index]["file"]), framework="pt") as f:
                return json.loads((f.metadata() or {})[_META_KEY])
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
            digest = _sha256(file)
            if digest != record["sha256"]:
                return [
                    f"{file} has sha256 {digest[:16]}…, manifest records {record['sha256'][:16]}… (altered)"
                ]
        if record["index"] in self._checked:
            return []
        dtype = _ST_DTYPE.get(_dtype_from_name(self._m["dtype"])) if self._m["dtype"] else None
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = set(f.keys())
                absent = []
                for p in self._m["points"]:
                    n = record["rows"][p]
                    want = {"values": [n, *self._m["feature_shapes"].get(p, [])]}
                    want.update({c: [n] for c in INDEX_COLUMNS})
                    for col, shape in want.items():
                        key = f"{p}/{col}"
                        if key not in keys:
                            absent.append(key)
                            continue
                        s = f.get_slice(key)
                        want_dtype = dtype if col == "values" else "I64"
                        if s.get_shape() != shape:
                            problems.append(
                                f"{file}: {key!r} has shape {s.get_shape()}, manifest implies {shape}"
                            )
                        elif want_dtype and s.get_dtype() != want_dtype:
                            problems.append(
                                f"{file}: {key!r} has dtype {s.get_dtype()}, expected {want_dtype}"
                            )
                if absent:
                    problems.insert(0, f"{file} has no tensor {', '.join(repr(k) for k in absent)}")
                problems += self._header_problems(file, f.metadata(), record)
        except SafetensorError as e:
            problems.append(f"{file} is not a readable safetensors file ({e})")
        return problems

    def _header_problems(self, file: Path, metadata: dict | None, record: dict) -> list[str]:
        try:
            header = json.loads((metadata or {})[_META_KEY])
        except (KeyError, ValueError):
            return [f"{file} has no readable {_META_KEY!r} header"]
        return [_ManifestProblem(p) for p in header_problems(file.name, header, record, self._m)]

    def _corrupt_message(self, problems: list[str]) -> str:
        fixes = []
        if any(not isinstance(p, _ManifestProblem) for p in problems):
            fixes.append(_FIX)
        if any(isinstance(p, _ManifestProblem) for p in problems):
            fixes.append(f"if the manifest was edited, {_FIX_MANIFEST}")
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

    # -- writing --------------------------------------------------------------------------------------
    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` is finished (written and recorded in the manifest)."""
        return index in self._records

    @property
    def finished_shards(self) -> set[int]:
        """Indices of finished shards."""
        return set(self._records)

    def write_shard(self, index: int, rows: dict[str, Rows], examples: list[dict]) -> None:
        """Write one captured batch as shard ``index`` and record it in the manifest.

        Args:
            index: shard index; shards are written in order 0, 1, ... (finished ones may be skipped).
            rows: hook point → :class:`Rows` with ``values`` ``[n, *feature]`` and batch-local
                ``example`` in ``0..len(examples)-1``; every store point must be present.
            examples: the batch's example dicts: ``id``, ``labels`` {key: value}, ``meta`` {...},
                ``layout`` (role ids of the example's positions, ``[pos]``).

        Raises:
            StoreExistsError: shard ``index`` is already finished.
            MixedLabelTypesError: a label key gets values of another type than before (``0``, ``"0"``).
            StoreDiskFullError: out of disk space or quota; the store is unchanged.
            ValueError: out-of-order index, missing/extra points, feature shape or dtype different from
                earlier shards, bad columns or examples.
        """
        self._require_writable()
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"shard index must be a non-negative int, got {index!r}")
        if index in self._records:
            raise StoreExistsError(
                f"shard {index} of {self.path} is already finished; skip it (store.has_shard({index})), "
                f"or {_FIX}"
            )
        n = len(examples)
        if n == 0:
            raise ValueError(f"shard {index}: examples is empty; a shard holds at least one example")
        exs = self._normalize_examples(index, examples)
        if index < len(self._spans):  # rewriting a shard whose file went bad: same examples as before
            first, last = self._spans[index]
            old_ids = [ex["id"] for ex in self._m["examples"][first:last]]
            new_ids = [ex["id"] for ex in exs]
            if new_ids != old_ids:
                raise ValueError(
                    f"shard {index} is being rewritten but holds example ids {new_ids[:5]}… where the store "
                    f"had {old_ids[:5]}… ({last - first} examples); capture must batch the same way to "
                    "resume, or pass --overwrite to start again"
                )
        elif index == len(self._spans):
            first = self._spans[-1][1] if self._spans else 0
        else:
            raise ValueError(
                f"shards are written in index order: shard {index} needs shards 0..{index - 1} first "
                f"(this store has shard indices 0..{len(self._spans) - 1}); global example ids are "
                "cumulative over shard indices"
            )
        tensors, counts, role_counts, shapes, dtype = self._validate_rows(index, rows, n, first)
        if self._label_types is None:
            self._label_types = LabelTypes(self._m["examples"])
        self._label_types.add(exs)

        meta = {
            "schema_version": SCHEMA_VERSION,
            "index": index,
            "first": first,
            "model": self._m["model"],
            "points": self._m["points"],
            "dtype": _dtype_name(dtype),
            "rows": counts,
            "role_rows": role_counts,
            "roles": self._m["roles"],
            "identity": self._m.get("identity"),
            "examples": [{k: ex[k] for k in _EXAMPLE_KEYS} for ex in exs],
        }
        header = json.dumps(meta)
        digest, size = atomic_write(
            self.path / _shard_name(index),
            lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: header}),
            what=f"shard {index} of the activation store {self.path}",
            needed=sum(t.numel() * t.element_size() for t in tensors.values()) + len(header),
            fix="re-run capture with --resume (resume=True) to continue",
            inspect=lambda tmp: (_sha256(tmp), tmp.stat().st_size),
        )
        file = self.path / _shard_name(index)
        undo = (
            self._m["examples"][first : first + n] if index < len(self._spans) else None,
            self._m["feature_shapes"],
            self._m["dtype"],
            self._m["complete"],
        )
        self._records[index] = {
            "file": file.name,
            "index": index,
            "sha256": digest,
            "bytes": size,
            "n_examples": n,
            "examples": [first, first + n],
            "rows": counts,
            "role_rows": role_counts,
        }
        self._checked.add(index)
        self._hashed.add(index)
        if index < len(self._spans):
            self._m["examples"][first : first + n] = exs
        else:
            self._m["examples"].extend(exs)
            self._spans.append((first, first + n))
        self._m["feature_shapes"] = shapes
        self._m["dtype"] = _dtype_name(dtype)
        self._m["complete"] = False
        try:
            self._write_manifest()
        except BaseException:
            self._undo_shard(index, first, n, undo)
            raise

    def _undo_shard(self, index: int, first: int, n: int, undo: tuple) -> None:
        """Forget shard ``index`` after its manifest could not be written (disk full, ...): memory
        matches the manifest on disk again, and the unlisted file goes (a resume rewrites it)."""
        old_examples, self._m["feature_shapes"], self._m["dtype"], self._m["complete"] = undo
        del self._records[index]
        self._checked.discard(index)
        self._hashed.discard(index)
        if old_examples is None:
            del self._m["examples"][first:]
            self._spans.pop()
        else:
            self._m["examples"][first : first + n] = old_examples
        self._m["shards"] = [self._records[i] for i in sorted(self._records)]
        self._m["n_examples"] = len(self._m["examples"])
        (self.path / _shard_name(index)).unlink(missing_ok=True)

    def _normalize_examples(self, index: int, examples: list[dict]) -> list[dict]:
        out = []
        for i, ex in enumerate(examples):
            where = f"shard {index}, example {i}"
            if not isinstance(ex, Mapping):
                raise TypeError(f"{where}: examples must be dicts, got {type(ex).__name__}")
            unknown = sorted(set(ex) - set(_EXAMPLE_KEYS))
            if unknown:
                raise ValueError(
                    f"{where} has unknown keys {unknown}; example keys are {list(_EXAMPLE_KEYS)}"
                )
            if "id" not in ex:
                raise ValueError(f"{where} has no 'id'")
            for key in ("labels", "meta"):
                if not isinstance(ex.get(key, {}), Mapping):
                    raise TypeError(f"{where}: {key!r} must be a dict, got {type(ex[key]).__name__}")
            layout = ex.get("layout", [])
            layout = layout.tolist() if hasattr(layout, "tolist") else list(layout)
            if any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(ROLES) for r in layout):
                raise ValueError(f"{where}: layout must be role ids in 0..{len(ROLES) - 1} ({ROLES})")
            d = {"id": ex["id"], "labels": dict(ex.get("labels", {})), "meta": dict(ex.get("meta", {}))}
            d = _json_value(d, where)
            d["layout"] = layout
            d["shard"] = index
            out.append(d)
        return out

    def _validate_rows(
        self, index: int, rows: dict[str, Rows], n_examples: int, first: int
    ) -> tuple[
        dict[str, torch.Tensor], dict[str, int], dict[str, dict[str, int]], dict[str, list[int]], torch.dtype
    ]:
        points = self.points
        if not isinstance(rows, Mapping):
            raise TypeError(f"rows must be a dict of hook point -> Rows, got {type(rows).__name__}")
        missing = [p for p in points if p not in rows]
        extra = [p for p in rows if p not in points]
        if missing or extra:
            raise ValueError(
                f"shard {index}: rows must hold exactly the store's points; missing {missing}, "
                f"unexpected {extra} (store points: {points})"
            )
        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        role_counts: dict[str, dict[str, int]] = {}
        shapes: dict[str, list[int]] = {}
        dtype: torch.dtype | None = None
        first_point = None
        limits = {"example": n_examples, "role": len(ROLES), "branch": len(BRANCHES)}
        for p in points:
            r = rows[p]
            if not isinstance(r, Rows):
                raise TypeError(f"shard {index}, point {p!r}: expected Rows, got {type(r).__name__}")
            v = r.values
            if not isinstance(v, torch.Tensor) or v.dim() < 1:
                raise ValueError(f"shard {index}, point {p!r}: values must be a tensor [n, *feature]")
            n, shape = v.shape[0], list(v.shape[1:])
            known = self._m["feature_shapes"].get(p)
            if known is not None and known != shape:
                raise ValueError(
                    f"shard {index}, point {p!r}: values have feature shape {shape} ([n, *feature] = "
                    f"{list(v.shape)}) but earlier shards have {known}"
                )
            if self._m["dtype"] is not None and _dtype_name(v.dtype) != self._m["dtype"]:
                raise ValueError(
                    f"shard {index}, point {p!r}: values are {_dtype_name(v.dtype)} but the store holds "
                    f"{self._m['dtype']}; cast before writing"
                )
            if dtype is None:
                dtype, first_point = v.dtype, p
            elif v.dtype != dtype:
                raise ValueError(
                    f"shard {index}: point {p!r} has dtype {_dtype_name(v.dtype)} but {first_point!r} has "
                    f"{_dtype_name(dtype)}; a store holds one dtype, cast before writing"
                )
            tensors[f"{p}/values"] = v.detach().cpu().contiguous()
            for c in INDEX_COLUMNS:
                col = getattr(r, c)
                col = torch.as_tensor(col)
                if col.dtype.is_floating_point or col.dtype.is_complex or col.dtype == torch.bool:
                    raise ValueError(
                        f"shard {index}, point {p!r}: column {c!r} must be integer, got {col.dtype}"
                    )
                if col.dim() != 1 or col.shape[0] != n:
                    raise ValueError(
                        f"shard {index}, point {p!r}: column {c!r} has shape {list(col.shape)} but values "
                        f"have {n} rows"
                    )
                col = col.detach().cpu().to(torch.long).contiguous()
                if n and (col.min() < 0 or (c in limits and col.max() >= limits[c])):
                    bound = f"0..{limits[c] - 1}" if c in limits else ">= 0"
                    raise ValueError(
                        f"shard {index}, point {p!r}: column {c!r} has values "
                        f"{int(col.min())}..{int(col.max())}, "
                        f"must be {bound}" + (" (batch-local example index)" if c == "example" else "")
                    )
                tensors[f"{p}/{c}"] = col + first if c == "example" else col
            counts[p] = n
            bins = torch.bincount(tensors[f"{p}/role"], minlength=len(ROLES)).tolist()
            role_counts[p] = {ROLES[i]: k for i, k in enumerate(bins) if k}
            shapes[p] = shape
        assert dtype is not None
        # capture may hand every point the same index tensors (or views of one buffer); safetensors
        # refuses tensors that share memory, so give each its own
        seen: set[int] = set()
        for key, t in tensors.items():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen and t.numel():
                tensors[key] = t.clone()
            seen.add(tensors[key].untyped_storage().data_ptr())
        return tensors, counts, role_counts, shapes, dtype

    def finalize(self) -> None:
        """Mark the store complete (every batch captured) in the manifest and release the writer lock."""
        self._require_writable()
        holes = [i for i in range(len(self._spans)) if i not in self._records]
        if holes:
            raise ValueError(f"cannot finalize {self.path}: shards {holes} are not written yet")
        self._m["complete"] = True
        self._write_manifest()
        self.close()

    def close(self) -> None:
        """Stop writing: release the writer lock (idempotent). The store stays readable; an unfinished
        one stays incomplete and can be continued with ``create(..., resume=True)``."""
        self._writable = False
        if self._release is not None:
            self._release()  # runs StoreLock.release once, and never again at garbage collection

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if self._writable:
            return
        state = "was finalized or closed" if self._lock is not None else "was opened read-only"
        raise PermissionError(
            f"store {self.path} {state}; use ActivationStore.create(..., resume=True) to add shards"
        )

    def _write_manifest(self) -> None:
        self._m["shards"] = [self._records[i] for i in sorted(self._records)]
        self._m["n_examples"] = len(self._m["examples"])
        self._m[DIGEST_KEY] = manifest_digest(self._m)
        atomic_write_text(
            self.path / MANIFEST,
            _dumps_manifest(self._m),
            what=f"the manifest of the activation store {self.path}",
            fix="re-run capture with --resume (resume=True) to continue",
        )

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The manifest as a dict (read-only by convention)."""
        return self._m

    @property
    def points(self) -> list[str]:
        """Hook points, in capture order."""
        return list(self._m["points"])

    @property
    def n_examples(self) -> int:
        return len(self._m["examples"])

    def __len__(self) -> int:
        return self.n_examples

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    @property
    def model(self) -> dict:
        return dict(self._m["model"])

    @property
    def attrs(self) -> dict:
        return dict(self._m.get("attrs", {}))

    @property
    def identity(self) -> dict | None:
        """The capture identity the store was made with (None: made through the API, or schema 1)."""
        identity = self._m.get("identity")
        return None if identity is None else dict(identity)

    @property
    def expected_examples(self) -> int | None:
        """How many examples the capture that fills the store was given (None if unknown: no identity)."""
        prompts = (self._m.get("identity") or {}).get("prompts") or {}
        n = prompts.get("n_examples")
        return n if isinstance(n, int) else None

    def role_rows(self, point: str) -> dict[str, int]:
        """Rows per role name at ``point`` over the finished shards (from the manifest; reads no shard)."""
        self._check_point(point)
        counts: Counter = Counter()
        for rec in self._records.values():
            counts.update(rec["role_rows"][point])
        return {r: counts[r] for r in ROLES if counts[r]}

    @property
    def dtype(self) -> torch.dtype | None:
        """dtype of every point's values (``None`` before the first shard)."""
        return _dtype_from_name(self._m["dtype"]) if self._m["dtype"] else None

    def feature_shape(self, point: str) -> tuple[int, ...]:
        """Feature shape of ``point``: values are ``[n, *feature_shape]``."""
        self._check_point(point)
        return tuple(self._m["feature_shapes"].get(point, ()))

    @property
    def examples(self) -> list[dict]:
        """Per-example dicts (``id``, ``labels``, ``meta``, ``layout``, ``shard``), by global index."""
        return [dict(ex) for ex in self._m["examples"]]

    @property
    def label_keys(self) -> list[str]:
        """Label keys present on any example, in first-seen order."""
        return list(dict.fromkeys(k for ex in self._m["examples"] for k in ex["labels"]))

    def labels(self, key: str) -> list:
        """Label ``key`` of every example, by global index (``None`` where an example lacks it)."""
        keys = self.label_keys
        if key not in keys:
            raise KeyError(f"no label {key!r} in {self.path}; {_near(key, keys)}label keys: {keys}")
        return [ex["labels"].get(key) for ex in self._m["examples"]]

    def layout(self, example: int) -> list[str]:
        """Role names of the positions of global example ``example``."""
        if not -self.n_examples <= example < self.n_examples:
            raise IndexError(f"example {example} out of range; the store has {self.n_examples} examples")
        names = self._m["roles"]
        return [names[i] for i in self._m["examples"][example]["layout"]]

    def _check_point(self, point: str) -> None:
        points = self._m["points"]
        if point not in points:
            raise ValueError(
                f"no hook point {point!r} in {self.path}; {_near(point, points)}points: {points}"
            )

    # -- reading ----------------------------------------------------------------------------------
    def _columns(self, f: Any, point: str) -> dict[str, torch.Tensor]:
        cols = {c: f.get_tensor(f"{point}/{c}") for c in INDEX_COLUMNS}
        if self._role_map is not None:
            cols["role"] = self._role_map[cols["role"]]
        return cols

    def _select(
        self,
        point: str,
        roles: str | Iterable[str] | None,
        step: int | Iterable[int] | None,
        branch: str | int | None,
        with_values: bool = True,
    ) -> Rows:
        self._check_point(point)
        role_set = (
            None if roles is None else torch.tensor(role_ids([roles] if isinstance(roles, str) else roles))
        )
        step_set = None if step is None else torch.tensor([step] if isinstance(step, int) else list(step))
        if isinstance(branch, str):
            if branch not in BRANCHES:
                raise ValueError(f"unknown branch {branch!r}; branches are {BRANCHES}")
            branch = BRANCHES.index(branch)
        parts = []
        for index in sorted(self._records):
            with self._open_shard(index) as f:
                cols = self._columns(f, point)
                keep = torch.ones_like(cols["role"], dtype=torch.bool)
                if role_set is not None:
                    keep &= torch.isin(cols["role"], role_set)
                if step_set is not None:
                    keep &= torch.isin(cols["step"], step_set)
                if branch is not None:
                    keep &= cols["branch"] == branch
                sel = keep.nonzero().flatten()
                if sel.numel() == 0:
                    continue
                if with_values:
                    # read only the span that holds the kept rows
                    lo, hi = int(sel[0]), int(sel[-1]) + 1
                    values = f.get_slice(f"{point}/values")[lo:hi][keep[lo:hi]]
                else:
                    values = torch.empty(len(sel), 0)
                parts.append(Rows(values=values, **{c: t[keep] for c, t in cols.items()}))
        if parts:
            return Rows.cat(parts)
        empty = torch.empty(0, dtype=torch.long)
        dtype = self.dtype or torch.float32
        shape = self._m["feature_shapes"].get(point, []) if with_values else [0]
        return Rows(torch.empty(0, *shape, dtype=dtype), *(empty.clone() for _ in INDEX_COLUMNS))

    def rows(
        self,
        point: str,
        roles: str | Iterable[str] | None = None,
        step: int | Iterable[int] | None = None,
        branch: str | int | None = None,
    ) -> Rows:
        """All rows at ``point`` across shards, filtered; ``example`` holds global indices.

        Args:
            roles: a role name or names (``None``: every role).
            step: a generation step or steps (``None``: every step).
            branch: ``"cond"``/``"uncond"`` or its index (``None``: both).

        Returns:
            :class:`Rows` with ``values`` ``[n, *feature]`` in the store's dtype, in shard order.
        """
        return self._select(point, roles, step, branch)

    def matrix(
        self,
        point: str,
        role: str | list[str] | None = None,
        reduce: str | int = "last",
        step: int | Iterable[int] | None = None,
        branch: str | int | None = "cond",
    ) -> Matrix:
        """One row per example at ``point``: a design matrix for probes.

        Each example's rows with the selected role(s), step(s) and branch are ordered by position
        (ties by step) and reduced: ``"last"``, ``"first"``, ``"mean"`` (accumulated in float32, or
        float64 for float64 stores, returned in the store's dtype), or an int ``k``: the k-th of them
        (negative from the end). Examples without such rows (or with fewer than needed for ``k``)
        are dropped; :attr:`Matrix.example` says which were kept.

        Returns:
            :class:`Matrix` with ``values`` ``[n_kept, *feature]``, ``example`` ``[n_kept]``, ``labels``.
        """
        if not (
            reduce in ("last", "first", "mean") or (isinstance(reduce, int) and not isinstance(reduce, bool))
        ):
            raise ValueError(f"reduce must be 'last', 'first', 'mean' or an int position, got {reduce!r}")
        r = self._select(point, role, step, branch)
        if len(r) == 0:
            raise ValueError(self._no_rows_message(point, role, step, branch))
        order = torch.argsort(r.step, stable=True)
        order = order[torch.argsort(r.pos[order], stable=True)]
        order = order[torch.argsort(r.example[order], stable=True)]
        r = r.select(order)
        example, counts = torch.unique_consecutive(r.example, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        if reduce == "mean":
            acc_dtype = torch.float64 if r.values.dtype == torch.float64 else torch.float32
            group = torch.repeat_interleave(torch.arange(len(example)), counts)
            acc = torch.zeros(len(example), *r.values.shape[1:], dtype=acc_dtype)
            acc.index_add_(0, group, r.values.to(acc_dtype))
            acc /= counts.to(acc_dtype).view(-1, *[1] * (r.values.dim() - 1))
            values = acc.to(r.values.dtype) if r.values.dtype.is_floating_point else acc
        else:
            if reduce == "first":
                idx = starts
            elif reduce == "last":
                idx = starts + counts - 1
            else:
                ok = counts > reduce if reduce >= 0 else counts >= -reduce
                example, idx = example[ok], (starts + reduce if reduce >= 0 else starts + counts + reduce)[ok]
                if len(example) == 0:
                    raise ValueError(
                        f"no example has a row at reduce={reduce} for point {point!r}, role {role!r}: "
                        f"examples have {int(counts.min())}..{int(counts.max())} such rows"
                    )
            values = r.values[idx]
        exs = self._m["examples"]
        labels = {k: [exs[e]["labels"].get(k) for e in example.tolist()] for k in self.label_keys}
        return Matrix(values=values, example=example, labels=labels)

    def _no_rows_message(self, point: str, role: Any, step: Any, branch: Any) -> str:
        msg = (
            f"no rows at point {point!r} with role {role!r}, step {step!r}, branch {branch!r} in {self.path}"
        )
        if not self._records:
            return msg + " (the store has no finished shards)"
        present = self._select(point, None, step, branch, with_values=False)
        counts = Counter(ROLES[i] for i in present.role.tolist())
        if counts:
            return (
                msg
                + "; roles present with that step and branch: "
                + ", ".join(f"{k} ({v} rows)" for k, v in counts.items())
            )
        everywhere = Counter()
        for rec in self._records.values():
            everywhere.update(rec["role_rows"][point])
        return (
            msg
            + "; no rows with that step and branch; roles present at this point: "
            + ", ".join(f"{k} ({v} rows)" for k, v in everywhere.items())
        )

    # -- reporting --------------------------------------------------------------------------------
    def size_on_disk(self) -> int:
        """Bytes of the manifest and the finished shards."""
        manifest = self.path / MANIFEST
        return sum(r["bytes"] for r in self._records.values()) + (
            manifest.stat().st_size if manifest.exists() else 0
        )

    def summary(self) -> str:
        """A human-readable description: model, status, examples, shards, points, labels, size."""
        m = self._m
        size = human_bytes(self.size_on_disk())
        status = "complete" if m["complete"] else "INCOMPLETE (capture unfinished; continue it with --resume)"
        lines = [
            f"ActivationStore at {self.path}",
            f"  model: {json.dumps(m['model'])}",
            f"  status: {status}",
            f"  examples: {self.n_examples} in {len(self._records)} shards, {size} on disk",
            f"  created {m.get('created', '?')} with uniprobe {m.get('toolkit_version', '?')}",
            "  points:",
        ]
        missing = [i for i in range(len(self._spans)) if i not in self._records]
        if missing:
            lines.insert(4, f"  shards not written yet: {missing}")
        dtype = m["dtype"] or "?"
        for p in m["points"]:
            roles: Counter = Counter()
            for rec in self._records.values():
                roles.update(rec["role_rows"][p])
            shape = m["feature_shapes"].get(p, "?")
            per_role = ", ".join(f"{k} {v}" for k, v in roles.items()) or "none"
            lines.append(f"    {p}  {shape} {dtype}  rows {sum(roles.values())}: {per_role}")
        keys = self.label_keys
        lines.append("  labels:" + ("" if keys else " none"))
        for key in keys:
            values = Counter(json.dumps(v) for v in self.labels(key))
            if len(values) <= 10:
                classes = ", ".join(f"{k}: {v}" for k, v in sorted(values.items()))
                lines.append(f"    {key}: {len(values)} values — {classes}")
            else:
                lines.append(f"    {key}: {len(values)} distinct values")
        if m.get("attrs"):
            lines.append(f"  attrs: {json.dumps(m['attrs'])}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        n_shards = len(self._records)
        return f"ActivationStore({str(self.path)!r}, {self.n_examples} examples, {n_shards} shards, {state})"
