"""The one mapping from dtype names (as the CLI and sweep configs spell them) to torch dtypes."""

from __future__ import annotations

import torch
from uniprobe.hooks.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_of(name: str | None) -> torch.dtype | None:
    """The torch dtype called ``name`` (``None`` stays ``None``: keep the dtype as captured)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]
