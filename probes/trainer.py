"""The batched probe trainer: every probe of a batch fitted at once, with its controls.

:func:`train_probes` is the engine under :func:`uniprobe.probes.linear.probe_store` /
:func:`~uniprobe.probes.linear.probe_tensors` (see :mod:`uniprobe.probes.linear` for the protocol):
it prepares each probe's design (standardised, split, folds), packs probes into batches under a
memory budget, deals the batches over threads (``workers``, one torch thread each), and runs the
cross-validated path over ``C``, the refit and the shuffled-label control through
:mod:`uniprobe.probes.solvers`.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from uniprobe.probes.design import ProbeGroup
from uniprobe.probes.results import ProbeResults, nan_to_none, probe_key
from uniprobe.probes.solvers import (
    Design,
    LinearFit,
    argmax_classes,
    class_counts,
    design,
    fit_logistic,
    fit_ridge,
)
from uniprobe.probes.splits import (
    ProbeInputError,
    Split,
    bootstrap_ci,
    check_class_counts,
    shuffled_labels,
)

METHODS: tuple[str, ...] = ("logistic", "ridge")
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_ABSENT = -1e9  # bias of a class a probe never saw in training: never predicted


def train_probes(
    groups: Sequence[ProbeGroup],
    y: Tensor,
    classes: list,
    split: Split,
    *,
    label: str = "label",
    method: str = "logistic",
    cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    max_iter: int = 300,
    tol: float = 1e-4,
    max_bytes: int = 1 << 29,
    workers: int | None = None,
) -> ProbeResults:
    """Train, select, control and score one probe per group.

    Args:
        groups: the probes' data; ``y`` ``[N]`` class index per global example (``-1``: unlabelled);
            ``classes``: class values; ``split``: from :func:`uniprobe.probes.splits.make_split` over
            the same ``N``.
        method: ``"logistic"`` (multinomial, scikit-learn's objective) or ``"ridge"`` (one-hot targets).
        cs: the grid of inverse strengths ``C`` (ridge: ``alpha = 1/C``) searched by ``folds``-fold CV.
        n_boot: bootstrap resamples for the test-accuracy interval.
        max_bytes: probes are trained in batches whose ``[B, n, d]`` float32 features fit in this.
        workers: split each batch over this many threads, each running torch on one thread (default:
            ``torch.get_num_threads()``). The probes are independent problems, so this parallelises
            the whole solver, not only its large products; 1 runs each batch on torch's own threads.

    Returns:
        :class:`ProbeResults` (rows in the order of ``groups``).
    """
    if method not in METHODS:
        raise ProbeInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(classes) < 2:
        raise ProbeInputError(f"label {label!r} has {len(classes)} class(es) {classes}; a probe needs two")
    cs = sorted(float(c) for c in cs)
    prepared = [_prepare(g, y, split, classes, folds, label) for g in groups]
    rows: list[dict | None] = [None] * len(groups)
    directions: dict[str, Tensor] = {}
    workers = torch.get_num_threads() if workers is None else max(1, int(workers))

    def train(batch: list[int]) -> list:
        items = [prepared[i] for i in batch]
        return list(_train_batch(items, batch, len(classes), method, cs, folds, seed, n_boot, max_iter, tol))

    parts_of = [part for batch in _batches(prepared, max_bytes) for part in _split(batch, workers)]
    for i, row, parts in itertools.chain.from_iterable(_in_threads(train, parts_of, workers)):
        row["grouping"] = split.grouping
        rows[i] = row
        key = probe_key(row["point"], row["role"])
        directions.update({f"{key}/{name}": t for name, t in parts.items()})
    meta = {
        "label": label,
        "classes": classes,
        "method": method,
        "grouping": split.grouping,
        "n_groups": split.n_groups,
        "folds": folds,
        "seed": seed,
        "cs": cs,
        "n_boot": n_boot,
        "n_train": int(split.train.sum()),
        "n_test": int(split.test.sum()),
        "standardise": "training-split mean/std (also used inside the CV folds)",
        "control": "same probe and C, labels permuted within the training and within the test split",
    }
    return ProbeResults([r for r in rows if r is not None], meta, directions)


def _split(batch: list[int], parts: int) -> list[list[int]]:
    """``batch`` dealt into ``parts`` nearly equal pieces (fewer if it is shorter); dealt, not cut, so
    neighbouring probes (adjacent layers, alike in difficulty) spread over the pieces."""
    return [batch[j :: min(parts, len(batch))] for j in range(min(parts, len(batch)))]


def _in_threads(fn: Callable[[list[int]], list], jobs: list[list[int]], workers: int) -> list[list]:
    """``[fn(job) for job in jobs]``, on ``workers`` threads that each run torch on one thread.

    Torch releases the GIL inside its kernels, so independent probe batches use separate cores; the
    calling thread's torch thread count is restored afterwards (``set_num_threads`` also sets the
    default that new threads start from).
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    before = torch.get_num_threads()

    def one_thread(job: list[int]) -> list:
        torch.set_num_threads(1)
        return fn(job)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one_thread, jobs))
    finally:
        torch.set_num_threads(before)


def _prepare(g: ProbeGroup, y: Tensor, split: Split, classes: list, folds: int, label: str) -> dict:
    values = g.values.reshape(len(g.values), -1)
    ex = g.example.long()
    keep = (y[ex] >= 0) & (split.test[ex] | split.train[ex])
    where = f"point {g.point!r}, role {g.role!r}"
    if not bool(keep.any()):
        raise ProbeInputError(f"no labelled examples at {where}")
    rows = keep.nonzero().flatten()
    rows = rows[torch.argsort(split.test[ex[rows]].long(), stable=True)]  # training rows first
    if len(rows) < len(ex) or bool((rows != torch.arange(len(rows))).any()):  # else: in order, no copy
        values, ex = values[rows], ex[rows]
    yg = y[ex]
    check_class_counts(yg, split.train[ex], classes, folds, where, label)
    return {"group": g, "x": values, "y": yg, "test": split.test[ex], "fold": split.fold[ex]}


def _batches(prepared: list[dict], max_bytes: int) -> list[list[int]]:
    by_dim: dict[int, list[int]] = {}
    for i, p in enumerate(prepared):
        by_dim.setdefault(p["x"].shape[1], []).append(i)
    out = []
    for idx in by_dim.values():
        batch: list[int] = []
        for i in idx:
            n_max = max([len(prepared[j]["y"]) for j in batch + [i]])
            if batch and (len(batch) + 1) * n_max * prepared[i]["x"].shape[1] * 4 > max_bytes:
                out.append(batch)
                batch = []
            batch.append(i)
        out.append(batch)
    return out


def _pad(parts: list[Tensor], n: int, fill: float | int) -> Tensor:
    """A new ``[len(parts), n, ...]`` tensor of the parts, each padded with ``fill``."""
    if all(len(p) == n for p in parts):
        return torch.stack(parts)
    out = torch.full((len(parts), n, *parts[0].shape[1:]), fill, dtype=parts[0].dtype)
    for i, p in enumerate(parts):
        out[i, : len(p)] = p
    return out


def _train_batch(
    items: list[dict],
    index: list[int],
    k: int,
    method: str,
    cs: list[float],
    folds: int,
    seed: int,
    n_boot: int,
    max_iter: int,
    tol: float,
) -> Iterable[tuple[int, dict, dict[str, Tensor]]]:
    n = max(len(it["y"]) for it in items)
    x = _pad([it["x"].float() for it in items], n, 0.0)  # [B, n, d]
    y = _pad([it["y"] for it in items], n, 0)
    fold = _pad([it["fold"] for it in items], n, -1)
    test = _pad([it["test"] for it in items], n, False)
    train = fold >= 0
    # standardise with training-split statistics (the fits see x / std; x is only centred, in place)
    n_tr = int(train.sum(1).max())  # rows are ordered training first: fits see only the first n_tr rows
    if bool(train[:, :n_tr].all()):  # the same training rows in every probe
        mean = x[:, :n_tr].mean(1, keepdim=True)
    else:
        wt = (train.float() / train.sum(1, keepdim=True).clamp_min(1))[:, None]  # [B, 1, n]
        mean = torch.bmm(wt, x)
    x.sub_(mean)  # x is _pad's own copy
    valid = train | test
    if not bool(valid.all()):
        x *= valid[..., None]  # padding rows stay zero

    x_tr, y_tr, fold_tr, train_tr = x[:, :n_tr], y[:, :n_tr], fold[:, :n_tr], train[:, :n_tr]
    fit_w = torch.stack([(train_tr & (fold_tr != f)) for f in range(folds)], 1).float()  # [B, F, n_tr]
    held = torch.stack([fold_tr == f for f in range(folds)], 1)  # [B, F, n_tr]
    if method == "logistic":
        # every fit below runs on the standardised features rotated once onto their principal axes
        feats = design(x_tr, train_tr, standardise=True)
        std = feats.scale
    else:
        count = train_tr.sum(1, keepdim=True).clamp_min(1)
        std = (x_tr.square() * train_tr[..., None]).sum(1).div_(count).sqrt_()
        std = torch.where(std > 1e-6 * std.amax(-1, keepdim=True).clamp_min(1e-30), std, 1.0)
        feats = x_tr / std[:, None, :]
    cv_acc, cv_loss, fold_mean = _cross_validate(feats, y_tr, fit_w, held, k, method, cs, max_iter, tol)
    best = torch.argmax(cv_acc - 1e-9 * cv_loss, dim=1)  # ties: the lower held-out loss
    c_best = torch.tensor(cs, dtype=torch.float64)[best]  # [B]

    # each probe's control and bootstrap seeds follow from (seed, point, role), not from batching
    gen_seeds = [
        seed * 100_003 + zlib.crc32(probe_key(it["group"].point, it["group"].role).encode()) for it in items
    ]
    y_ctrl = torch.stack([shuffled_labels(y[b], (train[b], test[b]), s) for b, s in enumerate(gen_seeds)])
    y2 = torch.stack([y, y_ctrl], 1)[..., :n_tr]  # [B, 2, n_tr]: the probe and its control
    w2 = train_tr.float()[:, None].expand(-1, 2, -1)
    if method == "logistic":
        init_w = fold_mean[torch.arange(len(items)), best]  # [B, K, d+1]
        init = torch.stack([init_w, torch.zeros_like(init_w)], 1)[:, :, None]
        c2 = c_best.float()[:, None, None].expand(-1, 2, 1)
        start = (init[..., :-1], init[..., -1])
        fit = feats.unrotate(fit_logistic(feats, y2, w2, c2, k, max_iter=max_iter, tol=tol, init=start))
    else:
        fit = fit_ridge(feats, y2, w2, (1.0 / c_best)[:, None, None].expand(-1, 2, 1), k)
    _mask_absent(fit, class_counts(y2, w2, k) > 0)
    on_centred = LinearFit(fit.weight / std[:, None, None, None, :], fit.bias, fit.n_iter, fit.converged)
    pred = on_centred.predict(x)[:, :, 0]  # [B, 2, n]
    for b, it in enumerate(items):
        g: ProbeGroup = it["group"]
        rows_test = test[b]
        correct = (pred[b, 0] == y[b])[rows_test]
        ctrl = (pred[b, 1] == y_ctrl[b])[rows_test]
        acc = float(correct.float().mean()) if len(correct) else math.nan
        control = float(ctrl.float().mean()) if len(ctrl) else math.nan
        lo, hi = bootstrap_ci(correct, n_boot, seed=gen_seeds[b])
        counts = torch.bincount(y[b][rows_test], minlength=k)
        row = {
            "point": g.point,
            "layer": g.layer,
            "role": g.role,
            "n": len(it["y"]),
            "n_train": int(train[b].sum()),
            "n_test": int(rows_test.sum()),
            "accuracy": nan_to_none(acc),
            "ci_low": nan_to_none(lo),
            "ci_high": nan_to_none(hi),
            "control": nan_to_none(control),
            "selectivity": nan_to_none(acc - control),
            "chance": nan_to_none(float(counts.max() / counts.sum()) if counts.sum() else math.nan),
            "cv_accuracy": float(cv_acc[b, best[b]]),
            "C": cs[int(best[b])],
            "method": method,
            "converged": bool(fit.converged[b, 0, 0]),
            "n_iter": int(fit.n_iter[b, 0, 0]),
        }
        s, m = std[b], mean[b, 0]
        weight = on_centred.weight[b, 0, 0]  # [K, d]: the fit on standardised features, on raw ones
        bias = fit.bias[b, 0, 0] - weight @ m
        parts = {"weight": weight, "bias": bias, "mean": m, "std": s}
        yield index[b], row, {name: t.float().contiguous() for name, t in parts.items()}


def _mask_absent(fit: LinearFit, present: Tensor) -> None:
    """Classes absent from a problem's training rows ``[B, F, K]`` get a bias that never wins."""
    fit.bias.masked_fill_(~present[:, :, None, :].expand_as(fit.bias), _ABSENT)


def _cross_validate(
    x: Tensor | Design,
    y: Tensor,
    fit_w: Tensor,
    held: Tensor,
    k: int,
    method: str,
    cs: list[float],
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Held-out accuracy and loss ``[B, A]`` (fold means) per ``C``; fold-mean fits ``[B, A, K, d+1]``
    (logistic: on ``x``'s rotated features)."""
    nb, nf, n = fit_w.shape
    present = class_counts(y[:, None].expand(-1, nf, -1), fit_w, k) > 0
    all_present = bool(present.all())
    features = x.features if isinstance(x, Design) else x
    n_held = held.sum(-1).clamp_min(1)
    accs, losses, means = [], [], []

    def evaluate(fit: LinearFit) -> None:
        logits = fit.fitted_logits  # [B, F, A', K, n]: kept by the solver, else one product
        if logits is None or logits.shape[-1] != n:
            logits = fit.logits(features)
        bias = fit.bias
        if not all_present:  # a class absent from a fold's training rows is never predicted
            logits = logits.masked_fill(~present[:, :, None, :, None], _ABSENT)
            bias = bias.masked_fill(~present[:, :, None, :], _ABSENT)
        for a in range(logits.shape[2]):
            z = logits[:, :, a]  # [B, F, K, n]
            correct = (argmax_classes(z, 2) == y[:, None]).float()
            if method == "ridge":
                target = torch.nn.functional.one_hot(y, k).mT[:, None].float()
                loss = ((z - target) ** 2).sum(2)
            else:
                loss = -torch.log_softmax(z, 2).gather(2, y[:, None, None].expand(-1, nf, 1, -1)).squeeze(2)
                loss = loss.clamp_max(30.0)
            accs.append(((correct * held).sum(-1) / n_held).mean(1))
            losses.append(((loss * held).sum(-1) / n_held).mean(1))
            theta = torch.cat([fit.weight[:, :, a], bias[:, :, a, :, None].clamp_min(-50.0)], -1)
            means.append(theta.mean(1))

    if method == "ridge":
        evaluate(fit_ridge(x, y, fit_w, torch.tensor([1.0 / c for c in cs]), k))
    else:
        # strong to weak penalty, each fit started on the line through the previous two (a warm start
        # extrapolated along the path); their logits on x are kept and reused, so this costs no pass
        prev = before = None
        for c in cs:
            fit = fit_logistic(
                x, y, fit_w, c, k, max_iter=max_iter, tol=tol, init=prev, along=before, keep_state=True
            )
            evaluate(fit)
            before, prev = prev, fit
    return torch.stack(accs, 1), torch.stack(losses, 1), torch.stack(means, 1)


# -- entry points ---------------------------------------------------------------------------------
