"""The identity of a capture: what a resumed capture must repeat exactly.

A store's shards are numbered batches of a deterministic capture, so resuming with other settings
would merge two captures: another batch size, another shard size (examples per shard file) or
another (or reordered) prompts file puts other examples under the finished shards' global indices,
other roles / positions / mode / dtype / adapter / backend store other rows. :func:`capture_identity`
records those settings (with a digest of the prompts) in the manifest;
:meth:`ActivationStore.create(..., resume=True)
<uniprobe.hooks.store.ActivationStore.create>` compares it, with the model and points, and refuses a
difference naming every differing field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

IDENTITY_FIELDS: tuple[str, ...] = (
    "prompts",
    "batch_size",
    "shard_size",
    "roles",
    "positions",
    "mode",
    "dtype",
    "adapter",
    "backend",
)


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` canonically: tensors / arrays by dtype, shape and bytes, the rest as JSON."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().contiguous()
        h.update(f"tensor:{value.dtype}:{list(value.shape)}:".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif hasattr(value, "tobytes") and hasattr(value, "shape"):  # numpy array
        h.update(f"array:{value.dtype}:{list(value.shape)}:".encode())
        h.update(value.tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL image
        h.update(f"image:{getattr(value, 'mode', '?')}:{list(value.size)}:".encode())
        h.update(value.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(json.dumps(str(k)).encode() + b":")
            _feed(h, value[k])
            h.update(b",")
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[")
        for v in value:
            _feed(h, v)
            h.update(b",")
        h.update(b"]")
    else:
        # numbers, strings, None, bools; anything else by its type name only (its repr may hold an
        # address that changes every run)
        try:
            h.update(json.dumps(value).encode())
        except (TypeError, ValueError):
            h.update(f"<{type(value).__name__}>".encode())


def prompts_digest(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"n_examples", "sha256"}`` of the examples in order: every key (id, input ids, labels, meta,
    pixel values, ...) of every example counts, so another, reordered or edited prompts file differs."""
    h = hashlib.sha256()
    for ex in examples:
        _feed(h, ex)
        h.update(b"\n")
    return {"n_examples": len(examples), "sha256": h.hexdigest()}


def adapter_identity(adapter: Any) -> dict[str, Any]:
    """The adapter's name and a digest of its data (module paths, family points)."""
    data = {k: getattr(adapter, k, None) for k in ("name", "blocks", "final_norm", "lm_head", "attn", "mlp")}
    extra = getattr(adapter, "extra", {}) or {}
    data["extra"] = {k: [getattr(s, f, None) for f in ("module", "io", "index")] for k, s in extra.items()}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": getattr(adapter, "name", None), "sha256": digest}


def capture_identity(
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    shard_size: int | None = None,
    roles: Iterable[str] | None,
    positions: Iterable[int] | None,
    mode: str,
    dtype: Any,
    adapter: Any,
    backend: str,
) -> dict[str, Any]:
    """The JSON identity of a capture (see the module docstring); roles and positions are filters,
    so their order does not count. ``shard_size`` None: one shard per batch (``batch_size``)."""
    return {
        "prompts": prompts_digest(examples),
        "batch_size": int(batch_size),
        "shard_size": int(batch_size if shard_size is None else shard_size),
        "roles": None if roles is None else sorted(set(roles)),
        "positions": None if positions is None else sorted({int(p) for p in positions}),
        "mode": mode,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "adapter": adapter_identity(adapter),
        "backend": backend,
    }


def _show(value: Any) -> str:
    if isinstance(value, Mapping) and "sha256" in value:
        rest = ", ".join(f"{k} {v}" for k, v in value.items() if k != "sha256")
        return f"{rest + ', ' if rest else ''}sha256 {str(value['sha256'])[:12]}…"
    return json.dumps(value)


def identity_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """``"field: store X vs now Y"`` for every field that differs.

    A store captured before shard sizes existed wrote one shard per batch: its missing
    ``shard_size`` is its ``batch_size``."""
    if "shard_size" not in stored and "batch_size" in stored:
        stored = {**stored, "shard_size": stored["batch_size"]}
    out = []
    for key in dict.fromkeys([*IDENTITY_FIELDS, *stored, *requested]):
        old, new = stored.get(key), requested.get(key)
        if old != new:
            out.append(f"{key}: store {_show(old)} vs now {_show(new)}")
    return out
