"""ActivationStore.role_counts and ActivationStore.subset: a view of some examples reads exactly like a
store that holds only them (what the demo used to write to disk and reopen)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_store import BATCH, POINTS, assert_rows_equal, build
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.store import ActivationStore

KEEP = [1, 2, 5, 8, 9, 11]  # across all three shards; shard 1 keeps one example


def filtered_copy(store: ActivationStore, keep: list[int], path) -> ActivationStore:
    """The examples ``keep`` of ``store`` written as a store of their own (one shard, renumbered)."""
    sub = ActivationStore.create(path, model=store.model, points=store.points)
    index = {old: new for new, old in enumerate(keep)}
    rows = {}
    for p in store.points:
        r = store.rows(p)
        r = r.select(torch.tensor([int(e) in index for e in r.example.tolist()], dtype=torch.bool))
        r.example = torch.tensor([index[int(e)] for e in r.example.tolist()], dtype=torch.long)
        rows[p] = r
    sub.write_shard(
        0, rows, [{k: store.examples[i][k] for k in ("id", "labels", "meta", "layout")} for i in keep]
    )
    sub.finalize()
    return ActivationStore.open(path)


def test_role_counts_are_the_rows_per_role(tmp_path):
    store, _ = build(tmp_path / "s")
    for p in POINTS:
        counted = Counter(ROLES[i] for i in store.rows(p).role.tolist())
        assert store.role_counts(p) == {r: counted[r] for r in ROLES if counted[r]}
        assert store.role_rows(p) == store.role_counts(p)
        assert list(store.role_counts(p)) == [r for r in ROLES if counted[r]]  # toolkit order
    with pytest.raises(ValueError, match="no hook point"):
        store.role_counts("blocks.9.resid_post")


def test_subset_reads_like_a_filtered_copy(tmp_path):
    store, _ = build(tmp_path / "s")
    view = store.subset(reversed(KEEP))  # order and repeats do not count
    copy = filtered_copy(store, KEEP, tmp_path / "copy")
    assert view.is_view and not store.is_view
    assert view.n_examples == len(view) == copy.n_examples == len(KEEP)
    assert [ex["id"] for ex in view.examples] == [ex["id"] for ex in copy.examples]
    assert view.label_keys == copy.label_keys
    assert view.labels("answer") == copy.labels("answer") == [store.labels("answer")[i] for i in KEEP]
    assert view.layout(3) == copy.layout(3) == store.layout(KEEP[3])
    for p in POINTS:
        assert_rows_equal(view.rows(p), copy.rows(p))
        assert_rows_equal(view.rows(p, roles="image_gen", step=2), copy.rows(p, roles="image_gen", step=2))
        assert view.role_counts(p) == copy.role_counts(p)
        for reduce in ("last", "first", "mean", 1, -2):
            a, b = view.matrix(p, role="query", reduce=reduce), copy.matrix(p, role="query", reduce=reduce)
            assert torch.equal(a.values, b.values) and torch.equal(a.example, b.example)
            assert a.labels == b.labels
    # the source store is unchanged, and a view of a view composes
    assert store.n_examples == 3 * BATCH and len(store.rows("queries")) > len(view.rows("queries"))
    inner = view.subset([0, 4])
    assert [ex["id"] for ex in inner.examples] == [
        store.examples[KEEP[0]]["id"],
        store.examples[KEEP[4]]["id"],
    ]
    assert_rows_equal(inner.rows("queries"), store.subset([KEEP[0], KEEP[4]]).rows("queries"))
    assert "a subset of 12" in repr(view) and view.expected_examples is None


def test_subset_is_read_only_and_checks_its_indices(tmp_path):
    store, batches = build(tmp_path / "s", finalize=False)
    view = store.subset([0])
    with pytest.raises(PermissionError, match="read-only"):
        view.write_shard(3, *batches[0])
    with pytest.raises(IndexError, match="out of range"):
        store.subset([0, 12])
    assert store.subset([]).n_examples == 0
    store.close()
