"""Patch sites: which activation, at which layer, at which positions — and where its value comes from.

A :class:`PatchSite` names a canonical hook point (``blocks.3.resid_pre``, ``connector.out``), the
positions of the *target* run to overwrite (dim 1 of the tensor at that point: stream positions
for block points, query index for ``connector.out``) and the positions of the *source* run to read
(the same ones by default; an explicit map for cross-prompt patching). Several positions in one
site are patched together (a role: "all query tokens").

A :class:`SiteGrid` is a list of sites laid out as ``[kind, layer, column]`` (columns: positions,
roles or aligned position pairs) so a flat result vector reshapes into a heatmap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from uniprobe.hooks.layout import TokenLayout
from uniprobe.hooks.points import BLOCK_POINTS, layer_of

KINDS: tuple[str, ...] = BLOCK_POINTS  # resid_pre, attn_out, mlp_out, resid_post
# per-head site kinds (a separate grid: layer × head): every position at once / one position at a time
HEAD_KINDS: tuple[str, ...] = ("head_out", "head_out_pos")
HEAD_POINT = re.compile(r"^blocks\.\d+\.attn\.z$")


@dataclass(frozen=True)
class PatchSite:
    """One patch: ``target[point][:, positions] ← source[point][:, source_positions]``.

    Attributes:
        point: canonical hook point (``"blocks.2.attn_out"``, ``"connector.out"``).
        positions: positions (dim 1) of the target run's tensor at ``point``.
        source_positions: positions of the source run; ``None`` = same as ``positions``.
        label: a column label for tables and plots.
    """

    point: str
    positions: tuple[int, ...]
    source_positions: tuple[int, ...] | None = None
    label: str = ""
    head: int | None = None

    def __post_init__(self) -> None:
        if self.head is not None:
            if not HEAD_POINT.match(self.point) or int(self.head) < 0:
                raise ValueError(
                    f"site {self.point!r} head={self.head!r}: a head site patches one head's d_head slice of "
                    "blocks.{i}.attn.z (the o_proj input) — use that point and a head index >= 0"
                )
            object.__setattr__(self, "head", int(self.head))
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.source_positions is not None:
            object.__setattr__(self, "source_positions", tuple(int(p) for p in self.source_positions))
            if len(self.source_positions) != len(self.positions):
                raise ValueError(
                    f"site {self.point}: {len(self.positions)} target positions but "
                    f"{len(self.source_positions)} source positions"
                )
        if not self.positions:
            raise ValueError(f"site {self.point!r} has no positions")
        if len(set(self.positions)) != len(self.positions):
            raise ValueError(f"site {self.point!r} repeats a target position: {self.positions}")

    @property
    def layer(self) -> int | None:
        """Block index (None for model-level points such as ``connector.out``)."""
        return layer_of(self.point)

    @property
    def kind(self) -> str:
        """``resid_pre`` / ``attn_out`` / ``mlp_out`` / ``resid_post`` / ``attn.z``, or the point itself."""
        return self.point.split(".", 2)[2] if self.layer is not None else self.point

    @property
    def src(self) -> tuple[int, ...]:
        """Source positions (resolved)."""
        return self.positions if self.source_positions is None else self.source_positions


def block_point(kind: str, layer: int) -> str:
    """``blocks.{layer}.{kind}`` with a check on ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; choose from {', '.join(KINDS)}")
    return f"blocks.{layer}.{kind}"


@dataclass
class SiteGrid:
    """Sites in ``[kind, layer, column]`` order (kind-major), with the axes to reshape results.

    Attributes:
        sites: flat list, ``sites[(k * n_layers + l) * n_columns + c]``.
        kinds, layers: the first two axes; ``columns``: labels of the last axis.
    """

    sites: list[PatchSite]
    kinds: list[str]
    layers: list[int]
    columns: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.kinds), len(self.layers), len(self.columns))

    def reshape(self, flat: torch.Tensor) -> torch.Tensor:
        """``[n_sites] → [kind, layer, column]``."""
        return flat.reshape(self.shape)

    def __len__(self) -> int:
        return len(self.sites)


def _columns(
    kinds: Sequence[str],
    layers: Sequence[int],
    columns: Sequence[tuple[str, Sequence[int], Sequence[int] | None]],
) -> SiteGrid:
    sites = [
        PatchSite(block_point(k, layer), tuple(tgt), None if src is None else tuple(src), label)
        for k in kinds
        for layer in layers
        for label, tgt, src in columns
    ]
    return SiteGrid(sites, list(kinds), list(layers), [c[0] for c in columns])


def grid_sites(
    n_layers: int,
    n_positions: int,
    kinds: Sequence[str] = ("resid_pre",),
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
) -> SiteGrid:
    """Every ``kind × layer × position`` (one position per site, source position = target position).

    ``labels`` (one per position of the sequence, e.g. its tokens) name the columns.
    """
    layers = list(range(n_layers)) if layers is None else list(layers)
    positions = list(range(n_positions)) if positions is None else list(positions)
    bad = [p for p in positions if not 0 <= p < n_positions]
    if bad:
        raise ValueError(f"positions {bad} are outside the sequence (0..{n_positions - 1})")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model (0..{n_layers - 1})")
    cols = [(labels[p] if labels else str(p), (p,), None) for p in positions]
    return _columns(kinds, layers, cols)


def role_sites(
    n_layers: int,
    layout: TokenLayout,
    roles: Sequence[str],
    kinds: Sequence[str] = ("resid_pre",),
    *,
    layers: Sequence[int] | None = None,
) -> SiteGrid:
    """One site per ``kind × layer × role``: all positions of the role patched together.

    Every example of ``layout`` must have the role at the same positions (sites are shared by the
    rows of a batch); a role absent from the layout is an error naming the roles present.
    """
    layers = list(range(n_layers)) if layers is None else list(layers)
    cols = []
    for role in roles:
        mask = layout.mask(role)
        if not bool(mask.any()):
            present = [r for r, n in layout.counts().items() if n]
            raise ValueError(f"role {role!r} has no positions in this layout (present: {', '.join(present)})")
        if not bool((mask == mask[:1]).all()):
            raise ValueError(
                f"role {role!r} sits at different positions in different examples; patch them one by one"
            )
        cols.append((role, tuple(layout.positions(0, role)), None))
    return _columns(kinds, layers, cols)


def mapped_sites(
    n_layers: int,
    pairs: Sequence[tuple[int, int]],
    kinds: Sequence[str] = ("resid_pre",),
    *,
    layers: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    together: bool = False,
) -> SiteGrid:
    """Sites from ``(target_pos, source_pos)`` pairs (cross-prompt alignment).

    One column per pair, or (``together=True``) one column patching every pair at once.
    """
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not pairs:
        raise ValueError("no aligned positions to patch")
    if together:
        label = labels[0] if labels else "aligned"
        cols = [(label, tuple(t for t, _ in pairs), tuple(s for _, s in pairs))]
    else:
        cols = [(labels[i] if labels else f"{t}←{s}", (t,), (s,)) for i, (t, s) in enumerate(pairs)]
    return _columns(kinds, layers, cols)


def head_grid_sites(
    n_layers: int,
    n_heads: int,
    n_positions: int,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    by_position: bool = False,
    layout: TokenLayout | None = None,
    roles: Sequence[str] | None = None,
) -> SiteGrid:
    """Head sites ``layer × head × column`` at ``blocks.{l}.attn.z``: patch one head's ``d_head`` slice of
    the ``o_proj`` input (= that head's ``head_out``; the other heads keep theirs).

    Columns: ``"all"`` (every position in ``positions`` at once — TransformerLens's ``..._all_pos``),
    one per position (``by_position=True`` — ``..._by_pos``), or one per role of ``layout`` (``roles``).
    The grid is ``[kind "head_out", layer, head × column]``; ``meta`` holds ``heads`` and ``head_columns``
    so :func:`head_grid` reshapes results to ``[layer, head, column]``.
    """
    layers = list(range(n_layers)) if layers is None else list(layers)
    heads = list(range(n_heads)) if heads is None else list(heads)
    positions = list(range(n_positions)) if positions is None else list(positions)
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads {bad} are outside the attention (0..{n_heads - 1})")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model (0..{n_layers - 1})")
    bad = [p for p in positions if not 0 <= p < n_positions]
    if bad:
        raise ValueError(f"positions {bad} are outside the sequence (0..{n_positions - 1})")
    if roles is not None:
        if layout is None:
            raise ValueError("head_grid_sites(roles=...) needs the inputs' layout")
        cols = [(c.label, c.positions) for c in role_sites(1, layout, roles).sites]
    elif by_position:
        cols = [(str(p), (p,)) for p in positions]
    else:
        cols = [("all", tuple(positions))]
    sites = [
        PatchSite(f"blocks.{layer}.attn.z", tgt, None, f"h{h}:{label}", head=h)
        for layer in layers
        for h in heads
        for label, tgt in cols
    ]
    columns = [f"h{h}:{label}" for h in heads for label, _ in cols]
    meta = {"heads": heads, "head_columns": [label for label, _ in cols]}
    return SiteGrid(sites, ["head_out"], layers, columns, meta)


def head_grid(values: torch.Tensor, grid: SiteGrid) -> torch.Tensor:
    """``[n_sites]`` of a :func:`head_grid_sites` grid → ``[layer, head, column]``."""
    if "heads" not in grid.meta:
        raise ValueError("not a head_grid_sites grid (its meta has no 'heads')")
    return values.reshape(len(grid.layers), len(grid.meta["heads"]), len(grid.meta["head_columns"]))


def point_sites(point: str, positions: Sequence[int] | None = None, n: int | None = None) -> list[PatchSite]:
    """Sites at a model-level point (``connector.out``): one per index, or all ``n`` at once."""
    if positions is None:
        if n is None:
            raise ValueError("point_sites needs positions or n")
        return [PatchSite(point, tuple(range(n)), label=f"{point}[all]")]
    return [PatchSite(point, (p,), label=f"{point}[{p}]") for p in positions]


def as_site_list(sites: SiteGrid | Sequence[PatchSite]) -> tuple[list[PatchSite], SiteGrid | None]:
    """``(flat site list, the grid or None)`` for APIs that take either form."""
    if isinstance(sites, SiteGrid):
        return sites.sites, sites
    return list(sites), None
