"""The batched exact-patching engine: many sites per forward, resumed from the cached run.

Protocol (one target run, ``B`` examples, ``n`` sites per chunk):

1. **Run** the unpatched target once and keep it (:mod:`uniprobe.probes.patching.cached_run`).
2. **No-ops**: a site whose source values equal the target's own values there (positions before
   the first differing token, identical embeddings) cannot change anything; it gets the
   unpatched value without a forward (``skip_noops``). Likewise a site over several positions
   (all positions of a head, a role) drops the positions where source equals target, so its
   earliest *changed* position decides how much of the prefix is reused.
3. **Group** the rest by start layer: a patch at block ``l`` (``resid_pre``, ``attn_out``,
   ``mlp_out``, ``resid_post``) leaves blocks ``< l`` unchanged; a model-level point that fires
   after the last block starts at ``L``. For plain causal LMs whose metric reads only the last
   position (``metric.last_position_only``), also by start position: a patch at position ``p``
   leaves positions ``< p`` unchanged, so their keys/values come from the cached run and only
   positions ``≥ p`` run (``suffix``).
4. **Chunk** each group so ``rows × row_bytes ≤ budget_bytes`` and run each chunk as one forward
   of ``n·B`` rows (site ``i``, example ``b`` → row ``i·B + b``): blocks ``< l`` return their
   cached outputs (no compute), block ``l`` reads the cached stream, and one hook per point
   scatters every site's source rows into its batch rows (:func:`uniprobe.probes.kernels.scatter_rows`).
   The model's own forward runs everything else (embedding, final norm, heads, connector), so
   outputs have the model's usual form and any metric applies. On the suffix path (a metric
   reading the last position only) the final block's MLP and the LM head also run on the last
   position alone (:class:`~uniprobe.probes.patching.hooking.last_position`, ``logits_to_keep=1``): the
   other positions' outputs feed nothing the metric reads.

Resuming is exact when each block runs once per forward and affects later computation only
through what it returns — true of the decoder stacks served here (Llama, Qwen2, Janus's LM,
query models). When a block runs 0 or 2+ times (a generation loop, a weight-shared stack) or
returns something else than a tensor or a tuple holding one, the engine falls back to the full
forward with the patching hooks (``strategy="full"``, the reason in ``reason``). Skipping
positions needs a default forward over ``input_ids`` only, no padding and a full-attention
``DynamicCache`` (otherwise ``suffix_reason`` says why it was not used).
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters.base import Adapter, ModelInputs, get_module
from uniprobe.hooks.calls import CallPatternError, cache_kwarg, find_cache, output_cache, transformers_version
from uniprobe.hooks.layout import TokenLayout
from uniprobe.probes.patching.cached_run import CachedRun, Forward, cached_run, first_dim
from uniprobe.probes.patching.hooking import Plan, last_position, overwrite, record, stagger
from uniprobe.probes.patching.site_checks import head_counts, is_noop, trim_site
from uniprobe.probes.patching.sites import PatchSite

Metric = Callable[[Any], torch.Tensor]
DEFAULT_BUDGET = 512 * 2**20
CALL_TOKENS = 32  # fixed cost of one forward, in token-rows of compute (see plan_chunks)


def forward_of(adapter: Adapter, forward: Forward | None = None) -> Forward:
    """``forward`` or the adapter's plain forward pass."""
    return forward if forward is not None else adapter.run


def repeat_inputs(inputs: ModelInputs, n: int) -> ModelInputs:
    """The batch stacked ``n`` times: ``[B, ...]`` tensors → ``[n·B, ...]``, row ``i·B + b`` = example b."""
    b = first_dim(inputs)
    kwargs = {
        k: v.repeat(n, *([1] * (v.dim() - 1)))
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b
        else v
        for k, v in inputs.kwargs.items()
    }
    return ModelInputs(kwargs, TokenLayout(inputs.layout.roles.repeat(n, 1), inputs.layout.tail_role))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, ...] → [n·B, ...]`` (a broadcast view when ``B = 1``)."""
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    return t.repeat(n, *([1] * (t.dim() - 1)))


def build_plans(
    sites: Sequence[PatchSite],
    source: dict[str, torch.Tensor],
    batch: int,
    shift: int = 0,
    heads: dict[str, int] | None = None,
) -> dict[str, Plan]:
    """Point → :class:`Plan` for sites ``0..n-1`` occupying rows ``i·B .. i·B+B-1``.

    ``shift``: subtracted from target positions (a run that starts at position ``shift``).
    ``heads``: point → number of heads, for points with head sites (:func:`head_counts`): their plan
    writes ``[batch, pos·heads, d_head]`` slices (a whole-``z`` site there writes every head).
    """
    heads = heads or {}
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    pos: dict[str, list[torch.Tensor]] = defaultdict(list)
    vals: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i, site in enumerate(sites):
        if site.point not in source:
            raise KeyError(f"no source states for {site.point!r}; have {', '.join(source) or 'none'}")
        src = source[site.point]
        if src.shape[0] not in (1, batch):
            raise ValueError(
                f"source states at {site.point!r} have batch {src.shape[0]}, the target run {batch}"
            )
        bad = [p for p in site.src if not 0 <= p < src.shape[1]]
        if bad:
            raise IndexError(
                f"site {site.point} reads source positions {bad}, "
                f"outside the source run (0..{src.shape[1] - 1})"
            )
        k = len(site.positions)
        v = src[:, list(site.src)].expand(batch, k, *src.shape[2:])
        target = torch.tensor(site.positions) - shift
        n_h = heads.get(site.point, 1)
        if site.head is not None and site.head >= n_h:
            raise IndexError(f"site {site.point} head {site.head}: the attention has {n_h} heads")
        if n_h > 1:  # positions of the [batch, pos·heads, d_head] view
            v = v.reshape(batch, k, n_h, -1)
            if site.head is not None:
                v, target = v[:, :, site.head], target * n_h + site.head
            else:
                target = (target[:, None] * n_h + torch.arange(n_h)).flatten()
            k = target.numel()
        vals[site.point].append(
            v.reshape(batch * k, *v.shape[-1:]) if n_h > 1 else v.reshape(batch * k, *src.shape[2:])
        )
        rows[site.point].append((i * batch + torch.arange(batch)).repeat_interleave(k))
        pos[site.point].append(target.repeat(batch))
    return {p: Plan(torch.cat(rows[p]), torch.cat(pos[p]), torch.cat(vals[p]), heads.get(p, 1)) for p in rows}


@dataclass
class SiteRun:
    """Raw per-site metric values and how they were computed.

    Attributes:
        values: ``[n_sites]`` metric, mean over the ``B`` examples.
        strategy: ``"resume"`` (blocks reused) or ``"full"``; ``reason``: why not resumed.
        suffix: whether positions before each patch were reused; ``suffix_reason``: why not.
        noops: sites answered without a forward (source equals target there).
        chunks, rows: forwards run and batch rows in them.
        work: token·block·row units computed, as a fraction of one full forward per site.
    """

    values: torch.Tensor
    strategy: str
    reason: str
    suffix: bool
    suffix_reason: str
    noops: int
    chunks: int
    rows: int
    work: float
    seconds: float

    def info(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "reason": self.reason,
            "suffix": self.suffix,
            "suffix_reason": self.suffix_reason,
            "noops": self.noops,
            "chunks": self.chunks,
            "rows": self.rows,
            "work_fraction": round(self.work, 4),
        }


def start_layer(site: PatchSite, tr: CachedRun, resume: bool) -> int:
    """Where a patched forward for ``site`` may begin (0 = from the embeddings)."""
    if not (resume and tr.resumable):
        return 0
    if site.layer is not None:
        return site.layer
    start = tr.start_of.get(site.point)
    if start is None:
        raise RuntimeError(
            f"the module of {site.point!r} did not run in the target forward; it cannot be patched there"
        )
    return start


def evaluate(metric: Metric, outputs: Any, rows: int) -> torch.Tensor:
    """``metric(outputs)`` as a float ``[rows]`` vector, with a clear error otherwise."""
    v = torch.as_tensor(metric(outputs)).detach().float().cpu()
    if v.shape != (rows,):
        raise ValueError(
            f"the metric must return one value per batch row ([{rows}]), got shape {tuple(v.shape)}"
        )
    return v


def plan_chunks(
    starts: list[int],
    prefixes: list[int],
    per_chunk: int,
    length: int,
    n_layers: int,
    call_tokens: int = CALL_TOKENS,
) -> list[tuple[int, list[int]]]:
    """``(start position p0, site indices)`` per chunk, sites of any start layers mixed.

    Sites ordered by (start position, start layer) are split into consecutive chunks of at most
    ``per_chunk`` sites, minimising (dynamic programming) the estimated cost
    ``Σ_chunks [call_tokens · (L + 1 − min start) + Σ_sites (L + 1 − start) · (length − p0)]``: a
    chunk runs every position from its first site's ``p0``, and each block it runs (plus the
    head, counted as one more) costs a fixed amount — reading the weights, Python overhead — worth
    about ``call_tokens`` token-rows.
    """
    order = sorted(range(len(starts)), key=lambda i: (prefixes[i], starts[i]))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of chunking order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        low, rows_work = n_layers, 0
        for i in range(j - 1, max(0, j - per_chunk) - 1, -1):
            low = min(low, starts[order[i]])
            rows_work += n_layers + 1 - starts[order[i]]
            cost = best[i] + call_tokens * (n_layers + 1 - low) + rows_work * (length - prefixes[order[i]])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [(prefixes[order[i]], order[i:j]) for i, j in reversed(bounds)]


@torch.no_grad()
def run_sites(
    model: nn.Module,
    adapter: Adapter,
    target: ModelInputs,
    sites: Sequence[PatchSite],
    source: dict[str, torch.Tensor],
    metric: Metric,
    *,
    forward: Forward | None = None,
    tr: CachedRun | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    resume: bool = True,
    suffix: bool = True,
    skip_noops: bool = True,
    force: str | None = None,
) -> SiteRun:
    """The metric ``[n_sites]`` (mean over the target's ``B`` examples) with each site patched.

    ``source[point]`` is ``[B or 1, pos_src, *feat]``: the states written into the target run.
    ``tr`` is the target's :func:`~uniprobe.probes.patching.cached_run.cached_run` (run here when omitted).
    """
    t0 = time.perf_counter()
    fwd = forward_of(adapter, forward)
    points = list(dict.fromkeys(s.point for s in sites))
    if tr is None or any(p not in tr.points for p in points):
        tr = cached_run(model, adapter, target, forward, points)
    b, n_layers, length = tr.batch, tr.n_layers, max(tr.length, 1)
    values = torch.empty(len(sites))
    heads = head_counts(model, adapter, sites)
    noop = [skip_noops and is_noop(s, source, tr, heads) for s in sites]
    if any(noop):
        values[torch.tensor(noop)] = evaluate(metric, tr.outputs, b).mean()
    todo = [i for i, skip in enumerate(noop) if not skip]
    if skip_noops:  # plan what each site really changes (the result still lists the sites as given)
        keep = set(todo)
        sites = [trim_site(s, source, tr, heads) if i in keep else s for i, s in enumerate(sites)]
    use_suffix, suffix_reason = _suffix_ok(tr, metric, resume, suffix)
    starts = [start_layer(sites[i], tr, resume) for i in todo]
    prefixes = [min(sites[i].positions) if use_suffix and sites[i].layer is not None else 0 for i in todo]
    per_chunk = max(1, budget_bytes // (tr.row_bytes * b))
    chunks = plan_chunks(starts, prefixes, per_chunk, length, n_layers)
    rows, work = 0, 0.0
    for p0, members in chunks:
        members = sorted(members, key=lambda j: starts[j])  # rows that start earlier come first
        part = [todo[j] for j in members]
        chunk_starts = [starts[j] for j in members]
        values[part] = _run_chunk(
            model, adapter, target, [sites[i] for i in part], chunk_starts, source, metric, fwd, tr,
            p0 if use_suffix else None, force, heads,
        )  # fmt: skip
        rows += len(part) * b
        work += sum((n_layers - s) * (length - p0) for s in chunk_starts) / (n_layers * length)
    strategy = "resume" if resume and tr.resumable else "full"
    reason = tr.reason if not tr.resumable else ("" if resume else "resume=False")
    return SiteRun(
        values, strategy, reason, use_suffix, suffix_reason, sum(noop), len(chunks), rows,
        work / max(len(sites), 1), time.perf_counter() - t0,
    )  # fmt: skip


def _suffix_ok(tr: CachedRun, metric: Metric, resume: bool, suffix: bool) -> tuple[bool, str]:
    if not suffix:
        return False, "suffix=False"
    if not resume or not tr.resumable:
        return False, "blocks are not resumed"
    if tr.kv is None:
        return False, tr.suffix_reason
    if not getattr(metric, "last_position_only", False):
        return False, "the metric may read positions other than the last (metric.last_position_only unset)"
    return True, ""


def _run_chunk(
    model: nn.Module,
    adapter: Adapter,
    target: ModelInputs,
    sites: list[PatchSite],
    starts: list[int],
    source: dict[str, torch.Tensor],
    metric: Metric,
    fwd: Forward,
    tr: CachedRun,
    p0: int | None,
    force: str | None,
    heads: dict[str, int] | None = None,
) -> torch.Tensor:
    """One forward for ``sites`` (ordered by start layer ``starts``) over positions ``p0..``.

    ``p0`` is None when positions are not skipped (then the adapter's forward runs every
    position); an int (0 included) runs the plain causal LM over positions ``p0..`` of its cached
    prefix, the metric reading only the last position (see :func:`_last_position_modules`).
    """
    n, b = len(sites), tr.batch
    plans = build_plans(sites, source, b, shift=p0 or 0, heads=heads)
    with (
        resumed_rows(model, adapter, tr, n, starts, p0) as active,
        overwrite(model, adapter, plans, force) as ow,
    ):
        out = resumed_forward(model, target, fwd, tr, n, p0, active, _head_untouched(model, adapter, plans))
        ow.check_fired(1 if tr.resumable else None)
    return evaluate(metric, out, n * b).view(n, b).mean(1)


@contextmanager
def resumed_rows(
    model: nn.Module, adapter: Adapter, tr: CachedRun, n: int, starts: list[int], p0: int | None
) -> Iterator[list[int]]:
    """``n`` copies of the cached run's ``B`` rows, copy ``i`` resumed at block ``starts[i]``
    (ordered) from the cached stream over positions ``p0..`` (all when None), the final MLP on the
    last position only when positions are skipped. Yields ``active``: rows each block computes.
    The one setup of a resumed chunk, shared by patching and knockout."""
    b, n_layers = tr.batch, tr.n_layers
    active = [b * sum(s <= j for s in starts) for j in range(n_layers)]
    start = p0 or 0

    def carry(j: int, k: int) -> torch.Tensor:
        after = tr.block_inputs[j + 1] if j + 1 < n_layers else _first(tr.block_outputs[j])
        return _rows(after[:, start:], k // b).contiguous()

    trimmed = _last_position_modules(model, adapter, n_layers) if p0 is not None else []
    with (
        stagger(model, adapter, active, n * b, carry, tr.block_outputs),
        last_position(trimmed, tr.length - start),
    ):
        yield active


def resumed_forward(
    model: nn.Module,
    target: ModelInputs,
    fwd: Forward,
    tr: CachedRun,
    n: int,
    p0: int | None,
    active: list[int],
    last_logits: bool = False,
) -> Any:
    """The forward of a :func:`resumed_rows` chunk: the adapter's over ``n`` stacked copies of the
    target, or (``p0`` given) the plain causal LM over positions ``p0..`` of its cached prefix."""
    if p0 is None:
        return fwd(model, repeat_inputs(target, n))
    kwargs = _suffix_kwargs(model, tr, n, p0, active, last_logits)
    out = model(**kwargs)
    if p0:
        check_suffix_run(model, out, kwargs, tr.length)
    return out


def _last_position_modules(model: nn.Module, adapter: Adapter, n_layers: int) -> list[nn.Module]:
    """Modules that may compute the last position only when the metric reads only the last one:
    the final block's MLP (position-wise; its other positions feed only the final norm and head
    at those positions, which nothing reads). Empty when the adapter names no MLP."""
    if not n_layers or not getattr(adapter, "mlp", None):
        return []
    try:
        return [get_module(model, f"{adapter.blocks}.{n_layers - 1}.{adapter.mlp}")]
    except AttributeError:
        return []


def _head_untouched(model: nn.Module, adapter: Adapter, plans: dict[str, Plan]) -> bool:
    """Whether no plan patches the LM head's input or output (then it may run on the last position)."""
    head = getattr(adapter, "lm_head", None)
    if not head:
        return False
    for point in plans:
        module = adapter.site(model, point).module
        if module == head or module.startswith(head + "."):
            return False
    return True


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _suffix_kwargs(
    model: nn.Module, tr: CachedRun, n: int, p0: int, active: list[int], last_logits: bool = False
) -> dict[str, Any]:
    """Model kwargs running positions ``p0..`` of ``n`` copies of the target over its cached prefix.

    Block ``j``'s cache holds the prefix keys/values of the ``active[j]`` rows it computes. The
    cache goes under the keyword the model's forward names today (it moved in transformers 5.24).
    ``p0 = 0``: no cache. ``last_logits``: the head computes the last position only
    (``logits_to_keep=1``, where the forward takes it; the metric reads no other).
    """
    from transformers import DynamicCache

    assert tr.kv is not None and tr.input_ids is not None
    b = tr.batch
    ids = _rows(tr.input_ids[:, p0:], n)
    mask = torch.ones(ids.shape[0], tr.length, dtype=torch.long, device=ids.device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if last_logits and "logits_to_keep" in _forward_params(model):
        kwargs["logits_to_keep"] = 1
    if not p0:
        return {**kwargs, "use_cache": False}
    layers = [
        (_rows(k[:, :, :p0], max(m, b) // b), _rows(v[:, :, :p0], max(m, b) // b))
        for (k, v), m in zip(tr.kv, active)
    ]
    return {**kwargs, cache_kwarg(model) or "cache": DynamicCache(ddp_cache_data=layers), "use_cache": True}


def _forward_params(model: nn.Module) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def check_suffix_run(model: nn.Module, out: Any, kwargs: dict[str, Any], length: int) -> None:
    """Raise unless the model ran over the prefix cache it was handed (else the grid would be wrong).

    The cache must come back in the outputs, its last block holding all ``length`` positions (the
    last block always runs; earlier ones may be skipped): a model that ignored the cache (a renamed
    keyword swallowed by ``**kwargs``) would have run the suffix alone.
    """
    handed = find_cache(kwargs.values())
    back = output_cache(out)
    got = back.get_seq_length(len(back.layers) - 1) if back is handed else None
    if back is None or back is not handed or got != length:
        raise CallPatternError(
            f"{type(model).__name__} (transformers {transformers_version()}) did not run over the "
            f"prefix key/value cache it was handed (it returned {type(back).__name__} holding {got} "
            f"positions; expected that cache with {length}); pass suffix=False to patch with full "
            "forwards, and report the model class and transformers version"
        )


@torch.no_grad()
def run_sites_reference(
    model: nn.Module,
    adapter: Adapter,
    target: ModelInputs,
    sites: Sequence[PatchSite],
    source: dict[str, torch.Tensor],
    metric: Metric,
    *,
    forward: Forward | None = None,
) -> torch.Tensor:
    """The definition: one plain forward per site with a patching hook → ``[n_sites]``."""
    fwd = forward_of(adapter, forward)
    b = first_dim(target)
    out = torch.empty(len(sites))
    heads = head_counts(model, adapter, sites)
    for i, site in enumerate(sites):
        with overwrite(model, adapter, build_plans([site], source, b, heads=heads), force="torch") as ow:
            res = fwd(model, target)
            ow.check_fired(None)
        out[i] = evaluate(metric, res, b).mean()
    return out


@torch.no_grad()
def collect_states(
    model: nn.Module,
    adapter: Adapter,
    inputs: ModelInputs,
    points: Sequence[str],
    forward: Forward | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward of ``inputs``: ``(outputs, {point: tensor [B, pos, *feat]})`` (detached)."""
    points = list(dict.fromkeys(points))
    with record(model, adapter, points) as rec:
        outputs = forward_of(adapter, forward)(model, inputs)
    return outputs, {p: rec.one(p) for p in points}
