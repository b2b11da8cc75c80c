"""Many linear probes at once: where in the network is a label linearly readable?

One probe per (hook point, role selection) of a store: the activations of each example at that
point, reduced over the role's positions (``"last"``, ``"mean"``, ...), predict a label (the answer
of an arithmetic item, a character's favourite fruit). All probes are trained together
(:mod:`uniprobe.probes.solvers`: one batched L-BFGS for multinomial logistic regression, or closed-form
ridge), with for every probe:

- standardisation by the training split's mean and std;
- the L2 strength chosen by k-fold cross-validation on the training split (each probe its own ``C``;
  the logistic path over ``C`` is warm-started from the previous ``C``);
- a leak-free split (:mod:`uniprobe.probes.splits`): grouped by a label key such as ``entity`` when asked;
- a shuffled-label control (same probe, same ``C``, labels permuted within each side of the split),
  and selectivity = accuracy − control accuracy;
- a seeded percentile-bootstrap interval of the test accuracy.

    res = probe_store(store, "answer", points="blocks.*.resid_post", roles=["text", "query"])
    res.save("artifacts/probe")     # results.json / .csv, directions.safetensors, probe_map.png
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from uniprobe.hooks.points import expand
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store.errors import IncompleteStoreWarning
from uniprobe.probes.design import (
    ProbeGroup,
    coverage,
    encode_labels,  # noqa: F401 - re-exported (uniprobe.experiments.seeds imports it from here)
    example_roles,
    filter_examples,
    read_group,
    role_selections,
)
from uniprobe.probes.results import ProbeResults
from uniprobe.probes.splits import ProbeInputError, checked_split
from uniprobe.probes.trainer import DEFAULT_CS, train_probes


def probe_tensors(
    x: Tensor | Sequence[Tensor],
    labels: Sequence[Any],
    *,
    names: Sequence[tuple[str, str]] | None = None,
    group_values: Sequence[Any] | None = None,
    group_by: str | None = None,
    method: str = "logistic",
    folds: int = 5,
    seed: int = 0,
    test_size: float = 0.2,
    cs: Sequence[float] = DEFAULT_CS,
    n_boot: int = 1000,
    max_iter: int = 300,
) -> ProbeResults:
    """Probes on tensors: ``x`` ``[G, n, d]`` (or ``G`` tensors ``[n, d]``) over the same ``n`` examples.

    Args:
        labels: ``n`` label values (``None``: unlabelled). ``names``: ``(point, role)`` per group
            (default ``("group{i}", "all")``). ``group_values``: ``n`` values to group the split by
            (recorded as ``group_by``). Other arguments as in :func:`train_probes`.
    """
    xs = list(x) if not isinstance(x, Tensor) else list(x.unbind(0))
    names = names or [(f"group{i}", "all") for i in range(len(xs))]
    if len(names) != len(xs):
        raise ProbeInputError(f"{len(names)} names for {len(xs)} groups")
    y, classes, split = checked_split(
        list(labels), group_values, folds=folds, test_size=test_size, seed=seed, grouping=group_by
    )
    groups = [ProbeGroup(p, r, v, torch.arange(len(v))) for (p, r), v in zip(names, xs, strict=True)]
    return train_probes(
        groups,
        y,
        classes,
        split,
        label="label",
        method=method,
        cs=cs,
        folds=folds,
        seed=seed,
        n_boot=n_boot,
        max_iter=max_iter,
    )


def probe_store(
    store: ActivationStore | str | os.PathLike,
    label: str,
    points: str | Iterable[str] = "blocks.*.resid_post",
    roles: Iterable[str | Sequence[str]] | None = None,
    reduce: str | int = "last",
    group_by: str | None = None,
    method: str = "logistic",
    folds: int = 5,
    seed: int = 0,
    *,
    test_size: float = 0.2,
    cs: Sequence[float] = DEFAULT_CS,
    step: int | Iterable[int] | None = None,
    branch: str | int | None = "cond",
    n_boot: int = 1000,
    max_iter: int = 300,
    max_bytes: int = 1 << 30,
    workers: int | None = None,
    examples: Iterable[str] | None = None,
    classes: Iterable[Any] | None = None,
) -> ProbeResults:
    """One probe per (point, role selection) of ``store``, predicting label ``label``.

    Args:
        store: an :class:`ActivationStore` or its directory.
        label: the label key to predict (see ``store.label_keys``).
        points: names or globs of the store's points (``"blocks.*.resid_post"``).
        roles: role selections, each a role name or a list of names read together (``["query",
            "image_gen"]``); ``None``: every role with rows at a point that every labelled example
            has, one probe each (not ``pad``); roles left out are said in ``meta["notes"]``.
        reduce: how an example's rows of a role become one vector: ``"last"``, ``"first"``,
            ``"mean"`` or an int position among them (see :meth:`ActivationStore.matrix`).
        group_by: a label key whose value keeps items together across the split (``"entity"``,
            ``"template"``); ``None``: a stratified split by example.
        step, branch: generation step(s) and guidance branch to read (image-generation positions).
        max_bytes: activations are read and trained a slice of points at a time, within this.
        examples: probe only the examples with these ids; ``classes``: only the examples whose
            label is one of these values (``3`` or ``"3"``). Both read a :meth:`ActivationStore.subset`.
        Others: see :func:`train_probes`.

    Raises:
        ProbeInputError: unknown label / group key / example id / class, a role selection that is
            empty or has no rows, a class with fewer training examples than ``folds`` (with advice
            that was tried and works: fewer folds, or ``classes`` to keep).
    """
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    if not store.complete:
        warnings.warn(incomplete_message(store), IncompleteStoreWarning, stacklevel=2)
    keys = store.label_keys
    for what, key in (("label", label), ("group_by", group_by)):
        if key is not None and key not in keys:
            raise ProbeInputError(f"{what} key {key!r} is not in the store {store.path}; label keys: {keys}")
    store = filter_examples(store, label, examples, classes)
    names = expand(points, store.points)
    values = store.labels(label)
    notes: list[str] = []
    labelled = torch.tensor([v is not None for v in values], dtype=torch.bool)
    selections = role_selections(store, names, roles, labelled, notes)
    roles_of = example_roles(store)
    sels = dict.fromkeys(sel for per_point in selections.values() for sel in per_point)
    reads = {f"role {'+'.join(sel)!r}": coverage(sel, roles_of) for sel in sels}  # the examples each reads
    y, class_values, split = checked_split(
        values, store.labels(group_by) if group_by else None, coverage=reads, label=label, folds=folds,
        test_size=test_size, seed=seed, grouping=group_by,
    )  # fmt: skip
    # read and train a slice of the points at a time: memory holds one slice of matrices
    per_point = store.n_examples * max(math.prod(store.feature_shape(p)) for p in names) * 4
    chunk = max(1, max_bytes // max(per_point * max(len(selections[p]) for p in names), 1))
    parts = []
    used: set[int] = set()  # examples with the label that some probe read
    for start in range(0, len(names), chunk):
        groups = []
        for point in names[start : start + chunk]:
            for sel in selections[point]:
                groups.append(read_group(store, point, sel, reduce, step, branch))
        for g in groups:
            used.update(g.example[y[g.example] >= 0].tolist())
        parts.append(
            train_probes(
                groups,
                y,
                class_values,
                split,
                label=label,
                method=method,
                cs=cs,
                folds=folds,
                seed=seed,
                n_boot=n_boot,
                max_iter=max_iter,
                max_bytes=max_bytes,
                workers=workers,
            )  # fmt: skip
        )
    res = ProbeResults(
        [r for p in parts for r in p.rows],
        parts[0].meta,
        {k: v for p in parts for k, v in p.directions.items()},
    )
    res.meta.update(
        {"store": str(store.path), "reduce": reduce, "points": names, "step": step, "branch": branch}
    )
    # how much of the capture these probes saw: an unfinished store gives results on fewer examples
    res.meta.update(
        {
            "store_complete": store.complete,
            "store_examples": store.n_examples,
            "store_examples_expected": store.expected_examples,
            "examples_used": len(used),
            "notes": notes,
        }
    )
    return res


def incomplete_message(store: ActivationStore) -> str:
    """The warning for probing a store whose capture is unfinished."""
    expected = store.expected_examples
    of = f" of the {expected} the capture was given" if expected is not None else ""
    return (
        f"the store {store.path} is incomplete (its capture did not finish): probing only the "
        f"{store.n_examples} examples present{of}; finish it with `uniprobe capture ... --resume` "
        "(the same command plus --resume) for results on every example"
    )
