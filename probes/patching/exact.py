"""Exact activation patching sweeps: clean ↔ corrupted, every site, batched.

    grid = grid_sites(n_layers, n_pos, kinds=("resid_pre", "attn_out", "mlp_out"))
    res = patch_sweep(model, clean, corrupted, grid, LogitDiff(target, foil))
    res.as_grid()        # [kind, layer, position], (patched − corrupted) / (clean − corrupted)

``direction="denoise"`` writes clean states into the corrupted run (which sites *suffice* to
restore the answer); ``"noise"`` writes corrupted states into the clean run (which sites are
*necessary*). Either way the result is normalised by the same two baselines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
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
from uniprobe.probes.patching.metrics import metric_name
from uniprobe.probes.patching.results import PatchResult
from uniprobe.probes.patching.sites import PatchSite, SiteGrid, as_site_list

DIRECTIONS: tuple[str, ...] = ("denoise", "noise")


def prepare_metric(metric: Metric, clean_outputs: Any) -> None:
    """Give metrics that compare to the clean run (``prepare``) the clean outputs."""
    prep = getattr(metric, "prepare", None)
    if callable(prep):
        prep(clean_outputs)


def check_lengths(
    sites: Sequence[PatchSite], source: dict[str, torch.Tensor], target_len: int, names: tuple[str, str]
) -> None:
    """Same-position sites need source and target runs of one length; say so instead of guessing."""
    for s in sites:
        if s.layer is None or s.source_positions is not None:
            continue
        n_src = source[s.point].shape[1]
        if n_src != target_len:
            raise ValueError(
                f"{names[0]} run has {n_src} positions but the {names[1]} run has {target_len}: positions do "
                "not line up. Give the prompts the same number of tokens, or align them explicitly "
                "(uniprobe.probes.patching.cross_prompt: align_by_role / align_by_anchors / align_end, "
                "or --align end)"
            )


def patch_sweep(
    model: nn.Module,
    clean: ModelInputs,
    corrupted: ModelInputs,
    sites: SiteGrid | Sequence[PatchSite],
    metric: Metric,
    *,
    direction: str = "denoise",
    adapter: Adapter | None = None,
    forward: Forward | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    resume: bool = True,
    suffix: bool = True,
    skip_noops: bool = True,
    force: str | None = None,
) -> PatchResult:
    """Exact patching of every site, many sites per forward.

    Args:
        model, adapter: the model and its family adapter (found from the class when omitted).
        clean, corrupted: prepared inputs (``adapter.prepare``), batch ``B`` each (pairs row by row).
        sites: a :class:`SiteGrid` or a list of :class:`PatchSite`.
        metric: ``outputs → [rows]`` (:mod:`uniprobe.probes.patching.metrics`).
        direction: ``"denoise"`` or ``"noise"`` (see the module docstring).
        forward: ``(model, inputs) → outputs`` for both runs (default ``adapter.run``).
        budget_bytes: activation memory per chunk; resume: reuse the cached stream below each site;
            suffix: reuse positions before each site (causal LMs, last-position metrics);
            skip_noops: no forward for sites whose source equals the target there.
            All three are exact; turning them off is for checking and benchmarking.
        force: kernel backend for the scatter (``None`` = dispatcher's choice).
    Returns:
        :class:`PatchResult` with ``values [n_sites]``, both baselines, timing and strategy.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    t0 = time.perf_counter()
    adapter = adapter or adapter_for(model)
    fwd = forward_of(adapter, forward)
    site_list, grid = as_site_list(sites)
    source_in, target_in = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    src_out, source = collect_states(model, adapter, source_in, [s.point for s in site_list], fwd)
    tr = cached_run(model, adapter, target_in, forward, [s.point for s in site_list])
    names = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    check_lengths(site_list, source, tr.length, names)
    clean_out, corrupted_out = (src_out, tr.outputs) if direction == "denoise" else (tr.outputs, src_out)
    prepare_metric(metric, clean_out)
    b = tr.batch
    clean_v = float(evaluate(metric, clean_out, b).mean())
    corrupted_v = float(evaluate(metric, corrupted_out, b).mean())
    run = run_sites(
        model, adapter, target_in, site_list, source, metric,
        forward=fwd, tr=tr, budget_bytes=budget_bytes, resume=resume, suffix=suffix,
        skip_noops=skip_noops, force=force,
    )  # fmt: skip
    notes = [] if run.strategy == "resume" else [f"full forward per chunk: {run.reason}"]
    if suffix and run.strategy == "resume" and not run.suffix:
        notes.append(f"every position recomputed (the faster suffix path is off): {run.suffix_reason}")
    return PatchResult(
        values=run.values,
        clean=clean_v,
        corrupted=corrupted_v,
        sites=site_list,
        grid=grid,
        method="exact",
        direction=direction,
        metric=metric_name(metric),
        seconds=time.perf_counter() - t0,
        info={**run.info(), "patch_seconds": run.seconds, "notes": notes},
    )
