"""From a store to probe designs: which examples and role selections to probe, one vector per example.

The store gives plain rows and their per-example reduction (:meth:`ActivationStore.matrix`,
``[n_examples, *feature]``, :meth:`ActivationStore.role_counts`); this module decides what a probe
reads: role selections (one role, several read together as ``"query+image_gen"``, or every role with
rows but ``pad`` that every labelled example has), the examples kept (``examples`` / ``classes``
filters, a read-only :meth:`ActivationStore.subset` view), the label vector (``None`` → ``-1``, never
trained on), and errors that name the roles a point does have (:class:`ProbeInputError`).
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
from uniprobe.probes.splits import ProbeInputError, encode_labels  # noqa: F401 - re-exported


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


def filter_examples(
    store: ActivationStore, label: str, examples: Iterable[str] | None, classes: Iterable[Any] | None
) -> ActivationStore:
    """``store`` restricted to the examples with these ids and whose ``label`` is one of ``classes``
    (a value or its text: ``3`` and ``"3"`` both keep label 3); a read-only view, or ``store`` itself.

    Raises:
        ProbeInputError: an id or class the store does not have (naming some it has).
    """
    if examples is None and classes is None:
        return store
    keep = set(range(store.n_examples))
    if examples is not None:
        wanted = [str(e) for e in examples]
        index = {str(ex["id"]): i for i, ex in enumerate(store.examples)}
        missing = [e for e in wanted if e not in index]
        if missing:
            raise ProbeInputError(
                f"examples {missing[:5]} are not in {store.path} ({len(missing)} missing); its ids "
                f"include {list(index)[:5]}"
            )
        keep &= {index[e] for e in wanted}
    if classes is not None:
        wanted = {str(c) for c in classes}  # label 3 and class "3" match: the CLI gives text
        values = store.labels(label)
        present = sorted({str(v) for v in values if v is not None})
        missing = sorted(wanted - set(present))
        if missing:
            raise ProbeInputError(
                f"classes {missing} are not values of label {label!r}; its values: {present}"
            )
        keep &= {i for i, v in enumerate(values) if v is not None and str(v) in wanted}
    if not keep:
        raise ProbeInputError(f"the examples / classes filters keep no example of {store.path}")
    return store.subset(sorted(keep))


def example_roles(store: ActivationStore) -> list[set[str]]:
    """The role names in each example's layout (``[N]`` sets), from the manifest (no shard read)."""
    return [set(store.layout(i)) for i in range(store.n_examples)]


def coverage(sel: Sequence[str], roles_of: list[set[str]]) -> Tensor:
    """``[N]`` bool: the examples whose layout has a role of ``sel`` (all, when no layout names
    any: the rows come from somewhere layouts do not describe)."""
    has = torch.tensor([bool(set(sel) & r) for r in roles_of], dtype=torch.bool)
    return has if bool(has.any()) else torch.ones(len(roles_of), dtype=torch.bool)


def role_selections(
    store: ActivationStore,
    points: list[str],
    roles: Iterable[str | Sequence[str]] | None,
    labelled: Tensor | None = None,
    notes: list[str] | None = None,
) -> dict[str, list[tuple[str, ...]]]:
    """Point → the role selections probed there: ``roles`` as tuples (a name alone is a 1-tuple),
    or, for ``None``, each role with rows at the point (not ``pad``) that every labelled example
    (``labelled`` ``[N]`` bool; default all) has, on its own; the roles left out are said in ``notes``."""
    if roles is None:
        roles_of = example_roles(store)
        lab = torch.ones(store.n_examples, dtype=torch.bool) if labelled is None else labelled
        n_lab = int(lab.sum())
        out, skipped = {}, {}
        for p in points:
            counts = store.role_counts(p)  # a view counts its rows: read once per point
            present = [r for r in ROLES if r in counts and r != "pad"]
            if not present:
                raise ProbeInputError(f"point {p!r} has no rows in {store.path}")
            keep = []
            for r in present:
                k = int((coverage((r,), roles_of) & lab).sum())
                if k == n_lab:
                    keep.append((r,))
                else:
                    skipped[r] = k
            if not keep:
                raise ProbeInputError(
                    f"no role at point {p!r} is in every labelled example ({', '.join(present)} are in "
                    "only some); pass roles (--roles) to probe the examples that have one"
                )
            out[p] = keep
        for r, k in skipped.items():
            if notes is not None:
                notes.append(
                    f"role {r!r} left out of the default roles: only {k} of the {n_lab} labelled examples "
                    f"have it; pass roles=[{r!r}] (--roles {r}) to probe those"
                )
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
