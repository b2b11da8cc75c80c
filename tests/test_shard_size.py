"""Shard size: several batches per shard file, exact resume, the identity records the size."""

from __future__ import annotations

import json

import pytest
import torch
from uniprobe.experiments.tiny import tiny_llama
from uniprobe.hooks.pipeline import AUTO_SHARD_EXAMPLES, capture_dataset
from uniprobe.hooks.store import ActivationStore
from uniprobe.hooks.store.errors import ResumeMismatchError

POINT = "blocks.1.resid_post"


def _examples(n: int) -> list[dict]:
    return [
        {"id": f"ex{i}", "input_ids": [1, 5 + i % 7, 6 + i % 5, 7][: 2 + i % 3], "labels": {"answer": i % 3}}
        for i in range(n)
    ]


def _capture(model, examples, out, **kw):
    return capture_dataset(
        model, examples, POINT, out, batch_size=kw.pop("batch_size", 2), progress=False, **kw
    )


def test_batches_accumulate_into_shards_with_the_same_rows(tmp_path):
    model, _ = tiny_llama()
    examples = _examples(11)
    # text rows only: batches cut differently pad differently (the pad rows differ, not the text rows)
    one = _capture(model, examples, tmp_path / "one", shard_size=2, roles=["text"])  # a shard per batch
    big = _capture(model, examples, tmp_path / "big", shard_size=5, roles=["text"])  # 2.5 batches a shard
    assert len(list((tmp_path / "one").glob("shard-*.safetensors"))) == 6
    shards = json.loads((tmp_path / "big" / "manifest.json").read_text())["shards"]
    assert [s["examples"] for s in shards] == [[0, 5], [5, 10], [10, 11]]
    assert [ex["id"] for ex in big.examples] == [f"ex{i}" for i in range(11)]
    a, b = one.rows(POINT), big.rows(POINT)
    for name in ("values", "example", "pos", "role"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    assert big.manifest["identity"]["shard_size"] == 5


def test_auto_shard_size_is_a_multiple_of_the_batch_up_to_256(tmp_path):
    model, _ = tiny_llama()
    store = _capture(model, _examples(7), tmp_path / "auto", batch_size=3)
    size = store.manifest["identity"]["shard_size"]
    assert size % 3 == 0 and size <= AUTO_SHARD_EXAMPLES and size >= 3
    assert len(store.manifest["shards"]) == 1  # tiny rows: every example fits in one shard


def test_resume_with_another_shard_size_is_refused_and_the_same_one_continues(tmp_path):
    model, _ = tiny_llama()
    examples = _examples(9)
    calls = {"n": 0}

    def boom(mod, args):
        calls["n"] += 1
        if calls["n"] == 4:  # during the second shard's second batch
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        _capture(model, examples, tmp_path / "s", shard_size=4)
    handle.remove()
    assert len(ActivationStore.open(tmp_path / "s").manifest["shards"]) == 1
    with pytest.raises(ResumeMismatchError, match="shard_size"):
        _capture(model, examples, tmp_path / "s", shard_size=6, resume=True)
    store = _capture(model, examples, tmp_path / "s", shard_size=4, resume=True)
    ref = _capture(model, examples, tmp_path / "ref", shard_size=4)
    assert store.complete and [s["sha256"] for s in store.manifest["shards"]] == [
        s["sha256"] for s in ref.manifest["shards"]
    ]


def test_auto_resume_reuses_the_recorded_size(tmp_path):
    model, _ = tiny_llama()
    examples = _examples(5)
    first = _capture(model, examples, tmp_path / "s")
    again = _capture(model, examples, tmp_path / "s", resume=True)
    assert again.manifest["identity"] == first.manifest["identity"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_shard_size_is_refused(tmp_path, bad):
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="shard_size"):
        _capture(model, _examples(3), tmp_path / "s", shard_size=bad)


def test_a_store_from_before_shard_sizes_resumes_one_shard_per_batch() -> None:
    from uniprobe.hooks.store.identity import identity_differences

    old = {"batch_size": 4, "mode": "understanding"}
    assert identity_differences(old, {"batch_size": 4, "shard_size": 4, "mode": "understanding"}) == []
    diff = identity_differences(old, {"batch_size": 4, "shard_size": 8, "mode": "understanding"})
    assert diff == ["shard_size: store 4 vs now 8"]
