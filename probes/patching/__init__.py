"""Activation patching: exact (batched, resumed from the cached stream) and attribution.

Where the answer is *used*: write states of one run into another and measure the change.

    from uniprobe.probes.patching import grid_sites, patch_sweep, attribution_patch, LogitDiff
    sites = grid_sites(n_layers, n_pos, kinds=("resid_pre", "attn_out", "mlp_out"))
    exact = patch_sweep(model, clean, corrupted, sites, LogitDiff(target, foil))
    approx = attribution_patch(model, clean, corrupted, sites, LogitDiff(target, foil))
    exact.as_grid()       # [kind, layer, position], (patched − corrupted) / (clean − corrupted)

Modules: :mod:`~uniprobe.probes.patching.sites` (what to patch), :mod:`~uniprobe.probes.patching.engine`
(the batched engine and its one-forward-per-site reference), :mod:`~uniprobe.probes.patching.exact`
(sweeps), :mod:`~uniprobe.probes.patching.attribution`, :mod:`~uniprobe.probes.patching.cross_prompt`
(understanding → generation with explicit alignments), :mod:`~uniprobe.probes.patching.generation`
(teacher-forced and free generation, query models), :mod:`~uniprobe.probes.patching.metrics`
(and :mod:`~uniprobe.probes.patching.denoising`, a diffusion decoder's loss;
:mod:`~uniprobe.probes.patching.flow`, rectified-flow generation's loss and velocity difference),
:mod:`~uniprobe.probes.patching.results`, :mod:`~uniprobe.probes.patching.plots`. Kernels live in
:mod:`uniprobe.probes.kernels`.
"""

from uniprobe.probes.patching.attribution import attribution_patch, attribution_vs_exact
from uniprobe.probes.patching.cached_run import cached_run
from uniprobe.probes.patching.cross_prompt import (
    Alignment,
    align_by_anchors,
    align_by_role,
    align_end,
    alignment,
    patch_across,
)
from uniprobe.probes.patching.denoising import DenoisingLoss, denoising_loss
from uniprobe.probes.patching.engine import DEFAULT_BUDGET, collect_states, run_sites, run_sites_reference
from uniprobe.probes.patching.exact import patch_sweep
from uniprobe.probes.patching.flow import FlowLoss, VelocityDiff, flow_inputs, flow_loss
from uniprobe.probes.patching.generation import (
    GenerationEffect,
    StepPatch,
    generation_effect,
    image_forward,
    janus_image_forward,
    janus_teacher_forced,
    patched_generation,
    query_sites,
    step_patches,
    teacher_forced,
)
from uniprobe.probes.patching.metrics import (
    GridLogProb,
    JudgeRate,
    KLToClean,
    LogitDiff,
    SequenceLogProb,
    TargetProb,
    logits_of,
    second_output,
    shifted,
)
from uniprobe.probes.patching.plots import heatmap
from uniprobe.probes.patching.results import PatchResult, correlation, normalise
from uniprobe.probes.patching.sites import (
    HEAD_KINDS,
    KINDS,
    PatchSite,
    SiteGrid,
    as_site_list,
    grid_sites,
    head_grid,
    head_grid_sites,
    mapped_sites,
    point_sites,
    role_sites,
)

__all__ = [
    "DEFAULT_BUDGET",
    "HEAD_KINDS",
    "KINDS",
    "Alignment",
    "DenoisingLoss",
    "FlowLoss",
    "GenerationEffect",
    "GridLogProb",
    "JudgeRate",
    "KLToClean",
    "LogitDiff",
    "PatchResult",
    "PatchSite",
    "SequenceLogProb",
    "SiteGrid",
    "StepPatch",
    "VelocityDiff",
    "TargetProb",
    "align_by_anchors",
    "align_by_role",
    "align_end",
    "alignment",
    "as_site_list",
    "attribution_patch",
    "attribution_vs_exact",
    "collect_states",
    "correlation",
    "denoising_loss",
    "flow_inputs",
    "flow_loss",
    "generation_effect",
    "grid_sites",
    "head_grid",
    "head_grid_sites",
    "heatmap",
    "image_forward",
    "janus_image_forward",
    "janus_teacher_forced",
    "logits_of",
    "mapped_sites",
    "normalise",
    "patch_across",
    "patch_sweep",
    "patched_generation",
    "point_sites",
    "query_sites",
    "role_sites",
    "run_sites",
    "run_sites_reference",
    "second_output",
    "shifted",
    "step_patches",
    "teacher_forced",
    "cached_run",
]
