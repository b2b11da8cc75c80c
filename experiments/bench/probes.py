"""Benchmark: the batched probe trainer against scikit-learn's LogisticRegression fitted group by group.

    python experiments/bench/probes.py [--groups 24 --n 4000 --d 256 --classes 5] [--no-protocol]
                                       [--torch-threads N]

Synthetic, seeded data: ``groups`` probes (think layer × role), each ``n`` examples of ``d`` correlated
features and ``classes`` classes whose separability grows from group to group (test accuracies from
near chance to near perfect). Both sides get the same standardised float32 features and the same
80/20 split, in one process.

1. One fit per group at a fixed ``C``: ``uniprobe.probes.solvers.fit_logistic`` on all groups at once vs
   ``LogisticRegression(C=C)`` in a loop.
2. The whole probe protocol (unless ``--no-protocol``): ``folds``-fold CV over a grid of ``C``, a
   refit at the chosen ``C`` and a shuffled-label control per group — ``uniprobe.probes.linear.train_probes``
   vs the same protocol with ``LogisticRegression`` group by group.

Threads: scikit-learn runs under its faster BLAS setting (1 thread or the default), picked by a
short trial. The batched trainer runs on 1 torch thread and on the default number (unless
``--torch-threads`` fixes one): the single fit under the faster of the two by a short trial, the whole
protocol in full under each, with a ratio for each (``train_probes`` splits its probes over that many
threads). Batched timings are the median of 3 runs. scikit-learn in one process has no second core to
use for a multinomial L-BFGS fit (its BLAS threads slow it down here), so the 1-thread ratio is the
like-for-like one, the other what a user of both on this machine gets.
"""

from __future__ import annotations

# this file is named probes.py: keep its own directory from shadowing the ``probes`` package
import argparse  # noqa: E402
import sys
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from uniprobe.probes.linear import DEFAULT_CS, ProbeGroup, train_probes  # noqa: E402
from uniprobe.probes.solvers import fit_logistic  # noqa: E402
from uniprobe.probes.splits import Split, shuffled_labels  # noqa: E402


def make_data(groups: int, n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[G, n, d]`` (float32, correlated) and labels ``[G, n]``, the same in every group (one
    label of a store's examples, read at G points × roles)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g).expand(groups, n)
    spectrum = torch.logspace(0, -1.5, d)  # correlated, unevenly scaled features, like a residual stream
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * spectrum
    noise = torch.randn(groups, n, d, generator=g) @ mix.T
    strength = torch.logspace(-2.3, -0.6, groups)[:, None, None]
    means = torch.randn(groups, k, d, generator=g) * strength * spectrum
    x = noise + torch.gather(means, 1, y[..., None].expand(-1, -1, d))
    return x.float(), y


def standardise(x: torch.Tensor, n_train: int) -> torch.Tensor:
    mean = x[:, :n_train].mean(1, keepdim=True)
    std = x[:, :n_train].std(1, keepdim=True)
    return ((x - mean) / std).contiguous()


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object, list[float]]:
    """The median wall time of ``repeat`` runs, the last result, and every time."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out, times


def torch_threads(n: int) -> Callable:
    def run(fn: Callable[[], object]) -> Callable[[], object]:
        def inner() -> object:
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(before)

        return inner

    return run


def blas_threads(limit: int | None) -> Callable:
    from threadpoolctl import threadpool_limits

    def run(fn: Callable[[], object]) -> Callable[[], object]:
        def inner() -> object:
            if limit is None:
                return fn()
            with threadpool_limits(limit):
                return fn()

        return inner

    return run


def fastest(label: str, trial: Callable[[], object], configs: dict[str, Callable]) -> str:
    """The thread setting under which a short ``trial`` runs fastest (on a loaded machine extra
    threads can be many times slower, so the full runs use only the winner)."""
    times = {name: timed(wrap(trial))[0] for name, wrap in configs.items()}
    print(f"    {label} trial: " + ", ".join(f"{name} {t:.2f} s" for name, t in times.items()))
    return min(times, key=times.get)


def single_fit(
    x: torch.Tensor, y: torch.Tensor, n_train: int, k: int, c: float, threads: int | None
) -> tuple[Callable, Callable]:
    from sklearn.linear_model import LogisticRegression

    w = torch.zeros(x.shape[:2])
    w[:, :n_train] = 1
    xn, yn = x.numpy(), y.numpy()

    def ours(groups: int | None = None) -> np.ndarray:
        sub = slice(groups)
        fit = fit_logistic(x[sub], y[sub], w[sub], c, k)
        pred = fit.predict(x[sub])[:, 0, 0]
        return (pred[:, n_train:] == y[sub, n_train:]).float().mean(1).numpy()

    def theirs(groups: int | None = None) -> np.ndarray:
        accs = []
        for i in range(len(xn) if groups is None else groups):
            model = LogisticRegression(C=c, max_iter=1000).fit(xn[i, :n_train], yn[i, :n_train])
            accs.append(model.score(xn[i, n_train:], yn[i, n_train:]))
        return np.array(accs)

    n_threads = torch.get_num_threads()
    counts = [1, n_threads] if threads is None else [threads]
    torch_configs = {f"torch {t} thread{'s' * (t > 1)}": torch_threads(t) for t in dict.fromkeys(counts)}
    sk_configs = {"BLAS 1 thread": blas_threads(1), "BLAS default": blas_threads(None)}
    mine = next(iter(torch_configs))
    if len(torch_configs) > 1:
        mine = fastest("batched, 4 groups", lambda: ours(4), torch_configs)
    t_ours, acc_ours, runs = timed(torch_configs[mine](ours), repeat=3)
    print(f"    batched [{mine}]: " + ", ".join(f"{t:.2f}" for t in runs) + " s (median of 3)")
    theirs_cfg = fastest("sklearn, 2 groups", lambda: theirs(2), sk_configs)
    t_sk, acc_sk, _ = timed(sk_configs[theirs_cfg](theirs))
    print(f"    sklearn [{theirs_cfg}]: {t_sk:.2f} s")
    report(f"one fit per group at C={c:g}", t_ours, t_sk, np.abs(acc_ours - acc_sk).max(), len(xn))
    print(f"  test accuracy range: {acc_sk.min():.3f} .. {acc_sk.max():.3f}")
    return torch_configs, sk_configs[theirs_cfg]


def protocol(
    x: torch.Tensor,
    y: torch.Tensor,
    n_train: int,
    k: int,
    folds: int,
    seed: int,
    threads: tuple[dict[str, Callable], Callable],
) -> None:
    from sklearn.linear_model import LogisticRegression

    groups, n, _ = x.shape
    test = torch.zeros(n, dtype=torch.bool)
    test[n_train:] = True
    fold = torch.full((n,), -1, dtype=torch.long)
    fold[:n_train] = torch.arange(n_train) % folds
    split = Split(test, fold, "example", n)
    cs = list(DEFAULT_CS)

    def ours() -> list[dict]:
        gs = [ProbeGroup(f"g{i}", "all", x[i], torch.arange(n)) for i in range(groups)]
        return train_probes(gs, y[0], list(range(k)), split, cs=cs, folds=folds, seed=seed, n_boot=200).rows

    def theirs() -> list[tuple[float, float, float]]:
        # scikit-learn's own CV protocol: LogisticRegressionCV (warm-started C path per fold, refit at
        # the best C from the folds' mean), then the shuffled-label control at that C
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegressionCV

        xn, fi = x.numpy(), fold.numpy()
        tr = fi >= 0
        cv = [(np.flatnonzero(tr & (fi != f)), np.flatnonzero(fi == f)) for f in range(folds)]
        out = []
        for i in range(groups):
            yi = y[i].numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (ConvergenceWarning, FutureWarning, UserWarning))
                m = LogisticRegressionCV(Cs=cs, cv=cv, max_iter=1000, tol=1e-4).fit(xn[i][: tr.sum()], yi[tr])
            c_best = float(np.ravel(m.C_)[0])
            acc = m.score(xn[i][~tr], yi[~tr])
            yc = shuffled_labels(
                torch.from_numpy(yi), (torch.from_numpy(tr), torch.from_numpy(~tr)), seed
            ).numpy()
            mc = LogisticRegression(C=c_best, max_iter=1000).fit(xn[i][tr], yc[tr])
            out.append((acc, mc.score(xn[i][~tr], yc[~tr]), c_best))
        return out

    print(
        f"\n== whole probe protocol: {folds}-fold CV over {len(cs)} values of C, refit, "
        "shuffled-label control =="
    )
    # every torch setting in full: train_probes splits its probes over that many threads (workers)
    runs_by = {}
    for name, wrap in threads[0].items():
        t, rows, runs = timed(wrap(ours), repeat=3)
        runs_by[name] = (t, rows)
        print(f"    batched [{name}]: " + ", ".join(f"{t:.2f}" for t in runs) + " s (median of 3)")
    t_sk, sk_rows, _ = timed(threads[1](theirs))
    print(f"    sklearn: {t_sk:.2f} s")
    for name, (t_ours, rows) in runs_by.items():
        diff = max(abs(r["accuracy"] - s[0]) for r, s in zip(rows, sk_rows))
        report(f"whole protocol, {name}", t_ours, t_sk, diff, groups)
    rows = min(runs_by.values(), key=lambda v: v[0])[1]
    same = [(r, s) for r, s in zip(rows, sk_rows) if r["C"] == s[2]]
    same_diff = max((abs(r["accuracy"] - s[0]) for r, s in same), default=float("nan"))
    print(f"  groups where both chose the same C:       {len(same):8d} of {groups}")
    print(f"  largest test-accuracy difference there:   {same_diff * 100:8.2f} points")
    ctrl = max(abs(r["control"] - s[1]) for r, s in zip(rows, sk_rows))
    print(f"  largest control-accuracy difference:      {ctrl * 100:8.2f} points (noise fits; C may differ)")


def report(what: str, t_ours: float, t_sk: float, diff: float, groups: int) -> None:
    print(f"  [{what}]")
    print(f"  batched trainer:                          {t_ours:8.2f} s")
    print(f"  sklearn LogisticRegression, group by group: {t_sk:6.2f} s")
    print(f"  ratio (sklearn / batched):                {t_sk / t_ours:8.1f}x")
    print(f"  largest test-accuracy difference:         {diff * 100:8.2f} points over {groups} groups")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=24)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-protocol", action="store_true")
    p.add_argument(
        "--torch-threads", type=int, help="run the batched trainer on this many threads (default: pick)"
    )
    args = p.parse_args(argv)
    try:
        import sklearn
    except ImportError:
        print("scikit-learn is not installed (pip install -e '.[dev]'); nothing to compare against")
        return 1
    import os

    print(
        f"probe benchmark: {args.groups} groups × n={args.n} × d={args.d}, {args.classes} classes; "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    x, y = make_data(args.groups, args.n, args.d, args.classes, args.seed)
    n_train = int(0.8 * args.n)
    x = standardise(x, n_train)
    print(f"\n== one fit per group (80/20 split, C={args.c:g}, tol 1e-4 on the same scaled objective) ==")
    threads = single_fit(x, y, n_train, args.classes, args.c, args.torch_threads)
    if not args.no_protocol:
        protocol(x, y, n_train, args.classes, args.folds, args.seed, threads)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
