"""Canonical hook-point names: one scheme for every model family.

Per block ``i``: ``blocks.{i}.resid_pre`` (the block's input), ``blocks.{i}.attn_out`` (the
attention sub-layer's output, before it is added to the stream), ``blocks.{i}.mlp_out``,
``blocks.{i}.resid_post`` (the block's output). Whole model: ``embed`` (what the first block
reads: token embeddings with any image features already merged in — the same tensor as
``blocks.0.resid_pre``), ``final_norm`` (output of the final norm) and ``lm_head.in`` (input
of the text unembedding). Families add their own (``gen_head.in`` for Janus, ``queries`` and
``connector.out`` for query-based models, ...).

Attention internals per block (:mod:`uniprobe.hooks.attn_capture`): ``blocks.{i}.attn.q|k|v``,
``.scores``, ``.pattern``, ``.z``, ``.head_out``. They are not in a model's point list (callers that
iterate it keep getting the stream points); a pattern resolves against them only when it matches no
stream point (``blocks.*.attn.pattern`` does, ``blocks.3.*`` still means the four stream points).

Patterns may be globs (``blocks.*.resid_post``) and TransformerLens names are accepted as
aliases (``blocks.3.hook_resid_post``, ``hook_embed``, ``ln_final.hook_normalized``,
``blocks.3.attn.hook_pattern``, ``blocks.3.attn.hook_z``, ``blocks.3.attn.hook_result``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from uniprobe.hooks.errors import UniprobeError

BLOCK_POINTS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
MODEL_POINTS: tuple[str, ...] = ("embed", "final_norm", "lm_head.in")

_TL_BLOCK = re.compile(r"^blocks\.(\d+|\*)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_TL_ATTN = re.compile(r"^blocks\.(\d+|\*)\.attn\.hook_(q|k|v|z|pattern|attn_scores|result)$")
_TL_ATTN_KIND = {"attn_scores": "scores", "result": "head_out"}
_TL_NAMES = {
    "hook_embed": "embed",
    "embed.hook_out": "embed",
    "ln_final.hook_normalized": "final_norm",
    "ln_final.hook_out": "final_norm",
    "unembed.hook_in": "lm_head.in",
}
# canonical -> TransformerLens TransformerBridge name
_TO_TL_MODEL = {
    "embed": "blocks.0.hook_resid_pre",
    "final_norm": "ln_final.hook_out",
    "lm_head.in": "unembed.hook_in",
}


def block_points(n_layers: int) -> list[str]:
    """All per-block points of a model with ``n_layers`` blocks, in execution order."""
    return [f"blocks.{i}.{p}" for i in range(n_layers) for p in BLOCK_POINTS]


def canonical(name: str) -> str:
    """Translate a TransformerLens alias to the canonical name (other names pass through)."""
    m = _TL_BLOCK.match(name)
    if m:
        return f"blocks.{m.group(1)}.{m.group(2)}"
    m = _TL_ATTN.match(name)
    if m:
        return f"blocks.{m.group(1)}.attn.{_TL_ATTN_KIND.get(m.group(2), m.group(2))}"
    return _TL_NAMES.get(name, name)


def to_transformer_lens(point: str) -> str:
    """The TransformerLens ``TransformerBridge`` hook name of a canonical point."""
    m = re.match(r"^blocks\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_out)$", point)
    if m:
        return f"blocks.{m.group(1)}.hook_{m.group(2)}"
    if point in _TO_TL_MODEL:
        return _TO_TL_MODEL[point]
    raise KeyError(f"hook point {point!r} has no TransformerLens counterpart")


def layer_of(point: str) -> int | None:
    """Block index of a per-block point, else None."""
    m = re.match(r"^blocks\.(\d+)\.", point)
    return int(m.group(1)) if m else None


class UnknownHookPointError(UniprobeError, KeyError):
    """A requested hook point does not exist on this model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _explain(pattern: str, available: Sequence[str]) -> str:
    n_blocks = len({layer_of(p) for p in available if layer_of(p) is not None})
    layer = layer_of(pattern)
    msg = f"no hook point {pattern!r}"
    if layer is not None and layer >= n_blocks:
        msg += f" — model has {n_blocks} blocks (0..{n_blocks - 1})"
    near = difflib.get_close_matches(pattern, list(available), n=3, cutoff=0.5)
    if near:
        msg += f"; nearest: {', '.join(near)}"
    kinds = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", p) for p in available})
    msg += f". Valid points: {', '.join(kinds)} (blocks 0..{n_blocks - 1})"
    return msg


def expand(patterns: str | Iterable[str], available: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Resolve names, globs and TransformerLens aliases against ``available``.

    Returns the matching points in ``available`` order (execution order), without duplicates.
    ``extra`` (attention points): matched only by a pattern that matches nothing in ``available``;
    they follow in ``extra`` order. Raises :class:`UnknownHookPointError` naming the bad pattern
    and the nearest valid points.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen: set[str] = set()
    for raw in patterns:
        pat = canonical(raw)
        hits = [p for p in available if fnmatch.fnmatchcase(p, pat)]
        hits = hits or [p for p in extra if fnmatch.fnmatchcase(p, pat)]
        if not hits:
            raise UnknownHookPointError(_explain(pat, [*available, *extra]))
        chosen.update(hits)
    if not chosen:
        raise UnknownHookPointError("no hook points requested")
    return [p for p in [*available, *extra] if p in chosen]
