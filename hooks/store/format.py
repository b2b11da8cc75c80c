"""The on-disk format of an activation store: names, constants and the manifest's JSON.

A store is a directory::

    DIR/manifest.json             what the store holds; rewritten atomically after every shard
    DIR/shard-00000.safetensors   one shard per captured batch
    DIR/shard-00001.safetensors   ...
    DIR/.uniprobe-writer.lock     only while a writer is open (not data; :mod:`.lock`)

A shard holds, for every hook point ``P``, the columns of a :class:`~uniprobe.hooks.rows.Rows` table:
``P/values`` ``[n, *feature]`` and the int64 ``[n]`` columns ``P/example`` (*global* example index),
``P/pos``, ``P/role``, ``P/step`` and ``P/branch``, and the float32 ``[n]`` column ``P/timestep`` (the
denoising timestep of each row, NaN where none; shards written before it existed lack it and read as
NaN — an optional column, so the schema version stays 2). A capture that generated continuous
latents (a diffusion decoder's samples) also puts them in the shard, ``generated``
``[n_examples, *latent]`` (:data:`GENERATED_KEY`; the shard's record then lists their shape). Its
safetensors header (:data:`META_KEY`) also
carries the shard's own record (index, first global example, the example dicts, model, points, dtype,
row counts and, from schema 2 on, the roles list and the capture identity), so a lost or damaged
manifest can be rebuilt by a resumed capture, and a manifest edited afterwards is caught.

The manifest records ``schema_version``, ``toolkit_version``, ``model`` (the caller's dict), ``points``,
``feature_shapes``, ``dtype``, ``roles``, ``n_examples``, ``examples`` (``id``, ``labels``, ``meta``,
``layout`` as role ids, ``shard``), ``shards`` (``file``, ``index``, ``sha256``, ``bytes``,
``n_examples``, ``examples`` = ``[first, last + 1]``, ``rows`` and ``role_rows`` per point),
``complete``, ``created``, free ``attrs`` and, from schema 2 on, ``identity`` (the capture's settings,
or null) and ``manifest_digest``.

**Schema versions.** This toolkit writes schema 2 and reads 1 and 2. Schema 1 stores (no identity,
no digest, shard headers without roles list and identity) open and read as before, with the checks
their files allow; resuming one upgrades its manifest to schema 2.

**Global example indices** are cumulative over shard indices: the examples of shard ``i`` are numbered
from the number of examples in shards ``0..i-1``. Shards are therefore written in index order.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.rows import N_BRANCHES, Rows
from uniprobe.hooks.store.errors import StoreCorruptError
from uniprobe.hooks.store.files import inside

SCHEMA_VERSION = 2  # written; 1 is still read (see the module docstring)
MANIFEST = "manifest.json"
INDEX_COLUMNS: tuple[str, ...] = ("example", "pos", "role", "step", "branch")
# float32 columns a shard may lack (written before they existed): read as NaN then
FLOAT_COLUMNS: tuple[str, ...] = ("timestep",)
GENERATED_KEY = "generated"  # a shard's generated latents [n_examples, *latent], when captured
VERIFY_MODES: tuple[str, ...] = ("lazy", "full", "none")
SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
META_KEY = "uniprobe.shard"  # the shard header's metadata key
DIGEST_KEY = "manifest_digest"  # the manifest field holding the digest of the others
EXAMPLE_KEYS: tuple[str, ...] = ("id", "labels", "meta", "layout")  # of each example, manifest and header
REQUIRED_KEYS = (
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
REQUIRED_V2 = ("identity", DIGEST_KEY)
# safetensors header dtype codes, to check a shard's dtypes without reading its data
ST_DTYPE = {
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
# the fixes error messages name (library spelling: a command line adds its flag names)
FIX_SHARD = "delete that shard file and re-run capture with resume=True to rewrite it"
FIX_MANIFEST = (
    "restore the original manifest.json, or re-run capture with resume=True to rebuild it "
    "from the shard headers"
)


def toolkit_version() -> str:
    try:
        return importlib.metadata.version("uniprobe")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_files(path: Path) -> dict[int, Path]:
    if not path.is_dir():
        return {}
    out = {}
    for p in path.iterdir():
        m = SHARD_RE.match(p.name)
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


def json_value(obj: Any, what: str) -> Any:
    """``obj`` as it will read back from JSON (tuples become lists), or a ValueError naming ``what``."""
    try:
        return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON data (no pickle in stores): {e}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreCorruptError(f"manifest names an unknown dtype {name!r}")
    return dtype


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dumps_manifest(manifest: dict) -> str:
    """Readable JSON: one top-level key per line, one example / shard per line."""
    lines = []
    for key, value in manifest.items():
        if key in ("examples", "shards") and value:
            items = ",\n".join("    " + json.dumps(v) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def near(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def read_manifest_json(path: Path) -> dict:
    """The parsed manifest of the store at ``path`` (no consistency checks)."""
    file = path / MANIFEST
    if not file.exists():
        n = len(shard_files(path))
        if n:
            raise StoreCorruptError(
                f"{file} is missing but {path} holds {n} shard files; re-run capture with resume=True "
                "to rebuild the manifest from the shard headers"
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
            f"{file} is not valid JSON ({e}); re-run capture with resume=True to rebuild it "
            "from the shard headers"
        ) from None
    if not isinstance(manifest, dict):
        raise StoreCorruptError(f"{file} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def new_manifest(model: dict, points: list[str], attrs: dict, identity: dict | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "toolkit_version": toolkit_version(),
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


# -- what goes into a shard ---------------------------------------------------------------------------


def normalize_examples(index: int, examples: list[dict]) -> list[dict]:
    """The example dicts of shard ``index`` as stored: ``id``, ``labels``, ``meta`` as plain JSON,
    ``layout`` a list of role ids, ``shard``; a TypeError / ValueError names a bad example."""
    out = []
    for i, ex in enumerate(examples):
        where = f"shard {index}, example {i}"
        if not isinstance(ex, Mapping):
            raise TypeError(f"{where}: examples must be dicts, got {type(ex).__name__}")
        unknown = sorted(set(ex) - set(EXAMPLE_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; example keys are {list(EXAMPLE_KEYS)}")
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
        d = json_value(d, where)
        d["layout"] = layout
        d["shard"] = index
        out.append(d)
    return out


def shard_tensors(
    index: int, rows: Mapping[str, Rows], manifest: Mapping, n_examples: int, first: int
) -> tuple[
    dict[str, torch.Tensor], dict[str, int], dict[str, dict[str, int]], dict[str, list[int]], torch.dtype
]:
    """The tensors of shard ``index`` (``P/values`` ``[n, *feature]``, int64 ``[n]`` index columns with
    global ``example`` = batch-local + ``first``), with rows per point, rows per role per point, feature
    shapes and the dtype; a ValueError / TypeError names what does not fit ``manifest``."""
    points = list(manifest["points"])
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
    limits = {"example": n_examples, "role": len(ROLES), "branch": N_BRANCHES}
    for p in points:
        r = rows[p]
        if not isinstance(r, Rows):
            raise TypeError(f"shard {index}, point {p!r}: expected Rows, got {type(r).__name__}")
        v = r.values
        if not isinstance(v, torch.Tensor) or v.dim() < 1:
            raise ValueError(f"shard {index}, point {p!r}: values must be a tensor [n, *feature]")
        n, shape = v.shape[0], list(v.shape[1:])
        known = manifest["feature_shapes"].get(p)
        if known is not None and known != shape:
            raise ValueError(
                f"shard {index}, point {p!r}: values have feature shape {shape} ([n, *feature] = "
                f"{list(v.shape)}) but earlier shards have {known}"
            )
        if manifest["dtype"] is not None and dtype_name(v.dtype) != manifest["dtype"]:
            raise ValueError(
                f"shard {index}, point {p!r}: values are {dtype_name(v.dtype)} but the store holds "
                f"{manifest['dtype']}; cast before writing"
            )
        if dtype is None:
            dtype, first_point = v.dtype, p
        elif v.dtype != dtype:
            raise ValueError(
                f"shard {index}: point {p!r} has dtype {dtype_name(v.dtype)} but {first_point!r} has "
                f"{dtype_name(dtype)}; a store holds one dtype, cast before writing"
            )
        tensors[f"{p}/values"] = v.detach().cpu().contiguous()
        for c in INDEX_COLUMNS:
            col = getattr(r, c)
            col = torch.as_tensor(col)
            if col.dtype.is_floating_point or col.dtype.is_complex or col.dtype == torch.bool:
                raise ValueError(f"shard {index}, point {p!r}: column {c!r} must be integer, got {col.dtype}")
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
        for c in FLOAT_COLUMNS:
            col = torch.as_tensor(getattr(r, c))
            if not col.dtype.is_floating_point or col.dim() != 1 or col.shape[0] != n:
                raise ValueError(
                    f"shard {index}, point {p!r}: column {c!r} must be float [{n}] (values have {n} rows), "
                    f"got {col.dtype} {list(col.shape)}"
                )
            tensors[f"{p}/{c}"] = col.detach().cpu().to(torch.float32).contiguous()
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
