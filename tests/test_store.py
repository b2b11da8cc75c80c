"""Tests for uniprobe.hooks.store.ActivationStore: round trips, resume, damage detection, errors."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import uniprobe.hooks.store.writer as writer_module
from safetensors import safe_open
from safetensors.torch import save_file
from uniprobe.hooks.layout import ROLES, role_ids
from uniprobe.hooks.rows import Rows
from uniprobe.hooks.store import ActivationStore, Matrix, StoreCorruptError, StoreExistsError
from uniprobe.hooks.store.integrity import DIGEST_KEY, manifest_digest
from uniprobe.hooks.store.lock import LOCK_NAME

POINTS = ["blocks.0.resid_post", "blocks.1.resid_post", "queries"]
SHAPES = {"blocks.0.resid_post": (8,), "blocks.1.resid_post": (8,), "queries": (2, 4)}
MODEL = {"model_class": "TinyUnified", "config_hash": "abc123", "adapter": "tiny"}
BATCH = 4


def make_batch(
    shard: int, n: int = BATCH, dtype: torch.dtype = torch.float32, shapes: dict | None = None
) -> tuple[dict[str, Rows], list[dict]]:
    """A captured batch: rows at every point in shuffled order, batch-local example indices.

    Every example has 3 text positions, 2 query positions (except every 4th example, which has none)
    and 2 generated image positions captured at steps 1, 2 on both guidance branches.
    """
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(1000 + shard)
    cols: dict[str, list[int]] = {c: [] for c in ("example", "pos", "role", "step", "branch")}
    examples = []
    for e in range(n):
        global_e = shard * BATCH + e
        n_query = 0 if global_e % 4 == 3 else 2
        layout = role_ids(["text"] * 3 + ["query"] * n_query + ["image_gen"] * 2)
        first_gen = 3 + n_query
        for pos, r in enumerate(layout):
            if ROLES[r] == "image_gen":
                entries = [(pos - first_gen + 1, b) for b in (0, 1)]
            else:
                entries = [(0, 0)]
            for step, branch in entries:
                for c, v in zip(cols, (e, pos, r, step, branch), strict=True):
                    cols[c].append(v)
        examples.append(
            {
                "id": f"ex{global_e}",
                "labels": {"answer": global_e % 3, "level": "L1" if global_e % 2 else "L2"},
                "meta": {"prompt": f"prompt {global_e}"},
                "layout": layout,
            }
        )
    m = len(cols["example"])
    perm = torch.randperm(m, generator=g)  # capture order is not sorted; the store must not rely on it
    index = {c: torch.tensor(v, dtype=torch.long)[perm] for c, v in cols.items()}
    rows = {
        p: Rows(values=torch.randn(m, *shape, generator=g).to(dtype), **index) for p, shape in shapes.items()
    }
    return rows, examples


def build(path: Path, n_shards: int = 3, dtype: torch.dtype = torch.float32, finalize: bool = True):
    """A store with ``n_shards`` batches; returns it and the input batches."""
    store = ActivationStore.create(path, model=MODEL, points=POINTS, attrs={"task": "arith"})
    batches = [make_batch(i, dtype=dtype) for i in range(n_shards)]
    for i, (rows, examples) in enumerate(batches):
        store.write_shard(i, rows, examples)
    if finalize:
        store.finalize()
    return store, batches


def expected_rows(batches, point: str) -> Rows:
    """The input rows of all batches, concatenated, with global example indices."""
    parts, offset = [], 0
    for rows, examples in batches:
        r = rows[point]
        parts.append(Rows(r.values, r.example + offset, r.pos, r.role, r.step, r.branch))
        offset += len(examples)
    return Rows.cat(parts)


def assert_rows_equal(a: Rows, b: Rows) -> None:
    assert a.values.dtype == b.values.dtype
    for name in ("values", "example", "pos", "role", "step", "branch"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def reference_matrix(batches, point, roles, reduce, step, branch):
    """Per-example reduction written as a plain loop over the input rows."""
    r = expected_rows(batches, point)
    role_set = None if roles is None else set(role_ids([roles] if isinstance(roles, str) else roles))
    kept, values = [], []
    for e in range(sum(len(ex) for _, ex in batches)):
        idx = [
            i
            for i in range(len(r))
            if r.example[i] == e
            and (role_set is None or int(r.role[i]) in role_set)
            and (step is None or int(r.step[i]) == step)
            and (branch is None or int(r.branch[i]) == branch)
        ]
        idx.sort(key=lambda i: (int(r.pos[i]), int(r.step[i])))
        if not idx:
            continue
        if reduce == "mean":
            v = torch.stack([r.values[i].float() for i in idx]).mean(0).to(r.values.dtype)
        elif reduce == "first":
            v = r.values[idx[0]]
        elif reduce == "last":
            v = r.values[idx[-1]]
        else:
            if not -len(idx) <= reduce < len(idx):
                continue
            v = r.values[idx[reduce]]
        kept.append(e)
        values.append(v)
    if not kept:
        return None, None
    return torch.tensor(kept), torch.stack(values)


def rewrite_manifest(store_dir: Path, manifest: dict) -> None:
    """Write an edited manifest *with a recomputed digest* (a careful editor), so the checks behind
    the digest (shard headers, tensors) are what catches the edit."""
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    (store_dir / "manifest.json").write_text(json.dumps(manifest))


def as_schema_1(store_dir: Path) -> dict:
    """Turn a store into what uniprobe wrote before schema 2 (no identity, no manifest digest, shard
    headers without roles list and identity); returns its manifest."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    for rec in manifest["shards"]:
        file = store_dir / rec["file"]
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            header = json.loads(f.metadata()["uniprobe.shard"])
        header = {k: v for k, v in header.items() if k not in ("roles", "identity")} | {"schema_version": 1}
        save_file(tensors, str(file), metadata={"uniprobe.shard": json.dumps(header)})
        rec.update(bytes=file.stat().st_size, sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    manifest = {k: v for k, v in manifest.items() if k not in ("identity", DIGEST_KEY)}
    manifest["schema_version"] = 1
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def flip_byte(file: Path, offset_from_end: int = 3) -> None:
    data = bytearray(file.read_bytes())
    data[-offset_from_end] ^= 0xFF
    file.write_bytes(bytes(data))


# -- round trips ----------------------------------------------------------------------------------


def test_rows_round_trip_exact(tmp_path):
    _, batches = build(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    assert store.points == POINTS
    assert store.n_examples == len(store) == 3 * BATCH
    for point in POINTS:
        got = store.rows(point)
        assert got.values.shape[1:] == SHAPES[point]
        assert_rows_equal(got, expected_rows(batches, point))


@pytest.mark.parametrize(
    "roles, step, branch",
    [("query", None, None), (["text", "image_gen"], None, None), (None, 2, None), ("image_gen", 1, "uncond")],
)
def test_rows_filters(tmp_path, roles, step, branch):
    _, batches = build(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    full = expected_rows(batches, "blocks.1.resid_post")
    keep = torch.ones(len(full), dtype=torch.bool)
    if roles is not None:
        keep &= torch.isin(full.role, torch.tensor(role_ids([roles] if isinstance(roles, str) else roles)))
    if step is not None:
        keep &= full.step == step
    if branch is not None:
        keep &= full.branch == ("cond", "uncond").index(branch)
    got = store.rows("blocks.1.resid_post", roles=roles, step=step, branch=branch)
    assert 0 < len(got) < len(full)
    assert_rows_equal(got, full.select(keep))


@pytest.mark.parametrize("reduce", ["last", "first", "mean", 0, 1, -1, -2, 4])
@pytest.mark.parametrize("role", [None, "query", ["text", "query"], "image_gen"])
def test_matrix_matches_reference(tmp_path, reduce, role):
    _, batches = build(tmp_path / "s", n_shards=2)
    store = ActivationStore.open(tmp_path / "s")
    for point in ("blocks.0.resid_post", "queries"):
        want_ex, want = reference_matrix(batches, point, role, reduce, None, 0)
        if want_ex is None:  # e.g. the 5th query position: no example has one
            with pytest.raises(ValueError, match=f"reduce={reduce}"):
                store.matrix(point, role=role, reduce=reduce)
            continue
        got = store.matrix(point, role=role, reduce=reduce)
        assert isinstance(got, Matrix)
        assert torch.equal(got.example, want_ex)
        assert got.values.shape == (len(want_ex), *SHAPES[point])
        assert got.values.dtype == want.dtype
        if reduce == "mean":
            torch.testing.assert_close(got.values, want)
        else:
            assert torch.equal(got.values, want)


@pytest.mark.parametrize("step, branch", [(1, "cond"), (2, "uncond"), (None, None)])
def test_matrix_step_and_branch_filters(tmp_path, step, branch):
    _, batches = build(tmp_path / "s", n_shards=2)
    store = ActivationStore.open(tmp_path / "s")
    b = None if branch is None else ("cond", "uncond").index(branch)
    for reduce in ("last", "first", "mean"):
        want_ex, want = reference_matrix(batches, "blocks.0.resid_post", "image_gen", reduce, step, b)
        got = store.matrix("blocks.0.resid_post", role="image_gen", reduce=reduce, step=step, branch=branch)
        assert torch.equal(got.example, want_ex)
        torch.testing.assert_close(got.values, want, rtol=0, atol=1e-6)


def test_matrix_drops_examples_without_role_and_aligns_labels(tmp_path):
    build(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    m = store.matrix("queries", role="query")
    no_query = [e for e in range(store.n_examples) if e % 4 == 3]
    assert m.example.tolist() == [e for e in range(store.n_examples) if e not in no_query]
    assert len(m) == store.n_examples - len(no_query)
    assert m.labels["answer"] == [store.labels("answer")[e] for e in m.example.tolist()]
    assert m.labels["level"] == ["L1" if e % 2 else "L2" for e in m.example.tolist()]
    # the 3rd query position does not exist anywhere
    with pytest.raises(ValueError, match="reduce=2"):
        store.matrix("queries", role="query", reduce=2)


def test_matrix_without_rows_names_present_roles(tmp_path):
    build(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(ValueError) as err:
        store.matrix("blocks.0.resid_post", role="cot")
    msg = str(err.value)
    assert "'blocks.0.resid_post'" in msg and "'cot'" in msg
    assert "text" in msg and "query" in msg and "image_gen" in msg
    with pytest.raises(ValueError, match="reduce must be"):
        store.matrix("blocks.0.resid_post", reduce="median")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved(tmp_path, dtype):
    _, batches = build(tmp_path / "s", n_shards=2, dtype=dtype)
    store = ActivationStore.open(tmp_path / "s")
    assert store.dtype == dtype
    assert store.manifest["dtype"] == str(dtype).removeprefix("torch.")
    got = store.rows("queries")
    assert got.values.dtype == dtype
    assert_rows_equal(got, expected_rows(batches, "queries"))
    assert store.matrix("queries", reduce="mean").values.dtype == dtype
    assert store.matrix("queries", role="text", reduce=-1).values.dtype == dtype


# -- metadata -----------------------------------------------------------------------------------------


def test_manifest_contents(tmp_path):
    _, batches = build(tmp_path / "s", n_shards=2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["identity"] is None  # made through the API, not by a capture
    assert manifest[DIGEST_KEY] == manifest_digest(manifest)
    assert isinstance(manifest["toolkit_version"], str) and manifest["toolkit_version"]
    assert manifest["model"] == MODEL
    assert manifest["points"] == POINTS
    assert manifest["feature_shapes"] == {p: list(s) for p, s in SHAPES.items()}
    assert manifest["roles"] == list(ROLES)
    assert manifest["complete"] is True and manifest["attrs"] == {"task": "arith"}
    assert manifest["n_examples"] == 2 * BATCH == len(manifest["examples"])
    assert [ex["shard"] for ex in manifest["examples"]] == [0] * BATCH + [1] * BATCH
    assert manifest["examples"][5]["layout"] == batches[1][1][1]["layout"]
    for i, rec in enumerate(manifest["shards"]):
        file = tmp_path / "s" / rec["file"]
        assert rec["index"] == i and rec["file"] == f"shard-{i:05d}.safetensors"
        assert rec["examples"] == [i * BATCH, (i + 1) * BATCH] and rec["n_examples"] == BATCH
        assert rec["bytes"] == file.stat().st_size
        assert rec["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        with safe_open(str(file), framework="pt") as f:
            assert {
                f"{p}/{c}"
                for p in POINTS
                for c in ("values", "example", "pos", "role", "step", "branch", "timestep")
            } == set(f.keys())
            # example indices on disk are global
            assert f.get_tensor("queries/example").min() == i * BATCH
    assert not list((tmp_path / "s").glob(".*tmp*"))
    assert not (tmp_path / "s" / LOCK_NAME).exists()  # finalize released the writer lock


def test_labels_examples_layout(tmp_path):
    build(tmp_path / "s", n_shards=2)
    store = ActivationStore.open(tmp_path / "s")
    assert store.labels("answer") == [e % 3 for e in range(2 * BATCH)]
    assert store.label_keys == ["answer", "level"]
    assert [ex["id"] for ex in store.examples] == [f"ex{e}" for e in range(2 * BATCH)]
    assert store.examples[6]["meta"] == {"prompt": "prompt 6"}
    assert store.layout(0) == ["text"] * 3 + ["query"] * 2 + ["image_gen"] * 2
    assert store.layout(3) == ["text"] * 3 + ["image_gen"] * 2
    with pytest.raises(IndexError, match="8 examples"):
        store.layout(8)


def test_unknown_label_and_point_errors_suggest(tmp_path):
    build(tmp_path / "s", n_shards=1)
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(KeyError) as err:
        store.labels("answr")
    assert "'answer'" in str(err.value) and "level" in str(err.value)
    with pytest.raises(ValueError) as err:
        store.rows("blocks.0.resid_pre")
    msg = str(err.value)
    assert "did you mean 'blocks.0.resid_post'" in msg and "queries" in msg
    with pytest.raises(ValueError, match="did you mean 'queries'"):
        store.matrix("query")
    with pytest.raises(ValueError, match="unknown role 'querys'"):
        store.rows("queries", roles="querys")


def test_summary_has_key_facts(tmp_path):
    build(tmp_path / "s", n_shards=2)
    text = ActivationStore.open(tmp_path / "s").summary()
    for fact in [
        str(tmp_path / "s"),
        "TinyUnified",
        "complete",
        "8 in 2 shards",
        "blocks.1.resid_post  [8] float32",
        "queries  [2, 4] float32",
        "query 12",  # 6 of 8 examples have 2 query positions
        "answer: 3 values",
        '"L1": 4',
        " on disk",
    ]:
        assert fact in text, fact
    store = ActivationStore.create(tmp_path / "t", model=MODEL, points=POINTS)
    assert "INCOMPLETE" in store.summary()


# -- resume / overwrite ---------------------------------------------------------------------------------


def test_resume_skips_finished_shards_and_appends(tmp_path):
    build(tmp_path / "ref", n_shards=4)
    store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS)
    for i in range(2):
        store.write_shard(i, *make_batch(i))
    del store  # "interrupted": never finalized

    assert not ActivationStore.open(tmp_path / "s").complete
    store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, resume=True)
    assert store.finished_shards == {0, 1}
    assert store.has_shard(1) and not store.has_shard(2)
    written = []
    for i in range(4):
        if not store.has_shard(i):
            store.write_shard(i, *make_batch(i))
            written.append(i)
    store.finalize()
    assert written == [2, 3]

    resumed, ref = ActivationStore.open(tmp_path / "s", verify="full"), ActivationStore.open(tmp_path / "ref")
    assert resumed.complete and resumed.n_examples == 4 * BATCH
    assert resumed.examples == ref.examples
    for point in POINTS:
        assert_rows_equal(resumed.rows(point), ref.rows(point))


def test_create_on_existing_store_requires_resume_or_overwrite(tmp_path):
    build(tmp_path / "s", n_shards=2, finalize=False)
    with pytest.raises(StoreExistsError) as err:
        ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS)
    assert isinstance(err.value, FileExistsError)
    msg = str(err.value)
    assert "already exists" in msg and "2 finished shards" in msg
    assert "resume=True" in msg and "overwrite=True" in msg and "--" not in msg  # library spelling
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) == 2  # untouched

    (tmp_path / "s" / "notes.txt").write_text("mine")
    store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, overwrite=True)
    assert store.finished_shards == set() and store.n_examples == 0
    assert not list((tmp_path / "s").glob("shard-*.safetensors"))
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"  # only the store's own files go
    with pytest.raises(ValueError, match="not both"):
        ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, overwrite=True, resume=True)


def test_resume_with_different_points_or_model_raises(tmp_path):
    build(tmp_path / "s", n_shards=1, finalize=False)
    with pytest.raises(ValueError) as err:
        ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS[:2] + ["gen_head.in"], resume=True)
    msg = str(err.value)
    assert "gen_head.in" in msg and "queries" in msg and "points differ" in msg
    with pytest.raises(ValueError, match="config_hash: store 'abc123' vs requested 'zzz'"):
        ActivationStore.create(
            tmp_path / "s", model={**MODEL, "config_hash": "zzz"}, points=POINTS, resume=True
        )
    assert ActivationStore.open(tmp_path / "s").finished_shards == {0}


def test_write_shard_refuses_finished_or_out_of_order(tmp_path):
    store, _ = build(tmp_path / "s", n_shards=2, finalize=False)
    with pytest.raises(StoreExistsError, match="shard 1 .* already finished"):
        store.write_shard(1, *make_batch(1))
    with pytest.raises(ValueError, match="index order: shard 3 needs shards 0..2"):
        store.write_shard(3, *make_batch(3))
    with pytest.raises(PermissionError, match="read-only"):
        ActivationStore.open(tmp_path / "s").write_shard(2, *make_batch(2))
    assert store.finished_shards == {0, 1}


def test_resume_rewrites_a_deleted_shard_with_same_global_ids(tmp_path):
    build(tmp_path / "s", n_shards=3)
    before = ActivationStore.open(tmp_path / "s").rows("queries")
    (tmp_path / "s" / "shard-00001.safetensors").unlink()
    with pytest.warns(UserWarning, match="shard-00001.safetensors is missing"):
        store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, resume=True)
    assert store.finished_shards == {0, 2}
    rows, examples = make_batch(1)
    with pytest.raises(ValueError, match="same way"):
        store.write_shard(1, rows, [{**ex, "id": "other"} for ex in examples])
    with pytest.raises(ValueError, match="not written yet"):
        store.finalize()
    store.write_shard(1, rows, examples)
    store.finalize()
    assert_rows_equal(ActivationStore.open(tmp_path / "s", verify="full").rows("queries"), before)


def test_failed_write_leaves_store_unchanged(tmp_path, monkeypatch):
    store, _ = build(tmp_path / "s", n_shards=1, finalize=False)
    manifest = (tmp_path / "s" / "manifest.json").read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(1, *make_batch(1))
    assert (tmp_path / "s" / "manifest.json").read_bytes() == manifest
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != LOCK_NAME)
    assert names == ["manifest.json", "shard-00000.safetensors"]
    assert ActivationStore.open(tmp_path / "s", verify="full").finished_shards == {0}


# -- damage ---------------------------------------------------------------------------------------------


def test_truncated_shard_is_corrupt_at_open(tmp_path):
    build(tmp_path / "s", n_shards=2)
    file = tmp_path / "s" / "shard-00001.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(StoreCorruptError) as err:
        ActivationStore.open(tmp_path / "s")
    msg = str(err.value)
    assert "shard-00001.safetensors" in msg and "bytes" in msg
    assert "delete that shard file" in msg and "resume=True" in msg
    assert isinstance(err.value, ValueError)


def test_altered_bytes_caught_on_lazy_read_and_verify(tmp_path):
    build(tmp_path / "s", n_shards=2)
    file = tmp_path / "s" / "shard-00001.safetensors"
    flip_byte(file)
    store = ActivationStore.open(tmp_path / "s")  # same size: open is cheap and passes
    with pytest.raises(StoreCorruptError, match="shard-00001.safetensors has sha256 .*altered"):
        store.rows("queries")
    with pytest.raises(StoreCorruptError, match="shard-00001.safetensors"):
        ActivationStore.open(tmp_path / "s", verify="lazy").verify()
    with pytest.raises(StoreCorruptError, match="shard-00001.safetensors"):
        ActivationStore.open(tmp_path / "s", verify="full")
    # verify="none" trusts the bytes: the data is read back, including the altered value
    assert len(ActivationStore.open(tmp_path / "s", verify="none").rows("queries")) > 0


def test_intact_store_verifies(tmp_path):
    build(tmp_path / "s", n_shards=2)
    store = ActivationStore.open(tmp_path / "s", verify="full")
    store.verify()
    assert store.finished_shards == {0, 1}


def test_missing_shard_file_is_corrupt(tmp_path):
    build(tmp_path / "s", n_shards=3)
    (tmp_path / "s" / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreCorruptError, match="shard-00002.safetensors is missing"):
        ActivationStore.open(tmp_path / "s")


def test_corrupt_manifest_json_is_clear_and_resume_rebuilds(tmp_path):
    store, batches = build(tmp_path / "s", n_shards=2, finalize=False)
    store.close()  # "interrupted": the writer is gone
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(StoreCorruptError) as err:
        ActivationStore.open(tmp_path / "s")
    assert "manifest.json is not valid JSON" in str(err.value) and "resume=True" in str(err.value)

    with pytest.warns(UserWarning, match="rebuilding"):
        store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, resume=True)
    assert store.finished_shards == {0, 1}
    store.write_shard(2, *make_batch(2))
    store.finalize()
    reopened = ActivationStore.open(tmp_path / "s", verify="full")
    assert reopened.n_examples == 3 * BATCH
    assert reopened.labels("answer") == [e % 3 for e in range(3 * BATCH)]
    assert_rows_equal(reopened.rows("queries"), expected_rows([*batches, make_batch(2)], "queries"))


def test_missing_manifest_or_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore.open(tmp_path / "nothing")
    build(tmp_path / "s", n_shards=1)
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(StoreCorruptError, match="manifest.json is missing .* 1 shard files"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreExistsError, match="manifest missing"):
        ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS)


def test_shard_missing_a_point_is_corrupt(tmp_path):
    build(tmp_path / "s", n_shards=2)
    file = tmp_path / "s" / "shard-00000.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("queries/")}  # noqa: SIM118
    save_file(tensors, str(file))
    # make the manifest agree on size and hash, so only the contents disagree
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][0].update(
        bytes=file.stat().st_size, sha256=hashlib.sha256(file.read_bytes()).hexdigest()
    )
    rewrite_manifest(tmp_path / "s", manifest)
    store = ActivationStore.open(tmp_path / "s")  # sizes and hashes agree with the manifest
    # the shard is checked as a whole against the manifest on its first read, whatever the point
    with pytest.raises(
        StoreCorruptError, match="shard-00000.safetensors has no tensor 'queries/values'"
    ) as err:
        store.rows("blocks.0.resid_post")
    assert "'queries/branch'" in str(err.value) and "resume=True" in str(err.value)
    with pytest.raises(StoreCorruptError, match="shard-00000"):
        store.rows("queries")
    with pytest.raises(StoreCorruptError, match="queries/example"):
        ActivationStore.open(tmp_path / "s", verify="full")


def test_manifest_row_count_mismatch_is_corrupt(tmp_path):
    build(tmp_path / "s", n_shards=1)
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][0]["rows"]["queries"] += 1
    rewrite_manifest(tmp_path / "s", manifest)
    with pytest.raises(StoreCorruptError, match="'queries/values' has shape .* manifest implies"):
        ActivationStore.open(tmp_path / "s").rows("queries")


# -- write validation ---------------------------------------------------------------------------------


def test_write_shard_validates_points_shapes_and_columns(tmp_path):
    store, _ = build(tmp_path / "s", n_shards=1, finalize=False)
    rows, examples = make_batch(1)

    missing = {p: r for p, r in rows.items() if p != "queries"}
    with pytest.raises(ValueError, match=r"missing \['queries'\]"):
        store.write_shard(1, missing, examples)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        store.write_shard(1, {**rows, "extra": rows["queries"]}, examples)

    bad_shape, _ = make_batch(1, shapes={**SHAPES, "queries": (2, 5)})
    with pytest.raises(ValueError) as err:
        store.write_shard(1, bad_shape, examples)
    assert "'queries'" in str(err.value) and "[2, 5]" in str(err.value) and "[2, 4]" in str(err.value)

    half, _ = make_batch(1, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 but the store holds float32"):
        store.write_shard(1, half, examples)

    r = rows["queries"]
    short = {**rows, "queries": Rows(r.values, r.example[:-1], r.pos, r.role, r.step, r.branch)}
    with pytest.raises(ValueError, match="column 'example' has shape"):
        store.write_shard(1, short, examples)
    with pytest.raises(ValueError, match="batch-local"):
        store.write_shard(1, rows, examples[:2])
    with pytest.raises(ValueError, match="unknown keys \\['label'\\]"):
        store.write_shard(1, rows, [{"id": 0, "label": {}, "layout": []}] * BATCH)
    assert store.finished_shards == {0}  # nothing above touched the store
    store.write_shard(1, rows, examples)
    assert store.finished_shards == {0, 1}


def test_mixed_dtypes_across_points_rejected(tmp_path):
    store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS)
    rows, examples = make_batch(0)
    r = rows["queries"]
    rows["queries"] = Rows(r.values.half(), r.example, r.pos, r.role, r.step, r.branch)
    with pytest.raises(ValueError, match="'queries' has dtype float16 but 'blocks.0.resid_post' has float32"):
        store.write_shard(0, rows, examples)


def test_no_pickle_only_json_and_safetensors(tmp_path):
    build(tmp_path / "s", n_shards=1)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["manifest.json", "shard-00000.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        json.loads((tmp_path / "s" / "manifest.json").read_text())
    with pytest.raises(ValueError, match="plain JSON"):
        ActivationStore.create(tmp_path / "t", model={"model_class": object()}, points=POINTS)


def test_store_with_other_role_numbering_is_remapped(tmp_path):
    """A store written by a toolkit that numbered roles differently reads back in today's numbering."""
    _, batches = build(tmp_path / "s", n_shards=1)
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = as_schema_1(tmp_path / "s")  # schema 1: the roles list was only in the manifest
    old_roles = list(reversed(ROLES))  # pretend id 0 meant "pad", id 4 meant "image_und", ...
    manifest["roles"] = old_roles
    manifest_file.write_text(json.dumps(manifest))
    store = ActivationStore.open(tmp_path / "s")
    stored = expected_rows(batches, "queries")
    got = store.rows("queries")
    assert [ROLES[i] for i in got.role.tolist()] == [old_roles[i] for i in stored.role.tolist()]
    assert torch.equal(store.rows("queries", roles="pad").values, stored.values[stored.role == 0])
    assert store.layout(0)[0] == "pad"
