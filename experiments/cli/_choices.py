"""Choices the parser offers, without importing the libraries that define them (torch, transformers).

Each tuple is a copy of the library's own (named beside it); ``tests/test_cli_startup.py`` checks that
they agree, so a new choice in the library fails a test until it is added here.
"""

from __future__ import annotations

from uniprobe.hooks.names import DTYPE_NAMES, ROLES
from uniprobe.hooks.points import BLOCK_POINTS

# uniprobe.probes.patching.sites.KINDS + HEAD_KINDS
PATCH_KINDS: tuple[str, ...] = (*BLOCK_POINTS, "head_out", "head_out_pos")
PATCH_METHODS: tuple[str, ...] = ("exact", "attribution")  # uniprobe.experiments.patching.METHODS
PATCH_DIRECTIONS: tuple[str, ...] = ("denoise", "noise")  # uniprobe.experiments.patching.DIRECTIONS
PATCH_ALIGNS: tuple[str, ...] = ("strict", "end")  # uniprobe.experiments.patching.ALIGNS
SANDBOX_CHAINS: tuple[str, ...] = (
    "mapping-first",
    "mix-first",
    "mix-first-consolidate",
    "mix-first-consolidate-latent-cot",
    "mix-first-consolidate-wd",
    "mix-first-consolidate-wd-latent-cot",
    "mix-first-consolidate-wd0.01-latent-cot",
    "mix-first-latent-cot",
    "mix-first-longer",
    "mix-first-longer-wd",
    "mix-first-longer-wd-low-lr",
    "mix-first-longer-wd-remap",
    "mix-first-longer-wd-remap-arith",
    "mix-first-longer-wd-remap-arith2",
    "mix-first-longer-wd-remap-arith2-draw",
    "mix-first-longer-wd-remap-arith2-draw-latent-cot",
    "mix-first-longer-wd3-low-lr",
)  # sorted(sandbox.staged.CHAINS)

__all__ = [
    "DTYPE_NAMES",
    "PATCH_ALIGNS",
    "PATCH_DIRECTIONS",
    "PATCH_KINDS",
    "PATCH_METHODS",
    "ROLES",
    "SANDBOX_CHAINS",
]
