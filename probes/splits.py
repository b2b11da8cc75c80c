"""Leak-free splits for probes: a train/test split and k folds inside the training split.

A probe that sees a character's items on both sides of a split can memorise the character instead
of reading the attribute. Splits are therefore made over *groups*: the value of a label key such as
``entity`` or ``template`` (``group_by``). Every item of a group lands on one side of the train/test
split and in one cross-validation fold. Without ``group_by`` every example is its own group and the
split is stratified by class. Splits are made once per store, over global example indices, so every
probe (point × role) sees the same split.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from uniprobe.hooks.errors import UniprobeError


class ProbeInputError(UniprobeError, ValueError):
    """Bad input to a probe: unknown label key, too few examples, empty role selection, ..."""


def label_key(value: Any) -> str:
    """A label value as a hashable, sortable string (JSON)."""
    return json.dumps(value, sort_keys=True)


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


@dataclass
class Split:
    """Train/test split and folds over ``N`` global examples.

    Attributes:
        test: ``[N]`` bool, True for test examples.
        fold: ``[N]`` int64, the cross-validation fold of a training example, ``-1`` for test/unused.
        grouping: what kept the sides apart: ``"example"`` (no grouping) or the label key used.
        n_groups: number of distinct groups.
    """

    test: Tensor
    fold: Tensor
    grouping: str
    n_groups: int

    @property
    def train(self) -> Tensor:
        """``[N]`` bool: examples in a fold (the training split)."""
        return self.fold >= 0


def make_split(
    y: Tensor,
    groups: Sequence[Any] | None = None,
    *,
    folds: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    grouping: str | None = None,
) -> Split:
    """Split examples into train/test and the training examples into ``folds`` folds.

    Args:
        y: ``[N]`` int64 class per example; ``-1`` marks examples without the label (left out).
        groups: a group value per example (entity, template, ...); ``None``: every example alone,
            and then the test split and the folds are stratified by class.
        folds: number of cross-validation folds (at least 2).
        test_size: fraction of labelled examples (or, with groups, of groups' items) held out.
        grouping: the name to record for ``groups`` (the label key).

    Raises:
        ProbeInputError: fewer groups than needed for a test side and ``folds`` folds.
    """
    if folds < 2:
        raise ProbeInputError(f"folds must be at least 2, got {folds}")
    if not 0 < test_size < 1:
        raise ProbeInputError(f"test_size must be between 0 and 1, got {test_size}")
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    labelled = (y >= 0).nonzero().flatten()
    test = torch.zeros(n, dtype=torch.bool)
    fold = torch.full((n,), -1, dtype=torch.long)
    if groups is None:
        for c in y[labelled].unique().tolist():
            idx = labelled[y[labelled] == c]
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_test = int(round(test_size * len(idx))) if len(idx) > 1 else 0
            test[idx[:n_test]] = True
            rest = idx[n_test:]
            fold[rest] = (torch.arange(len(rest)) + int(torch.randint(folds, (1,), generator=gen))) % folds
        return Split(test, fold, "example", len(labelled))

    if len(groups) != n:
        raise ProbeInputError(f"groups has {len(groups)} entries for {n} examples")
    members: dict[str, list[int]] = defaultdict(list)
    for i in labelled.tolist():
        members[label_key(groups[i])].append(i)
    keys = sorted(members)
    if len(keys) < folds + 1:
        raise ProbeInputError(
            f"grouping by {grouping or 'groups'!r} gives {len(keys)} groups among the labelled examples; "
            f"a test side and {folds} folds need at least {folds + 1}"
        )
    order = [keys[i] for i in torch.randperm(len(keys), generator=gen).tolist()]
    n_lab, held, n_test_groups = len(labelled), 0, 0
    train_keys = []
    for key in order:  # whole groups to the test side until it holds test_size of the items
        if held < test_size * n_lab and len(order) - n_test_groups - 1 >= folds:
            test[members[key]] = True
            held += len(members[key])
            n_test_groups += 1
        else:
            train_keys.append(key)
    # largest groups first, each to the lightest fold: balanced group k-fold
    sizes = [0] * folds
    for key in sorted(train_keys, key=lambda k: -len(members[k])):
        f = min(range(folds), key=lambda j: (sizes[j], j))
        fold[members[key]] = f
        sizes[f] += len(members[key])
    return Split(test, fold, grouping or "groups", len(keys))


def leaked_groups(groups: Sequence[Any], split: Split) -> list[str]:
    """Group values found on both sides of the split, or in two folds (empty when nothing leaks)."""
    sides: dict[str, set[int]] = defaultdict(set)
    for i, g in enumerate(groups):
        if split.test[i]:
            sides[label_key(g)].add(-2)
        elif split.fold[i] >= 0:
            sides[label_key(g)].add(int(split.fold[i]))
    return sorted(k for k, s in sides.items() if len(s) > 1)


def check_class_counts(
    y: Tensor, train: Tensor, classes: Sequence[Any], folds: int, where: str, label: str
) -> None:
    """Every class needs at least ``folds`` training examples for cross-validation.

    Args:
        y: ``[n]`` class indices of a probe's examples; train: ``[n]`` bool training rows.
        classes: the class values (index → value), for the message; where: the probe (point, role).

    Raises:
        ProbeInputError: naming the class, its count and a number of folds that would work.
    """
    counts = Counter(y[train].tolist())
    for c, value in enumerate(classes):
        k = counts.get(c, 0)
        if k < folds:
            fix = (  # advice that is sure to work comes from checked_split, which tries it first
                "pass fewer folds or keep fewer classes (classes=...)"
                if k >= 2
                else "keep fewer classes (classes=...) or capture more examples of it"
            )
            raise ProbeInputError(
                f"class {value!r} of label {label!r} has {k} training examples at {where}, fewer than "
                f"folds={folds}; {fix}"
            )


def split_problems(
    y: Tensor, classes: Sequence[Any], split: Split, coverage: dict[str, Tensor], folds: int, label: str
) -> list[tuple[int, str]]:
    """``(class index, message)`` for every class with fewer than ``folds`` training examples among
    the examples some probe reads (``coverage``: where → ``[N]`` bool examples it reads)."""
    out = []
    for where, mask in coverage.items():
        counts = Counter(y[split.train & mask].tolist())
        for c, value in enumerate(classes):
            k = counts.get(c, 0)
            if k < folds:
                out.append((c, f"class {value!r} of label {label!r} has {k} training examples at {where}, "
                            f"fewer than folds={folds}"))  # fmt: skip
    return out


def checked_split(
    values: Sequence[Any],
    groups: Sequence[Any] | None = None,
    *,
    coverage: dict[str, Tensor] | None = None,
    label: str = "label",
    folds: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    grouping: str | None = None,
) -> tuple[Tensor, list, Split]:
    """Encode ``values`` (``N`` label values, ``None``: unlabelled) and split them, checking that every
    probe (``coverage``: where → ``[N]`` bool of the examples it reads; default: all) has at least
    ``folds`` training examples of every class.

    Returns:
        ``(y [N], classes, split)`` as :func:`encode_labels` and :func:`make_split` give them.

    Raises:
        ProbeInputError: too few groups or training examples. Its advice (fewer folds; keeping only
            some classes, as ``classes=`` / ``--classes`` would) was tried here first and works: a
            grouped split changes with the number of folds and with the examples kept, so a guess
            such as "folds=k" may not.
    """
    n = len(values)
    coverage = coverage or {"every probe": torch.ones(n, dtype=torch.bool)}
    if len(groups or values) != n:
        raise ProbeInputError(f"groups has {len(groups or [])} entries for {n} examples")
    args = (values, groups, coverage, label, test_size, seed, grouping)
    try:
        return _attempt(*args, folds, None)
    except ProbeInputError as err:
        if folds < 2 or not 0 < test_size < 1:
            raise
        raise ProbeInputError(f"{err}; {_advice(*args, folds)}") from None


def _attempt(
    values: Sequence[Any],
    groups: Sequence[Any] | None,
    coverage: dict[str, Tensor],
    label: str,
    test_size: float,
    seed: int,
    grouping: str | None,
    folds: int,
    drop: set[str] | None,
) -> tuple[Tensor, list, Split]:
    """One try: the examples of the classes in ``drop`` left out (as a ``classes`` filter would)."""
    keep = [i for i, v in enumerate(values) if not drop or v is None or label_key(v) not in drop]
    y, classes = encode_labels([values[i] for i in keep])
    kept_groups = None if groups is None else [groups[i] for i in keep]
    cov = {w: m[torch.tensor(keep, dtype=torch.long)] for w, m in coverage.items()}
    split = make_split(y, kept_groups, folds=folds, test_size=test_size, seed=seed, grouping=grouping)
    problems = split_problems(y, classes, split, cov, folds, label)
    if problems:
        err = ProbeInputError(problems[0][1])
        err.failing = sorted({label_key(classes[c]) for c, _ in problems})  # type: ignore[attr-defined]
        raise err
    if len(classes) < 2:
        raise ProbeInputError(f"label {label!r} would keep {len(classes)} class(es); a probe needs two")
    return y, classes, split


def _advice(
    values: Sequence[Any],
    groups: Sequence[Any] | None,
    coverage: dict[str, Tensor],
    label: str,
    test_size: float,
    seed: int,
    grouping: str | None,
    folds: int,
) -> str:
    """A fix that was tried and works: fewer folds, else keeping fewer classes (with fewer folds)."""
    args = (values, groups, coverage, label, test_size, seed, grouping)

    def works(f: int, drop: set[str] | None) -> list[str] | None:  # None: works; else the failing classes
        try:
            _attempt(*args, f, drop)
        except ProbeInputError as err:
            return getattr(err, "failing", [])
        return None

    for f in range(folds - 1, 1, -1):
        if works(f, None) is None:
            return f"pass folds={f} (--folds {f}), which was tried and works"
    drop: set[str] = set()
    first = {label_key(v): v for v in reversed(values) if v is not None}
    present = sorted(first)
    while len(present) - len(drop) > 2:
        failing = works(folds, drop)
        if not failing:  # too few groups / classes, not a class: dropping classes will not help
            break
        drop |= set(failing)
        for f in range(folds, 1, -1):
            if len(present) - len(drop) >= 2 and works(f, drop) is None:
                kept = [first[k] for k in present if k not in drop]
                fold = "" if f == folds else f" and folds={f} (--folds {f})"
                return (
                    f"keep only classes {', '.join(map(str, kept))} (classes={kept!r}, --classes "
                    f"{' '.join(map(str, kept))}){fold}, which was tried and works"
                )
    return "no smaller number of folds or set of classes fixes it: capture more examples" + (
        f", or group by a key with more values than {grouping!r}" if grouping else ""
    )


def shuffled_labels(y: Tensor, sides: Sequence[Tensor], seed: int) -> Tensor:
    """The control task: labels ``[n]`` permuted within each side (``[n]`` bool masks, e.g. train, test).

    Rows outside every side keep their label.
    """
    gen = torch.Generator().manual_seed(seed)
    out = y.clone()
    for side in sides:
        idx = side.nonzero().flatten()
        out[idx] = y[idx[torch.randperm(len(idx), generator=gen)]]
    return out


def bootstrap_ci(
    correct: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` ``[n]`` (0/1), resampling examples."""
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=gen)
    means = correct.float()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return lo, hi
