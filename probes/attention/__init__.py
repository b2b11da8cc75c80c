"""Attention across the understanding → generation boundary: per-head patching, path patching, steering.

Modules: :mod:`~uniprobe.probes.attention.heads` (head-level patching sites for the batched engine),
:mod:`~uniprobe.probes.attention.knockout` (attention knockout, batched) and
:mod:`~uniprobe.probes.attention.mass` (attention mass from query roles to key roles, table and metric),
:mod:`~uniprobe.probes.attention.paths` (path patching: senders → receivers only),
:mod:`~uniprobe.probes.attention.steering` and :mod:`~uniprobe.probes.attention.steer_sweep` (activation
addition at points × positions × steps, batched alpha × point sweeps); the attention
mechanism itself (geometry, ``z``, interception) lives in :mod:`uniprobe.hooks.attention`.
"""

from uniprobe.probes.attention.heads import head_grid, head_sites
from uniprobe.probes.attention.knockout import Knockout, knockout_grid, knockout_reference, knockout_sweep
from uniprobe.probes.attention.mass import AttentionMass, MassTable, attention_mass, mass_table
from uniprobe.probes.attention.paths import (
    PathResult,
    Receivers,
    every_head,
    path_patch,
    path_patch_reference,
)
from uniprobe.probes.attention.steer_sweep import SteerResult, steer_sweep
from uniprobe.probes.attention.steering import (
    Steer,
    mean_difference,
    probe_direction,
    role_positions,
    state_at,
    steered_generation,
    steered_run,
    steering,
)

__all__ = [
    "AttentionMass",
    "Knockout",
    "MassTable",
    "attention_mass",
    "knockout_grid",
    "knockout_reference",
    "knockout_sweep",
    "mass_table",
    "PathResult",
    "Receivers",
    "Steer",
    "SteerResult",
    "every_head",
    "head_grid",
    "head_sites",
    "mean_difference",
    "path_patch",
    "path_patch_reference",
    "probe_direction",
    "role_positions",
    "state_at",
    "steer_sweep",
    "steered_generation",
    "steered_run",
    "steering",
]
