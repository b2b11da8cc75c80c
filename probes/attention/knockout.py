"""Attention knockout: remove the edges from query positions to key positions at chosen layers (and heads).

    kos = knockout_grid(model, inputs, query_roles=["image_gen"],
                        key_groups={"question": ["text"], "cot": ["cot"]})       # every layer × group
    res = knockout_sweep(model, inputs, kos, LogitDiff(t, f))                    # a PatchResult
    res.as_grid(False)[0]                                                        # [layer, group] metric

A :class:`Knockout` removes, at each of its ``layers`` (only in ``heads`` when given), every edge from a
query whose role/position is selected to a key whose role/position is selected: the attention logit of
that edge becomes the dtype's minimum before the softmax (Geva et al. 2023; "Narrow Gate",
arXiv 2412.06646), through the attention-function interception of :mod:`uniprobe.hooks.attention`
(the mask the model built keeps its form: bool for sdpa, additive for eager). **Rule:** a position's
edge to itself is never removed, so no query row is left with nothing to attend to (no NaN).

**Batched like the patching engine** (:mod:`uniprobe.probes.patching.engine`): the unknocked run is
recorded once (:func:`~uniprobe.probes.patching.cached_run.cached_run`); configuration ``i`` × example
``b`` is batch row ``i·B + b`` with its own 4-D edge mask; blocks before a configuration's first
knocked layer are not recomputed (they return the recorded stream); and, for plain causal LMs whose
metric reads only the last position, positions before the first knocked query are not recomputed
either (their keys/values come from the recorded cache). Chunks hold at most ``budget_bytes`` of
activations. :func:`knockout_reference` is the definition it is tested against: one plain forward per
configuration, the knocked layers' attention handed an explicit 4-D mask (causal, padding, minus the
edges) by a pre-hook — the nnsight / TransformerLens way.

Results are a :class:`~uniprobe.probes.patching.results.PatchResult` (``method="knockout"``): one site
per configuration at ``blocks.{first layer}.attn.pattern``, labelled by its key group; ``clean`` is the
metric unknocked and ``corrupted`` the metric with every configuration's edges removed at every listed
layer at once, so ``normalised`` is 1 for no effect and 0 for the effect of the full knockout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.attention import AttnCall, attention_geometry, attention_module, intercept_attention
from uniprobe.hooks.errors import UsageError
from uniprobe.hooks.hookset import HookSet
from uniprobe.hooks.layout import TokenLayout, role_ids
from uniprobe.probes.patching.cached_run import CachedRun, cached_run
from uniprobe.probes.patching.engine import (
    DEFAULT_BUDGET,
    _rows,
    _suffix_ok,
    evaluate,
    forward_of,
    plan_chunks,
    resumed_forward,
    resumed_rows,
)
from uniprobe.probes.patching.exact import prepare_metric
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.results import PatchResult
from uniprobe.probes.patching.sites import PatchSite, SiteGrid

Metric = Callable[[Any], torch.Tensor]
Forward = Callable[[nn.Module, ModelInputs], Any]


@dataclass(frozen=True)
class Knockout:
    """Edges to remove: from the selected queries to the selected keys, at ``layers`` (``heads``: all).

    Queries and keys are each chosen by roles (``query_roles=("image_gen",)``) or by positions
    (``key_positions=(0, 1)``; negative ones count from the end), not both. ``label`` names the
    configuration in tables (its key group).
    """

    layers: tuple[int, ...]
    query_roles: tuple[str, ...] | None = None
    key_roles: tuple[str, ...] | None = None
    query_positions: tuple[int, ...] | None = None
    key_positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("layers", "query_roles", "key_roles", "query_positions", "key_positions", "heads"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v) if not isinstance(v, (str, int)) else (v,))
        if not self.layers:
            raise UsageError("a knockout needs at least one layer")
        for side in ("query", "key"):
            roles, pos = getattr(self, f"{side}_roles"), getattr(self, f"{side}_positions")
            if (roles is None) == (pos is None):
                raise UsageError(f"choose the {side}s by {side}_roles or by {side}_positions (exactly one)")
            if roles is not None:
                role_ids(roles)  # unknown roles raise, naming the valid ones

    def selection(self, layout: TokenLayout, side: str) -> torch.Tensor:
        """Bool ``[B, P]``: the positions selected on ``side`` (``"query"`` or ``"key"``)."""
        roles, pos = getattr(self, f"{side}_roles"), getattr(self, f"{side}_positions")
        if roles is not None:
            return layout.mask(list(roles))
        bad = [p for p in pos if not -layout.length <= p < layout.length]
        if bad:
            raise UsageError(
                f"{side} positions {bad} are outside the sequence (0..{layout.length - 1}; -1 = the last)"
            )
        sel = torch.zeros(layout.batch, layout.length, dtype=torch.bool)
        sel[:, [p % layout.length for p in pos]] = True
        return sel

    def edges(self, layout: TokenLayout, n_heads: int) -> torch.Tensor:
        """Bool ``[B, 1 or n_heads, P, P]`` (query, key): True = removed. Only edges a causal model has
        (key before query); the diagonal never."""
        q, k = self.selection(layout, "query"), self.selection(layout, "key")
        earlier = torch.ones(layout.length, layout.length, dtype=torch.bool).tril(-1)
        e = q[:, :, None] & k[:, None, :] & earlier[None]
        if self.heads is None:
            return e[:, None]
        bad = [h for h in self.heads if not 0 <= h < n_heads]
        if bad:
            raise UsageError(f"heads {bad} are outside the model (0..{n_heads - 1})")
        chosen = torch.zeros(n_heads, dtype=torch.bool)
        chosen[list(self.heads)] = True
        return e[:, None] & chosen[None, :, None, None]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _group(spec: Sequence[str | int] | str | int) -> dict[str, tuple]:
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    if items and all(isinstance(x, str) for x in items):
        return {"roles": tuple(items)}
    if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return {"positions": tuple(items)}
    raise UsageError(f"a query/key group is a list of role names or of positions, got {spec!r}")


def knockout_grid(
    model: nn.Module,
    key_groups: Mapping[str, Sequence[str | int]],
    *,
    query: Sequence[str | int] = ("image_gen",),
    layers: Sequence[int] | None = None,
    window: int = 1,
    heads: Sequence[int] | None = None,
    adapter: Adapter | None = None,
) -> tuple[list[Knockout], SiteGrid]:
    """Every ``layer × key group``: knock out ``query`` → group edges at ``window`` layers from each layer.

    ``key_groups``: name → role names (``["text"]``) or positions (``[0, 1]``); ``query`` likewise.
    Returns the configurations (layer-major) and the grid that lays out their results
    (``[1, layer, group]``); pass both to :func:`knockout_sweep`.
    """
    adapter = adapter or adapter_for(model)
    n_layers = adapter.n_layers(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UsageError(f"layers {bad} are outside the model (0..{n_layers - 1})")
    if window < 1:
        raise UsageError(f"window must be >= 1, got {window}")
    if not key_groups:
        raise UsageError("no key groups: pass e.g. {'question': ['text'], 'cot': ['cot']}")
    q = {f"query_{k}": v for k, v in _group(query).items()}
    kos = [
        Knockout(
            tuple(range(layer, min(layer + window, n_layers))),
            **q,
            **{f"key_{k}": v for k, v in _group(spec).items()},
            heads=None if heads is None else tuple(heads),
            label=name,
        )  # fmt: skip
        for layer in layers
        for name, spec in key_groups.items()
    ]
    return kos, _grid(kos, layers, list(key_groups), window)


def _grid(kos: list[Knockout], layers: list[int], columns: list[str], window: int) -> SiteGrid:
    sites = [PatchSite(f"blocks.{k.layers[0]}.attn.pattern", k.layers, None, k.label) for k in kos]
    meta = {"knockouts": [k.to_dict() for k in kos], "window": window}
    return SiteGrid(sites, ["knockout"], layers, columns, meta)


# -- the batched sweep --------------------------------------------------------------------------------


class _Remover:
    """The interception callback of one chunk: at layer ``j``, the rows whose configuration knocks
    ``j`` lose their edges (``edges`` ``[rows, h, P, P]`` in stream coordinates)."""

    def __init__(self, edges: torch.Tensor, knocks: dict[int, torch.Tensor]) -> None:
        self.edges, self.knocks = edges, knocks

    def __call__(self, call: AttnCall) -> None:
        rows = self.knocks.get(call.layer)
        if rows is None:
            return
        m, q, k = call.query.shape[0], call.query.shape[-2], call.key.shape[-2]
        off = k - q  # the run may start at a later position (suffix) or continue a cache
        e = self.edges[:m, :, off:k, :k] & rows[:m, None, None, None]
        call.remove_edges(e)


def _all_edges(kos: Sequence[Knockout], layout: TokenLayout, n_heads: int) -> list[torch.Tensor]:
    edges = [ko.edges(layout, n_heads) for ko in kos]
    empty = [
        ko.label or str(i) for i, (ko, e) in enumerate(zip(kos, edges, strict=True)) if not bool(e.any())
    ]
    if empty:
        raise UsageError(
            f"knockout(s) {empty[:5]} remove no edge in this batch (no selected query precedes a selected "
            f"key); roles present: {', '.join(r for r, n in layout.counts().items() if n)}"
        )
    return edges


def union_knockout(
    kos: Sequence[Knockout], edges: list[torch.Tensor]
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The layers and edges of every configuration at once (the sweep's ``corrupted`` baseline)."""
    layers = tuple(sorted({x for ko in kos for x in ko.layers}))
    h = max(e.shape[1] for e in edges)
    return layers, torch.stack([e.expand(-1, h, -1, -1) for e in edges]).any(0)


@torch.no_grad()
def knockout_sweep(
    model: nn.Module,
    inputs: ModelInputs,
    knockouts: Sequence[Knockout] | tuple[list[Knockout], SiteGrid],
    metric: Metric,
    *,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    resume: bool = True,
    suffix: bool = True,
) -> PatchResult:
    """The metric (mean over the ``B`` examples) with each knockout applied, batched → PatchResult.

    ``knockouts``: a list of :class:`Knockout`, or what :func:`knockout_grid` returns. ``resume`` /
    ``suffix`` (reuse blocks before the first knocked layer / positions before the first knocked
    query) are exact; turning them off is for checking and benchmarking.
    """
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    kos, grid = knockouts if isinstance(knockouts, tuple) else (list(knockouts), None)
    if not kos:
        raise UsageError("no knockouts to run")
    if getattr(metric, "reads_attention", False):
        forward, resume = metric.wrap(forward_of(adapter, forward), adapter), False  # all rows, all layers
    n_heads = attention_geometry(model, adapter, 0).n_heads
    for layer in {x for ko in kos for x in ko.layers}:
        attention_module(model, adapter, layer)  # bad layers raise before any work
    edges = _all_edges(kos, inputs.layout, n_heads)
    u_layers, u_edges = union_knockout(kos, edges)
    tr = cached_run(model, adapter, inputs, forward)
    prepare_metric(metric, tr.outputs)
    b, n_layers, length = tr.batch, tr.n_layers, max(tr.length, 1)
    configs = [(ko.layers, e) for ko, e in zip(kos, edges, strict=True)] + [(u_layers, u_edges)]
    use_suffix, suffix_reason = _suffix_ok(tr, metric, resume, suffix)
    can_resume = resume and tr.resumable
    starts = [min(layers) if can_resume else 0 for layers, _ in configs]
    prefixes = [_first_query(e) if use_suffix else 0 for _, e in configs]
    per_chunk = max(1, budget_bytes // (tr.row_bytes * b))
    values = torch.empty(len(configs))
    chunks = plan_chunks(starts, prefixes, per_chunk, length, n_layers)
    rows = 0
    for p0, members in chunks:
        members = sorted(members, key=lambda j: starts[j])
        chunk = [configs[j] for j in members]
        values[members] = _run_chunk(
            model, adapter, inputs, chunk, [starts[j] for j in members], metric, forward_of(adapter, forward),
            tr, p0 if use_suffix else None,
        )  # fmt: skip
        rows += len(members) * b
    clean = float(evaluate(metric, tr.outputs, b).mean())
    notes = [] if can_resume else [f"full forward per chunk: {tr.reason or 'resume=False'}"]
    if suffix and can_resume and not use_suffix:
        notes.append(f"every position recomputed: {suffix_reason}")
    sites = grid.sites if grid is not None else _grid(kos, sorted({k.layers[0] for k in kos}), [], 1).sites
    info = {"strategy": "resume" if can_resume else "full", "suffix": use_suffix, "chunks": len(chunks),
            "rows": rows, "notes": notes, "union_layers": list(u_layers)}  # fmt: skip
    return PatchResult(
        values=values[:-1], clean=clean, corrupted=float(values[-1]), sites=sites, grid=grid,
        method="knockout", direction="noise", metric=metric_name(metric),
        seconds=time.perf_counter() - t0, info=info,
    )  # fmt: skip


def _first_query(edges: torch.Tensor) -> int:
    """The first query position (over the batch) that loses an edge: positions before it are unchanged."""
    return int(edges.any(-1).any(1).any(0).nonzero()[0])


def _run_chunk(
    model: nn.Module,
    adapter: Adapter,
    target: ModelInputs,
    configs: list[tuple[tuple[int, ...], torch.Tensor]],
    starts: list[int],
    metric: Metric,
    fwd: Forward,
    tr: CachedRun,
    p0: int | None,
) -> torch.Tensor:
    """One forward for ``configs`` (ordered by start layer) → ``[n]`` metric (mean over examples)."""
    n, b = len(configs), tr.batch
    h = max(e.shape[1] for _, e in configs)
    edges = torch.cat([_rows(e.expand(-1, h, -1, -1), 1) for _, e in configs])  # [n·B, h, P, P]
    layers = sorted({x for ls, _ in configs for x in ls})
    knocks = {j: torch.tensor([j in ls for ls, _ in configs]).repeat_interleave(b) for j in layers}
    with (
        resumed_rows(model, adapter, tr, n, starts, p0) as active,
        intercept_attention(model, adapter, layers, _Remover(edges, knocks)),
    ):
        out = resumed_forward(model, target, fwd, tr, n, p0, active, last_logits=True)
    return evaluate(metric, out, n * b).view(n, b).mean(1)


# -- the reference ------------------------------------------------------------------------------------


def explicit_mask(layout: TokenLayout, edges: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask a knocked layer attends with, built from scratch: causal, padding (role ``pad``) and
    minus ``edges`` ``[B, h, P, P]`` — bool (True = attend) for sdpa, additive (0 / dtype min) for eager."""
    p = layout.length
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    keep = causal[None, None] & ~layout.mask("pad")[:, None, None, :] & ~edges
    if impl == "eager":
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


def with_edges_removed(mask: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """A model-built 4-D mask ``[B, 1 or h, P, P]`` minus ``edges`` ``[B, h, P, P]``: bool masks
    (True = attend) lose the edges, additive masks get dtype min there."""
    if mask.dtype == torch.bool:
        return mask & ~edges
    return mask.masked_fill(edges, torch.finfo(mask.dtype).min)


@torch.no_grad()
def knockout_reference(
    model: nn.Module,
    inputs: ModelInputs,
    knockouts: Sequence[Knockout],
    metric: Metric,
    *,
    adapter: Adapter | None = None,
    forward: Forward | None = None,
) -> torch.Tensor:
    """The definition: per configuration, one plain forward whose knocked layers' attention modules get
    the model's own 4-D mask minus the knocked edges by a forward pre-hook (the explicit causal mask of
    :func:`explicit_mask` where the model passes none) → ``[n]`` (mean over examples)."""
    adapter = adapter or adapter_for(model)
    fwd = forward_of(adapter, forward)
    n_heads = attention_geometry(model, adapter, 0).n_heads
    b = inputs.layout.batch
    out = torch.empty(len(knockouts))
    for i, ko in enumerate(knockouts):
        e = ko.edges(inputs.layout, n_heads)
        with HookSet() as hooks:
            for layer in ko.layers:
                module = attention_module(model, adapter, layer)
                impl = getattr(module.config, "_attn_implementation", None) or "eager"
                dtype = next(module.parameters()).dtype
                mask = explicit_mask(inputs.layout, e, impl, dtype)

                def pre(
                    mod: nn.Module, args: tuple, kwargs: dict, mask: torch.Tensor = mask, e: torch.Tensor = e
                ) -> tuple:
                    if "attention_mask" not in kwargs:  # the reference must not silently knock nothing
                        raise RuntimeError(
                            f"{type(mod).__name__} was called without an attention_mask keyword"
                        )
                    hidden = args[0] if args else kwargs["hidden_states"]
                    given = kwargs["attention_mask"]
                    if given is not None:  # the model's own mask (it may not be causal: MoT latents)
                        mask = with_edges_removed(given, e.to(given.device))
                    return args, {**kwargs, "attention_mask": mask.to(hidden.device)}

                hooks.pre(module, pre)
            res = fwd(model, inputs)
        out[i] = evaluate(metric, res, b).mean()
    return out
