"""Cross-prompt patching: states of one run (understanding: "what is 2+1?") written into another
(generation: "draw 2+1 apples"), with positions aligned explicitly — never guessed.

An :class:`Alignment` is a list of ``(target_pos, source_pos)`` pairs with labels. Build it

- by role (:func:`align_by_role`): the i-th position of a role in the source ↔ the i-th in the
  target; the counts must match;
- by marked anchor tokens (:func:`align_by_anchors`): each anchor (a token id, or a tuple of ids
  for a multi-token marker) must occur exactly once in each prompt;
- by the ends of the prompts (:func:`align_end`): last ↔ last, and so on back;
- explicitly (:func:`alignment`): any pairs, checked against both lengths.

Ambiguous (an anchor found twice) or mismatched (4 query positions against 8) alignments raise.
Then :func:`patch_across` runs the batched exact engine with the source states at those pairs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching.cached_run import cached_run
from uniprobe.probes.patching.engine import (
    DEFAULT_BUDGET,
    Forward,
    Metric,
    collect_states,
    evaluate,
    forward_of,
    run_sites,
)
from uniprobe.probes.patching.exact import prepare_metric
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.results import PatchResult
from uniprobe.probes.patching.sites import PatchSite, SiteGrid, as_site_list, mapped_sites


@dataclass
class Alignment:
    """``pairs[i] = (target_pos, source_pos)``, ``labels[i]`` names the pair."""

    pairs: list[tuple[int, int]]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.pairs)

    def sites(
        self, n_layers: int, kinds: Sequence[str] = ("resid_pre",), *, layers: Sequence[int] | None = None,
        together: bool = False,
    ) -> SiteGrid:  # fmt: skip
        """A :class:`SiteGrid` over ``kind × layer × pair`` (or all pairs in one column)."""
        return mapped_sites(
            n_layers,
            self.pairs,
            kinds,
            layers=layers,
            labels=None if together else self.labels,
            together=together,
        )


def alignment(
    pairs: Sequence[tuple[int, int]], source_len: int, target_len: int, labels: Sequence[str] | None = None
) -> Alignment:
    """An explicit position map, checked: in range, and no target position written twice."""
    pairs = [(int(t), int(s)) for t, s in pairs]
    if not pairs:
        raise ValueError("empty alignment: nothing to patch")
    for t, s in pairs:
        if not 0 <= t < target_len:
            raise ValueError(f"target position {t} is outside the target run (0..{target_len - 1})")
        if not 0 <= s < source_len:
            raise ValueError(f"source position {s} is outside the source run (0..{source_len - 1})")
    targets = [t for t, _ in pairs]
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise ValueError(f"ambiguous alignment: target positions {dup} are mapped more than once")
    names = list(labels) if labels is not None else [f"{t}←{s}" for t, s in pairs]
    if len(names) != len(pairs):
        raise ValueError(f"{len(names)} labels for {len(pairs)} pairs")
    return Alignment(pairs, names)


def align_by_role(
    source_layout: TokenLayout, target_layout: TokenLayout, roles: str | Sequence[str], example: int = 0
) -> Alignment:
    """The i-th position of each role in the source ↔ the i-th in the target (counts must match)."""
    roles = [roles] if isinstance(roles, str) else list(roles)
    pairs: list[tuple[int, int]] = []
    labels: list[str] = []
    for role in roles:
        src = source_layout.positions(example, role)
        tgt = target_layout.positions(example, role)
        if len(src) != len(tgt) or not src:
            raise ValueError(
                f"cannot align role {role!r}: {len(src)} positions in the source run, {len(tgt)} in the "
                "target; align by anchors or give an explicit map"
            )
        pairs += list(zip(tgt, src))
        labels += [f"{role}{i}" for i in range(len(src))]
    return alignment(pairs, source_layout.length, target_layout.length, labels)


def _find(ids: list[int], anchor: tuple[int, ...]) -> list[int]:
    k = len(anchor)
    return [i for i in range(len(ids) - k + 1) if tuple(ids[i : i + k]) == anchor]


def align_by_anchors(
    source_ids: Sequence[int] | torch.Tensor,
    target_ids: Sequence[int] | torch.Tensor,
    anchors: Sequence[int | Sequence[int]],
    names: Sequence[str] | None = None,
) -> Alignment:
    """Align the positions of marked anchor tokens (each must occur exactly once in each prompt).

    Args:
        source_ids, target_ids: ``[pos]`` token ids of the two runs.
        anchors: token ids, or tuples of ids (a multi-token marker: every token of it is aligned).
        names: labels of the anchors (default: the ids).
    """
    src = [int(t) for t in torch.as_tensor(source_ids).flatten().tolist()]
    tgt = [int(t) for t in torch.as_tensor(target_ids).flatten().tolist()]
    pairs: list[tuple[int, int]] = []
    labels: list[str] = []
    for j, raw in enumerate(anchors):
        anchor = (int(raw),) if isinstance(raw, int) else tuple(int(a) for a in raw)
        name = names[j] if names else "+".join(map(str, anchor))
        hits = {"source": _find(src, anchor), "target": _find(tgt, anchor)}
        for side, found in hits.items():
            if len(found) != 1:
                what = "missing from" if not found else f"ambiguous: found {len(found)} times in"
                raise ValueError(f"anchor {name!r} is {what} the {side} prompt (positions {found})")
        for k in range(len(anchor)):
            pairs.append((hits["target"][0] + k, hits["source"][0] + k))
            labels.append(name if len(anchor) == 1 else f"{name}[{k}]")
    return alignment(pairs, len(src), len(tgt), labels)


def align_end(source_len: int, target_len: int, n: int | None = None) -> Alignment:
    """Right-aligned: the last ``n`` positions (default: the shorter length) of both runs."""
    n = min(source_len, target_len) if n is None else n
    if n > min(source_len, target_len):
        raise ValueError(f"cannot align {n} end positions: runs have {source_len} and {target_len}")
    pairs = [(target_len - n + i, source_len - n + i) for i in range(n)]
    return alignment(pairs, source_len, target_len, [f"end-{n - i}" for i in range(n)])


def patch_across(
    model: nn.Module,
    source: ModelInputs,
    target: ModelInputs,
    sites: SiteGrid | Sequence[PatchSite],
    metric: Metric,
    *,
    clean_target: ModelInputs | None = None,
    clean_value: float | None = None,
    adapter: Adapter | None = None,
    source_forward: Forward | None = None,
    target_forward: Forward | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    resume: bool = True,
) -> PatchResult:
    """Write ``source``-run states into the ``target`` run at aligned sites; measure on the target.

    Args:
        source: the run states come from (e.g. understanding inputs), run by ``source_forward``.
        target: the patched run (e.g. a generation run, teacher-forced by ``target_forward``);
            its unpatched metric is the *corrupted* baseline.
        sites: typically ``Alignment.sites(...)`` (explicit source positions).
        clean_target: a target-side run that does the right thing (e.g. the generation prompt of the
            source's problem); its metric is the *clean* baseline (or give ``clean_value``).
    Returns:
        :class:`PatchResult` (``direction="cross"``), normalised by the two baselines.
    """
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    src_fwd, tgt_fwd = forward_of(adapter, source_forward), forward_of(adapter, target_forward)
    site_list, grid = as_site_list(sites)
    _, states = collect_states(model, adapter, source, [s.point for s in site_list], src_fwd)
    tr = cached_run(model, adapter, target, target_forward, [s.point for s in site_list])
    b = tr.batch
    clean_v: float
    if clean_target is not None:
        with torch.no_grad():
            clean_out: Any = tgt_fwd(model, clean_target)
        prepare_metric(metric, clean_out)
        clean_v = float(evaluate(metric, clean_out, b).mean())
    elif clean_value is not None:
        clean_v = float(clean_value)
    else:
        raise ValueError(
            "patch_across needs clean_target (a target-side run of the clean problem) or clean_value"
        )
    corrupted_v = float(evaluate(metric, tr.outputs, b).mean())
    run = run_sites(
        model, adapter, target, site_list, states, metric,
        forward=tgt_fwd, tr=tr, budget_bytes=budget_bytes, resume=resume,
    )  # fmt: skip
    return PatchResult(
        values=run.values,
        clean=clean_v,
        corrupted=corrupted_v,
        sites=site_list,
        grid=grid,
        method="exact",
        direction="cross",
        metric=metric_name(metric),
        seconds=time.perf_counter() - t0,
        info={**run.info(), "patch_seconds": run.seconds, "notes": []},
    )
