"""Attribution patching: a first-order estimate of every site's patching effect in 2 forwards + 1 backward.

For a site at point ``p`` and positions ``P`` (source positions ``S``), the patched metric is
estimated as ``metric(target) + Σ_{b, i} (source[b, S_i] − target[b, P_i]) · ∂metric/∂target[b, P_i]``,
with the gradient of the batch-mean metric taken once for all points on the target run
(``torch.autograd.grad`` w.r.t. the live activations). The reduction over ``d_model`` runs in
:func:`uniprobe.probes.kernels.attribution_scores` (Triton on CUDA: the difference is never stored).

Good where the metric is close to linear in each activation (small patches, late layers);
compare with :func:`uniprobe.probes.patching.exact.patch_sweep` via :func:`attribution_vs_exact`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.points import layer_of
from uniprobe.probes import kernels
from uniprobe.probes.patching.engine import Forward, Metric, collect_states, evaluate, forward_of, head_counts
from uniprobe.probes.patching.exact import DIRECTIONS, check_lengths, prepare_metric
from uniprobe.probes.patching.hooking import record
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.results import PatchResult, correlation
from uniprobe.probes.patching.sites import PatchSite, SiteGrid, as_site_list


def attribution_patch(
    model: nn.Module,
    clean: ModelInputs,
    corrupted: ModelInputs,
    sites: SiteGrid | Sequence[PatchSite],
    metric: Metric,
    *,
    direction: str = "denoise",
    adapter: Adapter | None = None,
    forward: Forward | None = None,
    force: str | None = None,
) -> PatchResult:
    """Estimate :func:`uniprobe.probes.patching.exact.patch_sweep` for every site at once (same arguments).

    Returns:
        :class:`PatchResult` with ``method="attribution"``: ``values [n_sites]`` are the estimated
        patched metrics, normalised with the exact baselines.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    fwd = forward_of(adapter, forward)
    site_list, grid = as_site_list(sites)
    points = list(dict.fromkeys(s.point for s in site_list))
    source_in, target_in = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    src_out, source = collect_states(model, adapter, source_in, points, fwd)
    with torch.enable_grad(), record(model, adapter, points, live=True) as rec:
        tgt_out = fwd(model, target_in)
        live = [rec.one(p) for p in points]
    prepare_metric(metric, src_out if direction == "denoise" else tgt_out)
    with torch.enable_grad():
        per_row = torch.as_tensor(metric(tgt_out))
        grads = torch.autograd.grad(per_row.float().mean(), live, allow_unused=True)
    target = {p: t.detach() for p, t in zip(points, live)}
    block_points = [p for p in points if layer_of(p) is not None]
    if block_points:
        names = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
        check_lengths(site_list, source, target[block_points[0]].shape[1], names)
    grad = {p: torch.zeros_like(target[p]) if g is None else g for p, g in zip(points, grads)}
    b = per_row.shape[0]
    base = float(evaluate(metric, tgt_out, b).mean())
    other = float(evaluate(metric, src_out, b).mean())
    scores = _site_scores(site_list, source, target, grad, force, head_counts(model, adapter, site_list))
    values = base + scores
    clean_v, corrupted_v = (other, base) if direction == "denoise" else (base, other)
    return PatchResult(
        values=values,
        clean=clean_v,
        corrupted=corrupted_v,
        sites=site_list,
        grid=grid,
        method="attribution",
        direction=direction,
        metric=metric_name(metric),
        seconds=time.perf_counter() - t0,
        info={"forwards": 2, "backwards": 1, "kernel": kernels.backend_for(*grad.values(), force=force)},
    )


def _site_scores(
    sites: Sequence[PatchSite],
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    grad: dict[str, torch.Tensor],
    force: str | None,
    heads: dict[str, int] | None = None,
) -> torch.Tensor:
    """``[n_sites]``: Σ over batch and the site's positions of ``(source − target) · grad``.

    Same-position sites share one ``[B, pos]`` score map per point (one kernel call per point); head
    sites one ``[B, pos, head]`` map per point (:func:`uniprobe.probes.kernels.head_attribution_scores`).
    """
    maps: dict[str, torch.Tensor] = {}
    out = torch.empty(len(sites))
    for i, s in enumerate(sites):
        src, tgt, g = source[s.point], target[s.point], grad[s.point]
        src = src.expand(tgt.shape[0], *src.shape[1:])
        if s.head is not None:
            n_h = (heads or {})[s.point]
            key = f"{s.point}|heads|{s.src}" if s.source_positions is not None else f"{s.point}|heads"
            if key not in maps:
                tp, sp = list(s.positions), list(s.src)
                src_h = src if s.source_positions is None else src[:, sp]
                tgt_h, g_h = (tgt, g) if s.source_positions is None else (tgt[:, tp], g[:, tp])
                split = [x.reshape(*x.shape[:2], n_h, -1) for x in (src_h, tgt_h, g_h)]
                maps[key] = kernels.head_attribution_scores(*split, force=force).cpu()  # [B, pos, head]
            cols = list(s.positions) if s.source_positions is None else slice(None)
            out[i] = maps[key][:, cols, s.head].sum()
            continue
        if s.source_positions is None and src.shape == tgt.shape:
            if s.point not in maps:
                maps[s.point] = kernels.attribution_scores(src, tgt, g, force=force).cpu()  # [B, pos]
            out[i] = maps[s.point][:, list(s.positions)].sum()
        else:
            tp, sp = list(s.positions), list(s.src)
            out[i] = kernels.attribution_scores(src[:, sp], tgt[:, tp], g[:, tp], force=force).sum().cpu()
    return out


def attribution_vs_exact(attribution: PatchResult, exact: PatchResult) -> dict[str, float]:
    """Agreement of the two methods over the same sites.

    Returns the Pearson correlation of the effects (patched − unpatched target run, so the scale
    of the baselines does not matter) and the max abs difference of the normalised values.
    """
    if [s.point for s in attribution.sites] != [s.point for s in exact.sites]:
        raise ValueError("attribution and exact results cover different sites")
    a = attribution.values - _target_baseline(attribution)
    e = exact.values - _target_baseline(exact)
    return {
        "correlation": correlation(a, e),
        "max_abs_diff_normalised": float((attribution.normalised - exact.normalised).abs().max()),
        "n_sites": float(len(e)),
    }


def _target_baseline(r: PatchResult) -> float:
    return r.corrupted if r.direction == "denoise" else r.clean
