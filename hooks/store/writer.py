"""Writing a store: create (new, ``overwrite`` or ``resume``), write shards in order, finalize.

**One writer at a time.** ``create`` takes the writer lock ``DIR/.uniprobe-writer.lock`` (:mod:`.lock`
says why a lock file and not ``flock``); a second writer gets :class:`StoreLockedError` naming the
holder's pid and host. The lock is released by ``finalize()``, ``close()`` (also ``with
ActivationStore.create(...) as store:``), garbage collection, and errors inside ``create``; a stale
lock of a dead process on this host is recovered with a warning. Readers take no lock.

**Resume continues exactly the capture that was started** (:mod:`.resume`): ``create(...,
identity=...)`` records the capture's identity (:mod:`.identity`) and ``resume=True`` refuses another.

**Writes are atomic** (:mod:`.files`): a shard goes to a temp file in DIR, is fsynced and
``os.replace``-d into place, then the manifest is rewritten the same way. An interrupted capture keeps
every finished shard, and the manifest lists only shards whose file is complete, with its byte size and
sha256. A full disk raises :class:`StoreDiskFullError` and leaves no temp file behind. A shard file
that went bad can be deleted and rewritten by a resumed capture; its examples keep their global
indices, so the rewritten batch must hold the same example ids (capture batches deterministically).

**Labels** of one key must share one JSON type across the store (``0`` and ``"0"`` would become two
classes): ``write_shard`` raises :class:`MixedLabelTypesError` naming the key and example ids.
"""

from __future__ import annotations

import json
import os
import weakref
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store.errors import StoreCorruptError, StoreExistsError
from uniprobe.hooks.store.files import atomic_write, atomic_write_text, is_temp_name
from uniprobe.hooks.store.format import (
    DIGEST_KEY,
    EXAMPLE_KEYS,
    FIX_SHARD,
    GENERATED_KEY,
    MANIFEST,
    META_KEY,
    SCHEMA_VERSION,
    SHARD_RE,
    dtype_name,
    dumps_manifest,
    json_value,
    new_manifest,
    normalize_examples,
    read_manifest_json,
    sha256_file,
    shard_files,
    shard_name,
    shard_tensors,
)
from uniprobe.hooks.store.integrity import LabelTypes, manifest_digest
from uniprobe.hooks.store.lock import LOCK_NAME, StoreLock, is_lock_name

if TYPE_CHECKING:
    from uniprobe.hooks.store.reader import ActivationStore


class Writer:
    """Creating and writing an :class:`~uniprobe.hooks.store.ActivationStore` (a mixin: the store holds
    ``path``, ``_m`` the manifest, ``_records``, ``_spans`` each shard's ``[first, last + 1)`` examples,
    ``_writable``, ``_lock`` / ``_release`` and ``_label_types``)."""

    path: Path
    _m: dict
    _records: dict[int, dict]
    _spans: list[tuple[int, int]]
    _writable: bool
    _lock: StoreLock | None
    _release: weakref.finalize | None
    _label_types: LabelTypes | None
    _checked: set[int]
    _hashed: set[int]

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
                :func:`uniprobe.hooks.store.identity.capture_identity`), or None for a store written through
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
        model = json_value(model, "model")
        if not isinstance(model, dict):
            raise TypeError(f"model must be a dict, got {type(model).__name__}")
        points = list(points)
        if not points or not all(isinstance(p, str) and p for p in points):
            raise ValueError(f"points must be a non-empty list of hook-point names, got {points!r}")
        dupes = sorted(p for p, c in Counter(points).items() if c > 1)
        if dupes:
            raise ValueError(f"points are listed more than once: {dupes}")
        attrs = json_value(attrs or {}, "attrs")
        identity = json_value(identity, "identity")
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
        files = shard_files(path)
        if (path / MANIFEST).exists() or files:
            if resume:
                return cls._resume(path, model, points, attrs, identity)
            if not overwrite:
                raise StoreExistsError(cls._exists_message(path, files))
            cls._wipe(path)
        manifest = new_manifest(model, points, attrs, identity)
        store = cls(path, manifest, writable=True, verify="lazy", allow_holes=True)
        store._write_manifest()
        return store

    @staticmethod
    def _exists_message(path: Path, files: dict[int, Path]) -> str:
        try:
            manifest = read_manifest_json(path)
            n_done = len(manifest.get("shards", []))
            state = "complete" if manifest.get("complete") else "incomplete"
            what = f"{n_done} finished shards, {manifest.get('n_examples', '?')} examples, {state}"
        except (StoreCorruptError, FileNotFoundError):
            what = f"{len(files)} shard files, manifest missing or unreadable"
        return (
            f"an activation store already exists at {path} ({what}); pass resume=True to "
            "continue it, or overwrite=True to delete it and start again"
        )

    @staticmethod
    def _is_own_file(name: str) -> bool:
        """Whether ``name`` is one of a store's own files: manifest, shards, temp files, lock files."""
        return name == MANIFEST or bool(SHARD_RE.match(name)) or is_temp_name(name) or is_lock_name(name)

    @classmethod
    def _wipe(cls, path: Path) -> None:
        """Delete the store's own files (manifest, shards, temp files, stale lock files), never the
        writer lock held while wiping; anything else in DIR stays."""
        for p in path.iterdir():
            if cls._is_own_file(p.name) and p.name != LOCK_NAME:
                p.unlink()

    # -- writing --------------------------------------------------------------------------------------
    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` is finished (written and recorded in the manifest)."""
        return index in self._records

    @property
    def finished_shards(self) -> set[int]:
        """Indices of finished shards."""
        return set(self._records)

    def write_shard(
        self, index: int, rows: dict[str, Rows], examples: list[dict], generated: torch.Tensor | None = None
    ) -> None:
        """Write one captured batch as shard ``index`` and record it in the manifest.

        Args:
            index: shard index; shards are written in order 0, 1, ... (finished ones may be skipped).
            rows: hook point → :class:`Rows` with ``values`` ``[n, *feature]`` and batch-local
                ``example`` in ``0..len(examples)-1``; every store point must be present.
            examples: the batch's example dicts: ``id``, ``labels`` {key: value}, ``meta`` {...},
                ``layout`` (role ids of the example's positions, ``[pos]``).
            generated: the examples' generated latents ``[len(examples), *latent]`` (a diffusion
                decoder's samples), stored in the shard as ``generated`` (never in the JSON), or None.

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
                f"or {FIX_SHARD}"
            )
        n = len(examples)
        if n == 0:
            raise ValueError(f"shard {index}: examples is empty; a shard holds at least one example")
        exs = normalize_examples(index, examples)
        if index < len(self._spans):  # rewriting a shard whose file went bad: same examples as before
            first, last = self._spans[index]
            old_ids = [ex["id"] for ex in self._m["examples"][first:last]]
            new_ids = [ex["id"] for ex in exs]
            if new_ids != old_ids:
                raise ValueError(
                    f"shard {index} is being rewritten but holds example ids {new_ids[:5]}… where the store "
                    f"had {old_ids[:5]}… ({last - first} examples); capture must batch the same way to "
                    "resume, or pass overwrite=True to start again"
                )
        elif index == len(self._spans):
            first = self._spans[-1][1] if self._spans else 0
        else:
            raise ValueError(
                f"shards are written in index order: shard {index} needs shards 0..{index - 1} first "
                f"(this store has shard indices 0..{len(self._spans) - 1}); global example ids are "
                "cumulative over shard indices"
            )
        tensors, counts, role_counts, shapes, dtype = shard_tensors(index, rows, self._m, n, first)
        if generated is not None:
            if not isinstance(generated, torch.Tensor) or generated.dim() < 1 or generated.shape[0] != n:
                got = getattr(generated, "shape", type(generated).__name__)
                raise ValueError(
                    f"shard {index}: generated must be a tensor [n_examples={n}, *latent], got {got}"
                )
            tensors[GENERATED_KEY] = generated.detach().cpu().contiguous()
        if self._label_types is None:
            self._label_types = LabelTypes(self._m["examples"])
        self._label_types.add(exs)

        meta = {
            "schema_version": SCHEMA_VERSION,
            "index": index,
            "first": first,
            "model": self._m["model"],
            "points": self._m["points"],
            "dtype": dtype_name(dtype),
            "rows": counts,
            "role_rows": role_counts,
            "roles": self._m["roles"],
            "identity": self._m.get("identity"),
            "examples": [{k: ex[k] for k in EXAMPLE_KEYS} for ex in exs],
        }
        header = json.dumps(meta)
        digest, size = atomic_write(
            self.path / shard_name(index),
            lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: header}),
            what=f"shard {index} of the activation store {self.path}",
            needed=sum(t.numel() * t.element_size() for t in tensors.values()) + len(header),
            fix="re-run capture with resume=True to continue",
            inspect=lambda tmp: (sha256_file(tmp), tmp.stat().st_size),
        )
        file = self.path / shard_name(index)
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
            **({} if generated is None else {"generated": list(generated.shape[1:])}),
        }
        self._checked.add(index)
        self._hashed.add(index)
        if index < len(self._spans):
            self._m["examples"][first : first + n] = exs
        else:
            self._m["examples"].extend(exs)
            self._spans.append((first, first + n))
        self._m["feature_shapes"] = shapes
        self._m["dtype"] = dtype_name(dtype)
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
        (self.path / shard_name(index)).unlink(missing_ok=True)

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
            dumps_manifest(self._m),
            what=f"the manifest of the activation store {self.path}",
            fix="re-run capture with resume=True to continue",
        )
