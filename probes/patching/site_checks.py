"""What a patch site really writes: head counts of head sites, no-op sites, and trimming the positions
where a site would write the target's own values (all exact: writing a bitwise-equal value changes
nothing). Used by the engine (:mod:`uniprobe.probes.patching.engine`) to plan its forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter
from uniprobe.probes.patching.cached_run import CachedRun
from uniprobe.probes.patching.sites import PatchSite


def head_counts(model: nn.Module, adapter: Adapter, sites: Sequence[PatchSite]) -> dict[str, int]:
    """Point → number of attention heads, for every point that has a head site (head indices checked)."""
    from uniprobe.hooks.attention import attention_geometry

    counts: dict[str, int] = {}
    for s in sites:
        if s.head is None or s.layer is None:
            continue
        if s.point not in counts:
            counts[s.point] = attention_geometry(model, adapter, s.layer).n_heads
        if s.head >= counts[s.point]:
            raise IndexError(f"site {s.point} head {s.head}: the attention has {counts[s.point]} heads")
    return counts


def is_noop(
    site: PatchSite, source: dict[str, torch.Tensor], tr: CachedRun, heads: dict[str, int] | None = None
) -> bool:
    """Whether the site writes exactly the values the target already has (bitwise)."""
    tgt = tr.values.get(site.point)
    src = source[site.point]
    if tgt is None or tgt.shape[2:] != src.shape[2:]:
        return False
    if max(site.src) >= src.shape[1] or max(site.positions) >= tgt.shape[1]:
        return False
    return not bool(_changed(site, src, tgt, heads).any())


def _changed(
    site: PatchSite, src: torch.Tensor, tgt: torch.Tensor, heads: dict[str, int] | None
) -> torch.Tensor:
    """``[k]`` bool: whether the site writes something new at each of its positions (any row)."""
    a = src[:, list(site.src)].expand(tgt.shape[0], len(site.src), *src.shape[2:])
    b = tgt[:, list(site.positions)]
    if site.head is not None:
        n_h = (heads or {}).get(site.point, 1)
        a, b = (x.reshape(*x.shape[:2], n_h, -1)[:, :, site.head] for x in (a, b))
    return (a != b).reshape(a.shape[0], a.shape[1], -1).any(-1).any(0)


def trim_site(
    site: PatchSite, source: dict[str, torch.Tensor], tr: CachedRun, heads: dict[str, int] | None = None
) -> PatchSite:
    """``site`` without the positions where it would write the target's own values (bitwise): an exact
    no-op there. Returned unchanged when nothing can be dropped (or the values are not comparable)."""
    tgt, src = tr.values.get(site.point), source[site.point]
    if len(site.positions) < 2 or tgt is None or tgt.shape[2:] != src.shape[2:]:
        return site
    if max(site.src) >= src.shape[1] or max(site.positions) >= tgt.shape[1]:
        return site
    keep = _changed(site, src, tgt, heads).tolist()
    if all(keep) or not any(keep):
        return site
    pos = tuple(p for p, k in zip(site.positions, keep) if k)
    src_pos = None if site.source_positions is None else tuple(p for p, k in zip(site.src, keep) if k)
    return dataclasses.replace(site, positions=pos, source_positions=src_pos)
