"""Attention across the understanding → generation boundary: per-head patching, path patching, steering.

Modules: :mod:`~uniprobe.probes.attention.steering` (activation addition at points × positions × steps,
batched alpha × point sweeps). Head-level sites and path patching arrive beside it; the attention
mechanism itself (geometry, ``z``, interception) lives in :mod:`uniprobe.hooks.attention`.
"""

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
    "Steer",
    "SteerResult",
    "mean_difference",
    "probe_direction",
    "role_positions",
    "state_at",
    "steer_sweep",
    "steered_generation",
    "steered_run",
    "steering",
]
