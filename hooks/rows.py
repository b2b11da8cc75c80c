"""Rows: captured activations as a flat table of positions.

Capture keeps only the positions that were asked for, so a batch's activations at one hook
point are a table of rows, each row one (example, position) with its role, generation step,
guidance branch and — inside a diffusion decoder or a flow backbone — the denoising timestep it
ran at. The store writes these tables shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

BRANCHES: tuple[str, ...] = ("cond", "uncond")
# guidance branch names → Rows.branch: a doubled CFG batch (cond, uncond), or a flow model's passes
# (uniprobe.hooks.flow.BRANCHES: cond, uncond_text, uncond_image); capture and stores read names here
BRANCH_IDS: dict[str, int] = {"cond": 0, "uncond": 1, "uncond_text": 1, "uncond_image": 2}
N_BRANCHES = max(BRANCH_IDS.values()) + 1


@dataclass
class Rows:
    """Activations at one hook point, one row per kept position.

    Attributes:
        values: ``[n, *feature]`` (``[n, d_model]`` for residual points).
        example: ``[n]`` int64, index of the example (batch-local in capture, global in a store).
        pos: ``[n]`` int64, absolute position in the example's sequence.
        role: ``[n]`` int64, index into ``uniprobe.hooks.layout.ROLES``.
        step: ``[n]`` int64, generation step (0 for a plain forward / the prompt pass).
        branch: ``[n]`` int64, the guidance branch (:data:`BRANCH_IDS`: 0 conditional, 1 unconditional or a
            flow model's text-unconditional pass, 2 its image-unconditional pass).
        timestep: ``[n]`` float32, the denoising timestep the row ran at (the model's own units: a
            diffusers decoder's ``timestep``, a flow model's ``t``); NaN where there is none (a plain
            forward, the prompt pass, stores written before timesteps were stored). Defaults to NaN.
    """

    values: torch.Tensor
    example: torch.Tensor
    pos: torch.Tensor
    role: torch.Tensor
    step: torch.Tensor
    branch: torch.Tensor
    timestep: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.timestep is None:  # no timestep: NaN, so rows of plain forwards still cat with others
            self.timestep = torch.full((self.values.shape[0],), float("nan"))

    def __len__(self) -> int:
        return self.values.shape[0]

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        """Concatenate row tables (all with the same feature shape)."""
        if not parts:
            raise ValueError("Rows.cat needs at least one table")
        return Rows(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rows)})

    def select(self, keep: torch.Tensor) -> Rows:
        """Rows where the boolean ``[n]`` mask ``keep`` is True (or at integer indices)."""
        return Rows(**{f.name: getattr(self, f.name)[keep] for f in fields(Rows)})

    def index_tensors(self) -> dict[str, torch.Tensor]:
        """The integer columns (everything but ``values`` and the float ``timestep``)."""
        return {f.name: getattr(self, f.name) for f in fields(Rows) if f.name not in ("values", "timestep")}
