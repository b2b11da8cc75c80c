"""Resuming a store: continue exactly the capture that was started (a part of the writer).

``create(..., resume=True)`` reopens a store to add its missing shards. The manifest to resume from is
the one written, or, when it is missing, unreadable or was edited afterwards, one rebuilt from the shard
headers (shards 0, 1, ... up to the first gap or unreadable one). The resume refuses another model,
other points or another capture identity (:mod:`.identity`) with :class:`ResumeMismatchError` naming
every differing field (old vs new); shards whose file is missing or has the wrong size are dropped so
that the capture rewrites them. A schema 1 store is upgraded to schema 2 (with a warning that the
capture identity of its finished shards cannot be checked).
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.store.errors import ResumeMismatchError, StoreCorruptError
from uniprobe.hooks.store.files import inside, is_temp_name
from uniprobe.hooks.store.format import (
    DIGEST_KEY,
    GENERATED_KEY,
    MANIFEST,
    META_KEY,
    SCHEMA_VERSION,
    new_manifest,
    read_manifest_json,
    sha256_file,
    shard_files,
)
from uniprobe.hooks.store.identity import identity_differences
from uniprobe.hooks.store.integrity import manifest_digest

if TYPE_CHECKING:
    from uniprobe.hooks.store.reader import ActivationStore


def diff_lists(have: list, want: list) -> str:
    missing = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    if not missing and not extra:
        return f"same points in a different order (store {have}, requested {want})"
    return f"requested but not in store: {missing}; in store but not requested: {extra}"


def diff_dicts(have: dict, want: dict) -> str:
    absent = object()
    return "; ".join(
        f"{k}: store {have.get(k, '<missing>')!r} vs requested {want.get(k, '<missing>')!r}"
        for k in sorted(set(have) | set(want))
        if have.get(k, absent) != want.get(k, absent)
    )


class Resume:
    """``create(..., resume=True)`` of :class:`~uniprobe.hooks.store.ActivationStore` (a mixin)."""

    _m: dict
    _records: dict[int, dict]

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
            problems.append(f"points differ ({diff_lists(manifest.get('points', []), points)})")
        if manifest.get("model") != model:
            problems.append(f"model differs ({diff_dicts(manifest.get('model', {}), model)})")
        if manifest.get("roles") != list(ROLES):
            problems.append(f"roles differ (store {manifest.get('roles')}, toolkit {list(ROLES)})")
        problems += identity_differences(manifest.get("identity") or {}, identity or {})
        if problems:
            raise ResumeMismatchError(
                f"cannot resume the store at {path}: this run differs from the capture that started it — "
                f"{'; '.join(problems)}. A resumed capture must continue exactly the capture that was "
                "started: re-run with the same model, points, prompts file and settings (batch size, "
                "roles, positions, mode, dtype, adapter, backend), pass overwrite=True to "
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
            manifest = read_manifest_json(path)
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
        manifest = new_manifest(model, points, attrs, identity)
        files = shard_files(path)
        for index in sorted(files):
            file = files[index]
            if not inside(path, file):
                warnings.warn(
                    f"{file} leads outside {path}; it and later shards will be rewritten", stacklevel=6
                )
                break
            try:
                with safe_open(str(file), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})[META_KEY])
                    shapes = {p: f.get_slice(f"{p}/values").get_shape()[1:] for p in meta["points"]}
                    keys = set(f.keys())
                    latents = f.get_slice(GENERATED_KEY).get_shape()[1:] if GENERATED_KEY in keys else None
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
                    "to start again"
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
                    "sha256": sha256_file(file),
                    "bytes": file.stat().st_size,
                    "n_examples": n,
                    "examples": [first, first + n],
                    "rows": meta["rows"],
                    "role_rows": meta["role_rows"],
                    **({} if latents is None else {"generated": list(latents)}),
                }
            )
        manifest["attrs"]["rebuilt_manifest"] = datetime.now(UTC).isoformat(timespec="seconds")
        return manifest
