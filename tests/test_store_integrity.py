"""The activation store refuses what it cannot vouch for (issue 12, section 4).

Resume continues exactly the capture that was started; one writer at a time; manifest edits are
caught; nothing outside the store directory is read; one type per label key; a capture with an
empty point is not marked complete; probing an incomplete store says so; files get the umask's
mode; a full disk is a clear error with nothing partial left.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import uniprobe.hooks.store.files as files_module
import uniprobe.hooks.store.writer as writer_module
from test_store import BATCH, MODEL, POINTS, as_schema_1, build, make_batch, rewrite_manifest
from uniprobe.experiments.cli import main
from uniprobe.experiments.tiny import tiny_llama
from uniprobe.hooks.pipeline import capture_dataset
from uniprobe.hooks.store import (
    ActivationStore,
    IncompleteStoreWarning,
    MixedLabelTypesError,
    ResumeMismatchError,
    StoreCorruptError,
    StoreDiskFullError,
    StoreLockedError,
)
from uniprobe.hooks.store.errors import EmptyCaptureError
from uniprobe.hooks.store.files import is_disk_full
from uniprobe.hooks.store.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]


def _examples(n: int = 10) -> list[dict]:
    return [
        {"id": f"ex{i}", "input_ids": [1, 5 + i % 7, 6 + i % 5, 7][: 2 + i % 3], "labels": {"answer": i % 3}}
        for i in range(n)
    ]


def _interrupted_capture(model, examples, out: Path, after_batches: int = 2, **kw) -> None:
    """A capture stopped by Ctrl-C during batch ``after_batches + 1``."""
    calls = {"n": 0}

    def boom(mod, args):
        calls["n"] += 1
        if calls["n"] == after_batches + 1:
            raise KeyboardInterrupt("simulated Ctrl-C")

    handle = model.model.layers[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            kw.setdefault("shard_size", kw.get("batch_size"))  # a shard per batch: interrupted between shards
            capture_dataset(model, examples, "blocks.*.resid_post", out, progress=False, **kw)
    finally:
        handle.remove()


def _store_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


# -- 1. resume continues exactly the capture that was started ------------------------------------


@pytest.fixture(scope="module")
def model():
    m, _ = tiny_llama()
    return m


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_size": 3}, "batch_size: store 4 vs now 3"),
        ({"examples": "reversed"}, "prompts: store n_examples 10"),
        ({"examples": "other"}, "prompts: store n_examples 10, sha256"),
        ({"roles": ["text"]}, 'roles: store null vs now ["text"]'),
        ({"dtype": torch.float16}, 'dtype: store null vs now "float16"'),
        ({"mode": "generation"}, 'mode: store "understanding" vs now "generation"'),
        ({"positions": [0, 1]}, "positions: store null vs now [0, 1]"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path, model, change, field):
    examples = _examples()
    out = tmp_path / "s"
    _interrupted_capture(model, examples, out, batch_size=4)
    before = _store_files(out)
    kw = {"batch_size": 4, "shard_size": 4, **change}
    which = kw.pop("examples", None)
    data = examples[::-1] if which == "reversed" else _examples(12) if which == "other" else examples
    with pytest.raises(ResumeMismatchError) as err:
        capture_dataset(model, data, "blocks.*.resid_post", out, resume=True, progress=False, **kw)
    msg = str(err.value)
    assert field in msg and "overwrite=True" in msg and "new directory" in msg and "same" in msg
    assert isinstance(err.value, ValueError)  # the CLI's exit status 2
    assert _store_files(out) == before  # refused before anything was written (no lock left either)
    # the same settings continue it, and the result is exactly one capture
    store = capture_dataset(
        model, examples, "blocks.*.resid_post", out, batch_size=4, shard_size=4, resume=True, progress=False
    )
    full = capture_dataset(
        model, examples, "blocks.*.resid_post", tmp_path / "ref", batch_size=4, shard_size=4, progress=False
    )
    assert store.complete and store.examples == full.examples
    ActivationStore.open(out, verify="full")


def test_identity_is_recorded_in_manifest_and_shard_headers(tmp_path, model):
    store = capture_dataset(
        model,
        _examples(),
        "blocks.0.resid_post",
        tmp_path / "s",
        batch_size=4,
        roles=["text"],
        progress=False,
    )
    identity = store.identity
    assert (
        identity["batch_size"] == 4 and identity["roles"] == ["text"] and identity["mode"] == "understanding"
    )
    assert identity["prompts"]["n_examples"] == 10 and len(identity["prompts"]["sha256"]) == 64
    assert identity["adapter"]["name"] == "causal_lm" and identity["backend"] == "torch"
    assert store.expected_examples == 10
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / "shard-00000.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["uniprobe.shard"])
    assert header["identity"] == identity and header["roles"] == store.manifest["roles"]


def test_api_resume_without_identity_of_a_captured_store_is_refused(tmp_path, model):
    _interrupted_capture(model, _examples(), tmp_path / "s", batch_size=4)
    made = ActivationStore.open(tmp_path / "s")
    with pytest.raises(ResumeMismatchError, match="batch_size: store 4 vs now null"):
        ActivationStore.create(tmp_path / "s", model=made.model, points=made.points, resume=True)


def test_cli_resume_with_another_batch_size_exits_2(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"input_ids": [1, 5 + i], "labels": {"y": i % 2}}) + "\n" for i in range(6))
    )
    base = ["capture", "--model", "tiny-llama", "--prompts", str(prompts), "--points", "blocks.0.resid_post"]
    out = ["--out", str(tmp_path / "s")]
    assert main([*base, *out, "--batch-size", "2"]) == 0
    capsys.readouterr()
    assert main([*base, *out, "--batch-size", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "batch_size: store 2 vs now 3" in err and "--overwrite" in err


# -- 2. one writer at a time ---------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from uniprobe.hooks.store import ActivationStore
    store = ActivationStore.create(sys.argv[1], model={"model_class": "Other"}, points=["p"])
    print("ready", flush=True)
    time.sleep(300)
    """
)


def test_a_second_process_is_refused_and_its_stale_lock_recovered(tmp_path):
    out = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        for kw in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises(StoreLockedError) as err:
                ActivationStore.create(out, model={"model_class": "Other"}, points=["p"], **kw)
            msg = str(err.value)
            assert str(out) in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
            assert "wait for that capture" in msg and LOCK_NAME in msg
        assert ActivationStore.open(out).n_examples == 0  # readers take no lock
        assert (out / LOCK_NAME).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is stale, recovered with a warning
    with pytest.warns(UserWarning, match=f"stale writer lock .*process {holder.pid} .* no longer running"):
        store = ActivationStore.create(out, model={"model_class": "Other"}, points=["p"], resume=True)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    store.close()
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_by_finalize_close_context_gc_and_errors(tmp_path):
    path = tmp_path / "s"
    store = ActivationStore.create(path, model=MODEL, points=POINTS)
    assert (path / LOCK_NAME).exists()
    with pytest.raises(StoreLockedError, match="already open for writing in this process"):
        ActivationStore.create(path, model=MODEL, points=POINTS, resume=True)
    store.write_shard(0, *make_batch(0))
    assert ActivationStore.open(path).finished_shards == {0}  # the lock is not data
    assert store.size_on_disk() == sum(p.stat().st_size for p in path.iterdir() if p.name != LOCK_NAME)
    store.close()
    assert not (path / LOCK_NAME).exists()
    with pytest.raises(PermissionError, match="finalized or closed.*resume=True"):
        store.write_shard(1, *make_batch(1))

    with ActivationStore.create(path, model=MODEL, points=POINTS, resume=True) as store:
        store.write_shard(1, *make_batch(1))
        assert (path / LOCK_NAME).exists()
    assert not (path / LOCK_NAME).exists()

    store = ActivationStore.create(path, model=MODEL, points=POINTS, resume=True)
    del store  # garbage collection releases it
    assert not (path / LOCK_NAME).exists()

    with pytest.raises(ResumeMismatchError):  # an error inside create leaves no lock behind
        ActivationStore.create(path, model={**MODEL, "config_hash": "x"}, points=POINTS, resume=True)
    assert not (path / LOCK_NAME).exists()

    store = ActivationStore.create(path, model=MODEL, points=POINTS, resume=True)
    store.write_shard(2, *make_batch(2))
    store.finalize()
    assert not (path / LOCK_NAME).exists()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json"] + [
        f"shard-0000{i}.safetensors" for i in range(3)
    ]


def test_lock_of_another_host_is_refused_and_overwrite_keeps_other_files(tmp_path):
    path = tmp_path / "s"
    build(path, n_shards=1)
    (path / LOCK_NAME).write_text(
        json.dumps({"pid": 1, "host": "elsewhere", "created": "then", "token": "t"})
    )
    with pytest.raises(StoreLockedError, match=f"pid 1 on host elsewhere .* delete {path / LOCK_NAME}"):
        ActivationStore.create(path, model=MODEL, points=POINTS, overwrite=True)
    assert ActivationStore.open(path).n_examples == BATCH  # nothing was wiped
    (path / LOCK_NAME).unlink()
    (path / f"{LOCK_NAME}.stale.0a0b").write_text("{}")  # a leftover of breaking a stale lock
    (path / "notes.txt").write_text("mine")
    store = ActivationStore.create(path, model=MODEL, points=POINTS, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [LOCK_NAME, "manifest.json", "notes.txt"]
    store.close()


# -- 3. manifest edits are caught ----------------------------------------------------------------------


def _edit(path: Path, change, recompute: bool) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    if recompute:
        rewrite_manifest(path, manifest)
    else:
        (path / "manifest.json").write_text(json.dumps(manifest))


EDITS = {
    "id": (lambda m: m["examples"][5].update(id="exX"), "example 5 id"),
    "label": (lambda m: m["examples"][5]["labels"].update(answer=0), "example 5 labels"),
    "layout": (
        lambda m: m["examples"][2].update(layout=m["examples"][2]["layout"][::-1]),
        "example 2 layout",
    ),
    "roles": (lambda m: m.update(roles=m["roles"][::-1]), "roles is"),
}


@pytest.mark.parametrize("what", sorted(EDITS))
def test_manifest_edit_is_caught_at_open(tmp_path, what):
    build(tmp_path / "s", n_shards=2)
    change, named = EDITS[what]
    _edit(tmp_path / "s", change, recompute=False)
    for verify in ("lazy", "full"):
        with pytest.raises(StoreCorruptError) as err:
            ActivationStore.open(tmp_path / "s", verify=verify)
        msg = str(err.value)
        assert "changed after it was written" in msg and named in msg and "resume=True" in msg


@pytest.mark.parametrize("what", sorted(EDITS))
def test_manifest_edit_with_recomputed_digest_is_caught_by_the_shard_headers(tmp_path, what):
    build(tmp_path / "s", n_shards=2)
    change, named = EDITS[what]
    _edit(tmp_path / "s", change, recompute=True)
    with pytest.raises(StoreCorruptError, match=named):
        ActivationStore.open(tmp_path / "s", verify="full")
    store = ActivationStore.open(tmp_path / "s")  # lazy: the digest agrees, the first read checks
    with pytest.raises(StoreCorruptError) as err:
        store.matrix("blocks.0.resid_post", role="text")
    assert named in str(err.value) and "in the manifest but" in str(err.value)
    assert "restore the original manifest.json" in str(err.value)
    with pytest.raises(StoreCorruptError, match=named):
        ActivationStore.open(tmp_path / "s").verify()


def test_edit_of_what_only_the_manifest_carries_is_caught(tmp_path):
    build(tmp_path / "s", n_shards=1)
    _edit(tmp_path / "s", lambda m: m["attrs"].update(task="other"), recompute=False)
    with pytest.raises(StoreCorruptError, match="only the manifest carries: attrs"):
        ActivationStore.open(tmp_path / "s")
    ActivationStore.open(tmp_path / "s", verify="none")  # "none" trusts the manifest


def test_resume_rebuilds_an_edited_manifest_from_the_shard_headers(tmp_path):
    store, _ = build(tmp_path / "s", n_shards=2, finalize=False)
    store.close()
    _edit(tmp_path / "s", EDITS["label"][0], recompute=False)
    with pytest.warns(UserWarning, match="edited after it was written.*rebuilding"):
        store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, resume=True)
    store.write_shard(2, *make_batch(2))
    store.finalize()
    reopened = ActivationStore.open(tmp_path / "s", verify="full")
    assert reopened.labels("answer") == [e % 3 for e in range(3 * BATCH)]  # the shards' values


def test_schema_1_store_still_opens_reads_and_resumes(tmp_path):
    store, _ = build(tmp_path / "s", n_shards=2, finalize=False)
    store.close()
    as_schema_1(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", verify="full")
    assert store.manifest["schema_version"] == 1 and store.identity is None
    assert store.labels("answer") == [e % 3 for e in range(2 * BATCH)]
    assert len(store.matrix("queries", role="query")) == 6
    with pytest.warns(UserWarning, match="older uniprobe .*schema 1.*upgraded"):
        store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS, resume=True)
    store.write_shard(2, *make_batch(2))
    store.finalize()
    store = ActivationStore.open(tmp_path / "s", verify="full")
    assert store.manifest["schema_version"] == 2 and store.n_examples == 3 * BATCH


# -- 4. nothing outside the store directory is read ----------------------------------------------------


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors"])
def test_shard_file_outside_the_store_is_refused(tmp_path, name):
    build(tmp_path / "s", n_shards=1)
    _edit(tmp_path / "s", lambda m: m["shards"][0].update(file=name), recompute=True)
    with pytest.raises(StoreCorruptError, match="not inside the store directory"):
        ActivationStore.open(tmp_path / "s", verify="none")


def test_symlinked_shard_or_manifest_leading_outside_is_refused(tmp_path):
    build(tmp_path / "s", n_shards=2)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)  # same bytes, same size, same sha256: only the place is wrong
    for verify in ("none", "lazy", "full"):
        with pytest.raises(StoreCorruptError, match="outside the store directory"):
            ActivationStore.open(tmp_path / "s", verify=verify)
    shard.unlink()
    outside.rename(shard)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.rename(tmp_path / "m.json")
    manifest.symlink_to(tmp_path / "m.json")
    with pytest.raises(StoreCorruptError, match="symbolic link .* outside the store directory"):
        ActivationStore.open(tmp_path / "s")


# -- 5. one type per label key -------------------------------------------------------------------------


def test_mixed_label_types_are_refused_at_write_time(tmp_path):
    store = ActivationStore.create(tmp_path / "s", model=MODEL, points=POINTS)
    store.write_shard(0, *make_batch(0))  # "answer" is an int
    rows, examples = make_batch(1)
    examples[2]["labels"]["answer"] = "1"
    with pytest.raises(MixedLabelTypesError) as err:
        store.write_shard(1, rows, examples)
    msg = str(err.value)
    assert (
        "'answer'" in msg and "int in 7 examples" in msg and "str in 1 examples (ids 'ex6'; e.g. '1')" in msg
    )
    assert "'ex0'" in msg and "one type" in msg
    assert store.finished_shards == {0}
    rows, examples = make_batch(1)
    examples[0]["labels"]["answer"], examples[1]["labels"]["answer"] = 1.0, 2
    with pytest.raises(MixedLabelTypesError, match="float in 1 examples"):
        store.write_shard(1, rows, examples)  # 1 and 1.0 are two classes to probes too
    examples[0]["labels"]["answer"] = None  # absent is not a type
    store.write_shard(1, rows, examples)


def test_capture_refuses_mixed_label_types_before_writing(tmp_path, model):
    examples = _examples()
    examples[7]["labels"]["answer"] = "1"
    with pytest.raises(MixedLabelTypesError, match="'answer' mixes value types.*'ex7'"):
        capture_dataset(model, examples, "blocks.0.resid_post", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# -- 6. a capture with an empty point is not complete ------------------------------------------------


def test_capture_with_no_rows_at_a_point_is_an_error_and_stays_incomplete(tmp_path, model):
    out = tmp_path / "s"
    with pytest.raises(EmptyCaptureError) as err:
        capture_dataset(
            model, _examples(), "blocks.0.resid_post", out, roles=["image_gen"], batch_size=4, progress=False
        )
    msg = str(err.value)
    assert "no rows at 'blocks.0.resid_post'" in msg and "blocks.0.resid_post 0" in msg
    assert "['image_gen']" in msg and "text (" in msg and "overwrite=True" in msg
    store = ActivationStore.open(out)
    assert not store.complete and not (out / LOCK_NAME).exists()


def test_requested_role_without_rows_is_warned_about(tmp_path, model):
    with pytest.warns(UserWarning, match="requested role 'query' has no rows .*text \\d+, query 0"):
        store = capture_dataset(
            model, _examples(), "blocks.0.resid_post", tmp_path / "s", roles=["text", "query"], progress=False
        )
    assert store.complete


# -- 7. probing an incomplete store says so ----------------------------------------------------------


def _incomplete_probe_store(path: Path) -> None:
    from uniprobe.hooks.layout import role_ids
    from uniprobe.hooks.rows import Rows

    g = torch.Generator().manual_seed(0)
    store = ActivationStore.create(path, model={"model_class": "Synthetic"}, points=["blocks.0.resid_post"])
    layout = role_ids(["text"] * 2)
    for s in range(2):
        ex = torch.arange(30).repeat_interleave(2)
        pos = torch.arange(2).repeat(30)
        role = torch.tensor(layout).repeat(30)
        labels = [(s * 30 + i) % 2 for i in range(30)]
        values = torch.randn(60, 4, generator=g)
        values[:, 0] += 4.0 * torch.tensor(labels).repeat_interleave(2)
        rows = {
            "blocks.0.resid_post": Rows(values, ex, pos, role, torch.zeros_like(ex), torch.zeros_like(ex))
        }
        exs = [{"id": f"e{s * 30 + i}", "labels": {"y": labels[i]}, "layout": layout} for i in range(30)]
        store.write_shard(s, rows, exs)
    store.close()  # never finalized


def test_probe_on_an_incomplete_store_warns_and_records_it(tmp_path, capsys):
    import argparse

    from uniprobe.experiments.cli.probe import add_probe_parser
    from uniprobe.probes.linear import probe_store

    _incomplete_probe_store(tmp_path / "s")
    with pytest.warns(IncompleteStoreWarning, match="incomplete .* only the 60 examples present"):
        res = probe_store(tmp_path / "s", "y", folds=3, n_boot=20)
    assert res.meta["store_complete"] is False and res.meta["store_examples"] == 60
    assert res.meta["examples_used"] == 60 and res.meta["store_examples_expected"] is None

    parser = argparse.ArgumentParser()
    add_probe_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["probe", str(tmp_path / "s"), "--label", "y", "--folds", "3", "--out", str(tmp_path / "o")]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStoreWarning)  # the CLI says it on stderr instead
        assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "uniprobe probe: warning: the store" in captured.err and "incomplete" in captured.err
    assert "INCOMPLETE store: 60 examples present, 60 used" in captured.out
    meta = json.loads((tmp_path / "o" / "results.json").read_text())["meta"]
    assert meta["store_complete"] is False and meta["store_examples"] == 60


def test_probe_on_a_complete_capture_records_counts(tmp_path, model):
    from uniprobe.probes.linear import probe_store

    examples = [{**ex, "labels": {"y": i % 2}} for i, ex in enumerate(_examples(30))]
    capture_dataset(model, examples, "blocks.0.resid_post", tmp_path / "s", roles=["text"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStoreWarning)
        res = probe_store(tmp_path / "s", "y", folds=3, n_boot=20)
    assert res.meta["store_complete"] is True
    assert res.meta["store_examples"] == res.meta["store_examples_expected"] == 30


# -- 8. files get the umask's mode ----------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_store_and_probe_files_get_the_umask_mode(tmp_path, umask):
    from uniprobe.probes.results import ProbeResults, save_directions
    from uniprobe.probes.tuned_lens import TunedLens

    want = 0o666 & ~umask
    build(tmp_path / "s", n_shards=2)
    for p in (tmp_path / "s").iterdir():
        assert _mode(p) == want, (p.name, oct(_mode(p)))
    res = ProbeResults(
        [{"point": "p", "role": "text", "layer": 0, "accuracy": 1.0, "C": 1.0}],
        {"classes": [0, 1], "label": "y"},
        {f"p|text/{k}": torch.zeros(2, 3) for k in ("weight", "bias", "mean", "std")},
    )
    save_directions(res, tmp_path / "directions.safetensors")
    TunedLens(["p"], 3).save(tmp_path / "lens.safetensors")
    for name in ("directions.safetensors", "directions.json", "lens.safetensors"):
        assert _mode(tmp_path / name) == want, name
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]


# -- 9. a full disk ---------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch):
    store, _ = build(tmp_path / "s", n_shards=1, finalize=False)
    manifest = (tmp_path / "s" / "manifest.json").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "save_file", full)
    with pytest.raises(StoreDiskFullError) as err:
        store.write_shard(1, *make_batch(1))
    msg = str(err.value)
    assert isinstance(err.value, OSError) and isinstance(err.value, RuntimeError)  # CLI: exit 2
    assert err.value.errno == errno.ENOSPC
    assert (
        str(tmp_path / "s") in msg
        and "shard 1" in msg
        and "needs about" in msg
        and "free on that disk:" in msg
    )
    assert "resume=True" in msg
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != LOCK_NAME)
    assert names == ["manifest.json", "shard-00000.safetensors"]  # no temp file left
    assert (tmp_path / "s" / "manifest.json").read_bytes() == manifest
    monkeypatch.undo()
    store.write_shard(1, *make_batch(1))  # space again: the same writer goes on
    store.finalize()
    assert ActivationStore.open(tmp_path / "s", verify="full").n_examples == 2 * BATCH


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    store, _ = build(tmp_path / "s", n_shards=1, finalize=False)
    real = files_module._fsync_file

    def fsync(path):  # ENOSPC often shows only at fsync (delayed allocation, NFS)
        if path.name.startswith(".manifest.json"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real(path)

    monkeypatch.setattr(files_module, "_fsync_file", fsync)
    with pytest.raises(StoreDiskFullError, match="manifest of the activation store .*disk quota is exceeded"):
        store.write_shard(1, *make_batch(1))
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != LOCK_NAME)
    assert names == ["manifest.json", "shard-00000.safetensors"]  # the unlisted shard went too
    assert store.finished_shards == {0} and store.n_examples == BATCH  # memory matches the disk
    monkeypatch.undo()
    store.write_shard(1, *make_batch(1))
    store.finalize()
    assert ActivationStore.open(tmp_path / "s", verify="full").finished_shards == {0, 1}


def test_disk_full_as_reported_by_a_rust_writer():
    assert is_disk_full(Exception("Error while serializing: IoError(Os { code: 28, ... (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "denied"))
