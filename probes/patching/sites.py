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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from uniprobe.hooks.layout import TokenLayout
from uniprobe.hooks.points import BLOCK_POINTS, layer_of

KINDS: tuple[str, ...] = BLOCK_POINTS  # resid_pre, attn_out, mlp_out, resid_post


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

    def __post_init__(self) -> None:
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
        """``resid_pre`` / ``attn_out`` / ``mlp_out`` / ``resid_post``, or the point itself."""
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
