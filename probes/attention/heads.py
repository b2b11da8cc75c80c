"""Head-level patching sites for a model: ``layer × head (× position or role)`` at ``blocks.{l}.attn.z``.

    grid = head_sites(model, clean)                                   # every layer × head, all positions
    res = patch_sweep(model, clean, corrupted, grid, LogitDiff(t, f))  # exact, batched and resumed
    approx = attribution_patch(model, clean, corrupted, grid, LogitDiff(t, f))  # per-head kernel
    head_grid(res.normalised, grid)                                   # [layer, head, column]

A head site overwrites that head's ``d_head`` slice of the ``o_proj`` input (``z``) with the source run's;
since ``head_out = W_O[:, head] @ z[head]``, this is patching the head's output — what TransformerLens's
``get_act_patch_attn_head_out_all_pos`` / ``..._by_pos`` do through ``hook_z`` (tested equal).
The sites run through the patching engine like any other (:mod:`uniprobe.probes.patching.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.adapters.base import Adapter, ModelInputs
from uniprobe.hooks.attention import attention_geometry
from uniprobe.probes.patching.sites import SiteGrid, head_grid, head_grid_sites


def head_sites(
    model: nn.Module,
    inputs: ModelInputs | None = None,
    *,
    adapter: Adapter | None = None,
    n_positions: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    by_position: bool = False,
    roles: Sequence[str] | None = None,
) -> SiteGrid:
    """:func:`~uniprobe.probes.patching.sites.head_grid_sites` with sizes read from ``model`` and ``inputs``
    (the stream length from ``inputs.layout``, or ``n_positions``; roles from ``inputs.layout``)."""
    adapter = adapter or adapter_for(model)
    if n_positions is None:
        if inputs is None:
            raise ValueError("head_sites needs the inputs (or n_positions) to know the positions")
        n_positions = inputs.layout.length
    geometry = attention_geometry(model, adapter, 0)
    return head_grid_sites(
        adapter.n_layers(model), geometry.n_heads, n_positions, layers=layers, heads=heads,
        positions=positions, by_position=by_position, roles=roles,
        layout=None if inputs is None else inputs.layout,
    )  # fmt: skip


__all__ = ["head_grid", "head_sites"]
