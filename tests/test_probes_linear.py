"""Linear probes: planted signals are found where planted, controls stay at chance, the batched
solvers agree with scikit-learn and with direct solves, splits do not leak, errors are clear."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from uniprobe.hooks.layout import role_ids
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore
from uniprobe.probes.linear import probe_store, probe_tensors
from uniprobe.probes.results import ProbeResults, load_directions
from uniprobe.probes.solvers import design, fit_logistic, fit_ridge
from uniprobe.probes.splits import ProbeInputError, bootstrap_ci, leaked_groups, make_split, shuffled_labels

D = 16
LAYERS = 4
PLANTED = {(2, "query"), (3, "query")}  # (layer, role) where the answer is written


@pytest.fixture(autouse=True)
def one_thread():
    # the probes run many small ops; on a shared 2-core machine one thread is both faster and steadier
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_store(path, n: int = 300, k: int = 3, batch: int = 60, seed: int = 0) -> ActivationStore:
    """Examples with 3 text and 2 query positions; the answer is written linearly into the last query
    position at layers 2 and 3 only, everything else is noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:k]  # orthonormal class directions
    answers = torch.randint(0, k, (n,), generator=g)
    points = [f"blocks.{i}.resid_post" for i in range(LAYERS)]
    store = ActivationStore.create(path, model={"model_class": "Synthetic"}, points=points)
    layout = role_ids(["text"] * 3 + ["query"] * 2)
    for s, first in enumerate(range(0, n, batch)):
        idx = list(range(first, min(first + batch, n)))
        ex = torch.arange(len(idx)).repeat_interleave(len(layout))
        pos = torch.arange(len(layout)).repeat(len(idx))
        role = torch.tensor(layout).repeat(len(idx))
        rows = {}
        for layer, p in enumerate(points):
            values = torch.randn(len(ex), D, generator=g)
            if (layer, "query") in PLANTED:
                last_query = pos == len(layout) - 1
                values[last_query] += 3.0 * dirs[answers[idx]]
            rows[p] = Rows(values, ex, pos, role, torch.zeros_like(ex), torch.zeros_like(ex))
        examples = [
            {
                "id": f"ex{i}",
                "labels": {
                    "answer": int(answers[i]),
                    "template": f"t{i % 30}",
                    "rare": "x" if i < 3 else "y",
                },
                "meta": {},
                "layout": layout,
            }
            for i in idx
        ]
        store.write_shard(s, rows, examples)
    store.finalize()
    return ActivationStore.open(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _write_store(tmp_path_factory.mktemp("probe") / "store")


@pytest.fixture(scope="module")
def results(store):
    # workers=1: the serial reference (module fixtures start before the one-thread fixture)
    return probe_store(store, "answer", roles=["text", "query"], group_by="template", n_boot=300, workers=1)


def test_planted_signal_is_found_there_and_nowhere_else(results):
    assert len(results) == LAYERS * 2
    for r in results.rows:
        assert r["grouping"] == "template"
        assert r["n"] == 300 and r["n_train"] + r["n_test"] == 300
        assert r["control"] < 0.55, r  # shuffled labels: chance is 1/3
        if (r["layer"], r["role"]) in PLANTED:
            assert r["accuracy"] > 0.9 and r["selectivity"] > 0.4, r
        else:
            assert r["accuracy"] < 0.55, r
    best = results.best()
    assert (best["layer"], best["role"]) in PLANTED


def test_reading_the_store_in_slices_gives_the_same_probes(results, store):
    sliced = probe_store(
        store,
        "answer",
        points="blocks.[23].resid_post",
        roles=["query"],
        group_by="template",
        n_boot=300,
        max_bytes=1,
    )
    for r in sliced.rows:
        full = results.row(r["point"], r["role"])
        assert r["C"] == full["C"] and r["control"] == full["control"]
        assert abs(r["accuracy"] - full["accuracy"]) <= 0.02


def test_probes_split_over_threads_equal_the_serial_run(results, store):
    """``workers=2``: the probes are dealt to two threads (one torch thread each); every probe is the
    same problem as in the serial run, so the same C, accuracy and control, and the same weights up to
    float rounding. The calling thread's torch thread count is restored."""
    kw = {"roles": ["text", "query"], "group_by": "template", "n_boot": 300}
    threaded = probe_store(store, "answer", workers=2, **kw)
    assert torch.get_num_threads() == 1  # this module's fixture set 1
    assert [(r["point"], r["role"]) for r in threaded.rows] == [(r["point"], r["role"]) for r in results.rows]
    for r in threaded.rows:
        serial = results.row(r["point"], r["role"])
        for key in ("C", "accuracy", "control", "ci_low", "ci_high", "cv_accuracy"):
            assert r[key] == pytest.approx(serial[key], abs=1e-6), (key, r, serial)
    for name, t in threaded.directions.items():
        torch.testing.assert_close(t, results.directions[name], rtol=1e-3, atol=1e-4)


def test_generation_positions_by_step_and_branch(tmp_path):
    """A store of generated image positions (steps 1, 2; both guidance branches): the answer is written
    only at step 2 of the conditional branch, and only that probe reads it."""
    g = torch.Generator().manual_seed(5)
    n, k = 150, 3
    answers = torch.randint(0, k, (n,), generator=g)
    dirs = torch.eye(D)[:k] * 3.0
    store = ActivationStore.create(
        tmp_path / "gen", model={"model_class": "Synthetic"}, points=["blocks.0.resid_post"]
    )
    layout = role_ids(["text"] * 2)
    for s, first in enumerate(range(0, n, 50)):
        ex, pos, step, branch = [], [], [], []
        for e in range(50):
            for st in (1, 2):
                for b in (0, 1):
                    ex.append(e), pos.append(1 + st), step.append(st), branch.append(b)
        ex, pos, step, branch = (torch.tensor(v) for v in (ex, pos, step, branch))
        values = torch.randn(len(ex), D, generator=g)
        hit = (step == 2) & (branch == 0)
        values[hit] += dirs[answers[first + ex[hit]]]
        role = torch.full_like(ex, role_ids(["image_gen"])[0])
        rows = {"blocks.0.resid_post": Rows(values, ex, pos, role, step, branch)}
        exs = [
            {
                "id": f"g{first + e}",
                "labels": {"answer": int(answers[first + e])},
                "meta": {},
                "layout": layout,
            }
            for e in range(50)
        ]
        store.write_shard(s, rows, exs)
    store.finalize()
    acc = {}
    for st in (1, 2):
        for br in ("cond", "uncond"):
            res = probe_store(store, "answer", roles=["image_gen"], step=st, branch=br, n_boot=100)
            acc[(st, br)] = res.rows[0]["accuracy"]
            assert res.meta["step"] == st and res.meta["branch"] == br
    assert acc[(2, "cond")] > 0.9
    assert max(acc[(1, "cond")], acc[(1, "uncond")], acc[(2, "uncond")]) < 0.6


def test_bootstrap_interval_contains_accuracy_and_is_seeded(results):
    for r in results.rows:
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert r["ci_high"] - r["ci_low"] < 0.35
    correct = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1] * 10)
    assert bootstrap_ci(correct, 500, seed=3) == bootstrap_ci(correct, 500, seed=3)
    lo, hi = bootstrap_ci(correct, 2000, seed=0)
    assert lo < 0.75 < hi and hi - lo < 0.25


def test_results_and_directions_round_trip(results, store, tmp_path):
    files = results.save(tmp_path / "out")
    assert {"json", "csv", "directions", "index", "map"} <= set(files)
    assert files["map"].stat().st_size > 1000
    back = ProbeResults.load(tmp_path / "out")
    assert back.rows == json.loads(json.dumps(results.rows))
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    for col in (
        "point",
        "layer",
        "role",
        "n",
        "accuracy",
        "ci_low",
        "ci_high",
        "control",
        "selectivity",
        "grouping",
        "C",
    ):
        assert col in header
    dirs = load_directions(files["directions"])
    assert set(dirs) == {(r["point"], r["role"]) for r in results.rows}
    probe = dirs[("blocks.3.resid_post", "query")]
    for name in ("weight", "bias", "mean", "std"):
        assert torch.equal(
            getattr(probe, name), getattr(results.direction("blocks.3.resid_post", "query"), name)
        )
    # the saved raw-space readout classifies raw activations as the probe did
    m = store.matrix("blocks.3.resid_post", role="query")
    pred = probe.logits(m.values).argmax(1)
    labels = torch.tensor(m.labels["answer"])
    assert (pred == labels).float().mean() > 0.9
    assert probe.classes == [0, 1, 2] and probe.unit(1).norm() == pytest.approx(1.0)


def test_group_split_leaks_nothing_and_grouping_matters():
    # the label is an attribute of an entity; features identify the entity but carry no readable attribute
    g = torch.Generator().manual_seed(1)
    n_ent, per = 40, 8
    entity = torch.arange(n_ent).repeat_interleave(per)
    attribute = torch.randint(0, 2, (n_ent,), generator=g)[entity]
    codes = torch.randn(n_ent, 32, generator=g) * 3
    x = (codes[entity] + 0.3 * torch.randn(len(entity), 32, generator=g))[None]
    names = [f"e{int(e)}" for e in entity]
    split = make_split(attribute, names, folds=4, seed=0, grouping="entity")
    assert leaked_groups(names, split) == []
    for e in range(n_ent):
        items = (entity == e).nonzero().flatten()
        assert len(set(split.test[items].tolist())) == 1 and len(set(split.fold[items].tolist())) == 1
    leaky = probe_tensors(x, attribute.tolist(), folds=4, n_boot=100)
    grouped = probe_tensors(x, attribute.tolist(), group_values=names, group_by="entity", folds=4, n_boot=100)
    assert leaky.rows[0]["grouping"] == "example" and grouped.rows[0]["grouping"] == "entity"
    assert leaky.rows[0]["accuracy"] > 0.85  # memorised entities seen in training
    assert grouped.rows[0]["accuracy"] < 0.75  # unseen entities: nothing to read
    assert grouped.meta["grouping"] == "entity"


def test_stratified_split_and_shuffled_control_keep_label_counts():
    y = torch.arange(100) % 4
    split = make_split(y, folds=5, seed=0)
    assert split.grouping == "example"
    for c in range(4):
        assert int((split.test & (y == c)).sum()) == 5
        assert torch.bincount(split.fold[split.train & (y == c)], minlength=5).tolist() == [4] * 5
    y_ctrl = shuffled_labels(y, (split.train, split.test), seed=0)
    for side in (split.train, split.test):
        assert sorted(y_ctrl[side].tolist()) == sorted(y[side].tolist())
    assert not torch.equal(y_ctrl, y)


def test_batched_logistic_matches_sklearn_on_every_group():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    n_groups, n, d, k = 8, 500, 24, 4
    y = torch.randint(0, k, (n_groups, n), generator=g)
    means = torch.randn(n_groups, k, d, generator=g) * torch.linspace(0.05, 0.6, n_groups)[:, None, None]
    x = torch.randn(n_groups, n, d, generator=g) + torch.gather(means, 1, y[..., None].expand(-1, -1, d))
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    c = torch.tensor([0.01, 0.1, 1.0, 10.0] * 2)
    n_train = 400
    w = torch.zeros(n_groups, n)
    w[:, :n_train] = 1
    fit = fit_logistic(x, y, w, c[:, None], k)  # float32, default tolerance: what the probes use
    exact = fit_logistic(x.double(), y, w, c[:, None], k, tol=1e-7)
    assert bool(fit.converged.all()) and bool(exact.converged.all())
    pred = fit.logits(x)[:, 0, 0].argmax(1)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for i in range(n_groups):
        ref = sk.LogisticRegression(C=float(c[i]), tol=1e-8, max_iter=5000)
        with threadpoolctl.threadpool_limits(1):  # BLAS threads only slow these small fits down
            ref.fit(x[i, :n_train].double().numpy(), y[i, :n_train].numpy())
        ours = float((pred[i, n_train:] == y[i, n_train:]).float().mean())
        theirs = ref.score(x[i, n_train:].double().numpy(), y[i, n_train:].numpy())
        assert abs(ours - theirs) <= 0.01, (i, ours, theirs)
        # the same minimiser: C is scikit-learn's C
        torch.testing.assert_close(exact.weight[i, 0, 0], torch.from_numpy(ref.coef_), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(
            exact.bias[i, 0, 0], torch.from_numpy(ref.intercept_), atol=1e-4, rtol=1e-3
        )


def _objective(x, y, w, c, weight, bias):
    """scikit-learn's scaled objective: weighted mean cross-entropy + ||W||² / (2·C·Σw)."""
    logp = torch.log_softmax(x @ weight.T + bias, 1)
    total = w.sum()
    return -(w * logp[torch.arange(len(y)), y]).sum() / total + (weight**2).sum() / (2 * c * total)


def _plain_lbfgs(x, y, w, c, k):
    """The reference: torch's own L-BFGS (strong Wolfe line search) on the objective, float64, to 1e-10."""
    weight = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        max_iter=2000,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _objective(x, y, w, c, weight, bias)
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _planted(seed, n_groups, n, d, k):
    """Correlated, unevenly scaled features with class means of growing strength; standardised."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n_groups, n), generator=g)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * torch.logspace(0, -1.5, d)
    means = torch.randn(n_groups, k, d, generator=g) * torch.linspace(0.05, 0.5, n_groups)[:, None, None]
    x = torch.randn(n_groups, n, d, generator=g) @ mix.T + torch.gather(
        means, 1, y[..., None].expand(-1, -1, d)
    )
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True), y


@pytest.mark.parametrize("rotated", [False, True])  # plain features; a Design (principal axes, diagonal)
def test_fast_solver_reaches_the_plain_lbfgs_minimum(rotated):
    # several strengths and training sets per group in one batch: problems finish at different
    # iterations, so the compaction and the passes that skip finished problems are exercised
    n_groups, n, d, k = 3, 240, 10, 3
    x, y = _planted(5, n_groups, n, d, k)
    w = torch.ones(n_groups, 2, n)
    w[:, 1, :60] = 0  # the second training set holds out a block (a CV fold)
    w[:, :, 200:] = 0  # the last rows are a test split: the solver leaves them out
    cs = torch.tensor([0.01, 1.0, 100.0])

    def solve(features, **kw):
        if not rotated:
            return fit_logistic(features, y, w.to(features.dtype), cs, k, **kw)
        prepared = design(features, w[:, 0] > 0)
        return prepared.unrotate(fit_logistic(prepared, y, w.to(features.dtype), cs, k, **kw))

    fit = solve(x)  # float32, scikit-learn's tolerance: what the probes use
    exact = solve(x.double(), tol=1e-9)
    assert bool(fit.converged.all()) and bool(exact.converged.all())
    pred = fit.predict(x)
    for gi in range(n_groups):
        for f in range(2):
            for a, c in enumerate(cs.tolist()):
                xd, wd = x[gi].double(), w[gi, f].double()
                ref_w, ref_b = _plain_lbfgs(xd, y[gi], wd, c, k)
                best = float(_objective(xd, y[gi], wd, c, ref_w, ref_b))
                # the same objective, minimised exactly: the minimiser of the plain reference
                reached = float(_objective(xd, y[gi], wd, c, exact.weight[gi, f, a], exact.bias[gi, f, a]))
                assert abs(reached - best) <= 1e-9 * best, (gi, f, c, reached, best)
                torch.testing.assert_close(exact.weight[gi, f, a], ref_w, atol=1e-4, rtol=1e-4)
                # at the working tolerance (a gradient of at most 1e-4, as scikit-learn's): near the
                # minimum (flat ones, at weak penalties, leave a gap of that order), the same predictions
                near = _objective(
                    xd, y[gi], wd, c, fit.weight[gi, f, a].double(), fit.bias[gi, f, a].double()
                )
                assert float(near) - best <= 1e-4, (gi, f, c, float(near), best)
                ref_pred = (xd[200:] @ ref_w.T + ref_b).argmax(1)
                agree = float((pred[gi, f, a, 200:] == ref_pred).float().mean())
                assert agree >= 0.99, (gi, f, c, agree)


def test_path_extrapolation_and_kept_logits():
    # a path of C, each fit started on the line through the previous two with their kept logits,
    # reaches the same minimisers as cold starts, and the kept logits are the fit's logits
    x, y = _planted(6, 2, 200, 8, 4)
    x = x.double()
    w = torch.ones(2, 3, 200, dtype=torch.float64)
    for f in range(3):
        w[:, f, f::3] = 0  # three CV folds
    prepared = design(x, torch.ones(2, 200, dtype=torch.bool))
    prev = before = None
    for c in (0.01, 0.1, 1.0, 10.0):
        fit = fit_logistic(prepared, y, w, c, 4, init=prev, along=before, keep_state=True, tol=1e-8)
        cold = fit_logistic(prepared, y, w, c, 4, tol=1e-8)
        assert bool(fit.converged.all())
        torch.testing.assert_close(fit.weight, cold.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fit.bias, cold.bias, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fit.fitted_logits, fit.logits(prepared.features), atol=1e-9, rtol=1e-9)
        # the rotation is exact: the same classifier on the original features
        torch.testing.assert_close(prepared.unrotate(fit).logits(x), fit.logits(prepared.features))
        before, prev = prev, fit


def _direct_ridge(x, y, w, alpha, k):
    """Weighted ridge with an unpenalised intercept by one linear solve of the augmented normal equations."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    target = torch.nn.functional.one_hot(y, k).to(x.dtype)
    penalty = torch.diag(
        torch.cat([torch.full((x.shape[1],), alpha, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)])
    )
    sol = torch.linalg.solve(xa.T @ (w[:, None] * xa) + penalty, xa.T @ (w[:, None] * target))
    return sol[:-1].T, sol[-1]


@pytest.mark.parametrize("d", [6, 40])  # normal equations (d <= n) and kernel form (d > n)
def test_ridge_closed_form_equals_direct_solve(d):
    g = torch.Generator().manual_seed(2)
    n, k = 30, 3
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (2, n), generator=g)
    w = torch.ones(2, 2, n, dtype=torch.float64)
    w[:, 1, :7] = 0  # a fold leaves 7 rows out
    alphas = torch.tensor([0.1, 3.0], dtype=torch.float64)
    fit = fit_ridge(x, y, w, alphas, k)
    for gi in range(2):
        for f in range(2):
            for a in range(2):
                weight, bias = _direct_ridge(x[gi], y[gi], w[gi, f], float(alphas[a]), k)
                torch.testing.assert_close(fit.weight[gi, f, a], weight, atol=1e-8, rtol=1e-7)
                torch.testing.assert_close(fit.bias[gi, f, a], bias, atol=1e-8, rtol=1e-7)


def test_cross_validation_picks_sensible_c():
    g = torch.Generator().manual_seed(3)
    n, d = 400, 60
    y = torch.randint(0, 2, (n,), generator=g)
    noise = torch.randn(n, d, generator=g)
    clean = torch.randn(n, d, generator=g)
    clean[:, 0] += 4.0 * (2 * y - 1)
    res = probe_tensors(torch.stack([noise, clean]), y.tolist(), n_boot=100)
    noise_row, clean_row = res.rows
    assert noise_row["C"] <= 0.01  # nothing to read: the strongest penalty is best held out
    assert clean_row["C"] >= 0.1 and clean_row["accuracy"] > 0.95
    ridge = probe_tensors(torch.stack([noise, clean]), y.tolist(), method="ridge", n_boot=100)
    assert ridge.rows[1]["accuracy"] > 0.95 and ridge.rows[0]["accuracy"] < 0.7
    assert ridge.rows[0]["method"] == "ridge"


def test_errors_name_the_problem(store):
    with pytest.raises(ProbeInputError, match=r"label key 'fruit' is not in the store.*answer.*template"):
        probe_store(store, "fruit")
    with pytest.raises(ProbeInputError, match=r"group_by key 'entity' is not in the store"):
        probe_store(store, "answer", group_by="entity")
    with pytest.raises(
        ProbeInputError, match=r"class 'x' of label 'rare' has \d training examples .* fewer than folds=5"
    ):
        probe_store(store, "rare", points="blocks.0.resid_post", roles=["query"])
    with pytest.raises(ProbeInputError, match=r"empty role selection.*query.*text"):
        probe_store(store, "answer", roles=[])
    with pytest.raises(
        ProbeInputError, match=r"role selection 'image_gen' has no rows.*text \(\d+ rows\), query"
    ):
        probe_store(store, "answer", points="blocks.0.resid_post", roles=["image_gen"])
    with pytest.raises(ProbeInputError, match="unknown method 'svm'"):
        probe_store(store, "answer", points="blocks.0.resid_post", roles=["query"], method="svm")
    with pytest.raises(ProbeInputError, match="folds"):
        probe_store(store, "answer", points="blocks.0.resid_post", roles=["query"], folds=1)


def test_probe_cli_end_to_end_on_a_tiny_model_store(tmp_path, capsys):
    from uniprobe.experiments.cli.probe import add_probe_parser
    from uniprobe.experiments.tiny import tiny_llama
    from uniprobe.hooks.pipeline import capture_dataset

    model, _ = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(120):
        first = int(torch.randint(10, 40, (1,), generator=g))
        examples.append(
            {
                "id": f"e{i}",
                "input_ids": [1, first, 5, 6],
                "labels": {"parity": first % 2, "tpl": f"t{i % 12}"},
            }
        )
    capture_dataset(model, examples, "blocks.*.resid_post", tmp_path / "store", batch_size=40, progress=False)
    parser = argparse.ArgumentParser()
    add_probe_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "probe"
    args = parser.parse_args(
        ["probe", str(tmp_path / "store"), "--label", "parity", "--roles", "text", "--reduce", "1",
         "--group-by", "tpl", "--folds", "3", "--out", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "split by tpl" in printed and "blocks.1.resid_post" in printed
    for name in ("results.json", "results.csv", "probe_map.png", "directions.safetensors", "directions.json"):
        assert (out / name).exists(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == [0, 1]
    # position 1 holds the token whose parity is the label: the embedding makes it readable
    assert all(r["accuracy"] > 0.75 and not math.isnan(r["control"]) for r in rows)
