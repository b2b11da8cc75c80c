"""From a store to probe designs: which role selections to probe, one vector per example, labels.

The store gives plain rows and their per-example reduction (:meth:`ActivationStore.matrix`,
``[n_examples, *feature]``, :meth:`ActivationStore.role_counts`); this module decides what a probe
reads: role selections (one role, several read together as ``"query+image_gen"``, or every role with
rows but ``pad``), the label vector (``None`` → ``-1``, never trained on), and errors that name the
roles a point does have (:class:`ProbeInputError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.points import layer_of
from uniprobe.hooks.store import ActivationStore
from uniprobe.probes.splits import ProbeInputError, label_key


@dataclass
class ProbeGroup:
    """One probe's data.

    Attributes:
        point, role: where the activations were read (``role`` may join several with ``+``).
        values: ``[n, d]`` one row per example (already reduced over positions).
        example: ``[n]`` int64 global example indices (into the label vector).
    """

    point: str
    role: str
    values: Tensor
    example: Tensor

    @property
    def layer(self) -> int | None:
        return layer_of(self.point)


def encode_labels(values: Sequence[Any]) -> tuple[Tensor, list]:
    """Label values → (``[N]`` int64 class indices, ``-1`` where ``None``; the sorted class values)."""
    keys = sorted({label_key(v) for v in values if v is not None})
    index = {k: i for i, k in enumerate(keys)}
    first = {}
    for v in values:
        if v is not None:
            first.setdefault(label_key(v), v)
    y = torch.tensor([-1 if v is None else index[label_key(v)] for v in values], dtype=torch.long)
    return y, [first[k] for k in keys]


def read_group(
    store: ActivationStore,
    point: str,
    sel: tuple[str, ...],
    reduce: str | int,
    step: int | Iterable[int] | None,
    branch: str | int | None,
) -> ProbeGroup:
    """The probe data of role selection ``sel`` at ``point``: each example's rows of those roles reduced
    to one vector (:meth:`ActivationStore.matrix`): ``values`` ``[n_kept, *feature]``.

    Raises:
        ProbeInputError: the selection has no rows there (naming the roles that have).
    """
    try:
        m = store.matrix(point, role=list(sel), reduce=reduce, step=step, branch=branch)
    except ValueError as err:
        present = store.role_counts(point)
        raise ProbeInputError(
            f"role selection {'+'.join(sel)!r} has no rows at point {point!r} "
            f"(step {step!r}, branch {branch!r}); roles present there: "
            f"{', '.join(f'{r} ({c} rows)' for r, c in present.items()) or 'none'}. ({err})"
        ) from None
    return ProbeGroup(point, "+".join(sel), m.values, m.example)


def role_selections(
    store: ActivationStore, points: list[str], roles: Iterable[str | Sequence[str]] | None
) -> dict[str, list[tuple[str, ...]]]:
    """Point → the role selections probed there: ``roles`` as tuples (a name alone is a 1-tuple),
    or, for ``None``, each role with rows at the point (not ``pad``) on its own."""
    if roles is None:
        out = {}
        for p in points:
            counts = store.role_counts(p)  # a view counts its rows: read once per point
            present = [r for r in ROLES if r in counts and r != "pad"]
            if not present:
                raise ProbeInputError(f"point {p!r} has no rows in {store.path}")
            out[p] = [(r,) for r in present]
        return out
    sels = [(r,) if isinstance(r, str) else tuple(r) for r in roles]
    if not sels or any(not s for s in sels):
        present = sorted({r for p in points for r in store.role_counts(p)})
        raise ProbeInputError(
            f"empty role selection; pass at least one role (roles present in {store.path}: "
            f"{', '.join(present)})"
        )
    for s in sels:
        for r in s:
            if r not in ROLES:
                raise ProbeInputError(f"unknown role {r!r}; roles are {', '.join(ROLES)}")
    return {p: sels for p in points}
