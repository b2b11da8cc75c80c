"""Sweeps delete only what they made, import loaders only from files unless allowed, and refuse bad
prompts files before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from uniprobe.experiments.cli import main
from uniprobe.experiments.sweep import ConfigError, load_config, run_sweep
from uniprobe.experiments.sweep.merge import make_parts_dir, part_path, parts_dir, remove_parts
from uniprobe.experiments.sweep.models import import_loader
from uniprobe.experiments.sweep.runner import ModelCache

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp_path: Path, **extra) -> Path:
    """A one-model, capture-only sweep over four prompts (quick)."""
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"text": "t{5 + i} t6 t3"}}\n' for i in range(4)))
    raw = {
        "name": "safe",
        "models": [{"path": "tiny-llama"}],
        "tasks": [{"name": "p", "prompts": "prompts.jsonl"}],
        "analyses": ["capture"],
        "capture": {"batch_size": 2},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def users_directory(root: Path) -> dict[str, bytes]:
    """A directory a user made, with their own files in ``runs/``."""
    (root / "runs" / "experiment-1").mkdir(parents=True)
    (root / "runs" / "experiment-1" / "results.txt").write_text("weeks of work")
    (root / "runs" / "notes.md").write_text("mine")
    (root / "index.json").write_text('{"mine": true}')
    return files(root)


# -- --restart deletes only in a sweep directory, and only the sweep's files --------------------------
@pytest.mark.parametrize(
    "sweep_json",
    [
        None,  # no sweep.json
        '{"hello": 1}',  # someone else's
        "{not json",  # damaged
        json.dumps({"format": "uniprobe-sweep", "settings": {}, "runs": ["../../elsewhere"]}),  # a path
    ],
)
def test_restart_refuses_a_directory_uniprobe_did_not_make_and_deletes_nothing(tmp_path, capsys, sweep_json):
    root = tmp_path / "mine"
    if sweep_json is not None:
        (root).mkdir()
        (root / "sweep.json").write_text(sweep_json)
    before = users_directory(root)
    code = main(["sweep", str(write_config(tmp_path)), "--out", str(root), "--restart"])
    err = capsys.readouterr().err
    assert code == 2 and files(root) == before
    assert err.count("\n") == 1 and err.startswith(f"uniprobe sweep: error: --restart: {root} ")
    assert "nothing in it was deleted" in err and "--out NEW" in err


def test_restart_deletes_the_sweeps_runs_and_index_and_keeps_everything_else(tmp_path):
    root = tmp_path / "out"
    run_sweep(load_config(write_config(tmp_path), out=str(root)))
    marker = json.loads((root / "sweep.json").read_text())
    assert marker["format"] == "uniprobe-sweep" and marker["runs"] == ["tiny-llama__p"]
    (root / "runs" / "notes.md").write_text("mine")
    (root / "runs" / "other").mkdir()
    (root / "runs" / "other" / "keep.txt").write_text("mine too")
    (root / "README.txt").write_text("about this sweep")

    renamed = write_config(tmp_path, tasks=[{"name": "q", "prompts": "prompts.jsonl"}])
    assert main(["sweep", str(renamed), "--out", str(root), "--restart"]) == 0
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["notes.md", "other", "tiny-llama__q"]
    assert (root / "runs" / "other" / "keep.txt").read_text() == "mine too"
    assert (root / "README.txt").exists()
    assert json.loads((root / "sweep.json").read_text())["runs"] == ["tiny-llama__q"]


def test_restart_refuses_a_run_folder_that_is_a_link(tmp_path, capsys):
    root = tmp_path / "out"
    run_sweep(load_config(write_config(tmp_path), out=str(root)))
    elsewhere = tmp_path / "elsewhere"
    (root / "runs" / "tiny-llama__p").rename(elsewhere)
    (root / "runs" / "tiny-llama__p").symlink_to(elsewhere, target_is_directory=True)
    before = files(elsewhere)
    assert main(["sweep", str(write_config(tmp_path)), "--out", str(root), "--restart"]) == 2
    assert "is a link, which uniprobe does not make; nothing was deleted" in capsys.readouterr().err
    assert files(elsewhere) == before and (root / "sweep.json").exists()


def test_a_sweep_json_from_before_the_format_mark_still_counts(tmp_path):
    root = tmp_path / "out"
    run_sweep(load_config(write_config(tmp_path), out=str(root)))
    marker = json.loads((root / "sweep.json").read_text())
    legacy = {k: marker[k] for k in ("settings", "runs", "source", "created")}
    (root / "sweep.json").write_text(json.dumps(legacy))
    entries = run_sweep(load_config(write_config(tmp_path), out=str(root)))  # resumes: all done
    assert [e["status"] for e in entries] == ["done"]
    run_sweep(load_config(write_config(tmp_path), out=str(root)), restart=True)
    assert json.loads((root / "sweep.json").read_text())["format"] == "uniprobe-sweep"


def test_restart_into_a_new_or_empty_directory_just_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "new", tmp_path / "empty"):
        assert main(["sweep", str(write_config(tmp_path)), "--out", str(root), "--restart"]) == 0
        assert (root / "runs" / "tiny-llama__p" / "DONE.json").exists()


# -- rank part stores --------------------------------------------------------------------------------
def test_remove_parts_deletes_only_a_marked_parts_folder_and_only_its_part_stores(tmp_path):
    store = tmp_path / "run" / "store"
    unmarked = parts_dir(store)
    unmarked.mkdir(parents=True)
    (unmarked / "data.bin").write_text("not the sweep's")
    assert remove_parts(store) is False and (unmarked / "data.bin").exists()

    (unmarked / "data.bin").unlink()
    make_parts_dir(store)
    for rank in range(2):
        part_path(store, rank, 2).mkdir()
        (part_path(store, rank, 2) / "manifest.json").write_text("{}")
    assert remove_parts(store) is True and not parts_dir(store).exists()

    make_parts_dir(store)
    part_path(store, 0, 2).mkdir()
    (parts_dir(store) / "keep.txt").write_text("someone's")
    assert remove_parts(store) is False
    assert sorted(p.name for p in parts_dir(store).iterdir()) == ["keep.txt"]


# -- loaders -----------------------------------------------------------------------------------------
LOADER = """
from uniprobe.experiments.models import TinyTokenizer
from uniprobe.experiments.tiny import tiny_llama

def load(path):
    return tiny_llama()[0], TinyTokenizer(64)
"""


@pytest.mark.parametrize("how", ["yaml", "set"])
def test_module_loaders_need_the_flag(tmp_path, capsys, how):
    model = {"path": "tiny-llama", "name": "m"}
    if how == "yaml":
        model["loader"] = "json:loads"
    config = write_config(tmp_path, models=[model])
    args = ["sweep", str(config), "--out", str(tmp_path / "o")]
    if how == "set":
        args += ["--set", "models[0].loader=json:loads"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "uniprobe sweep: error: models[0].loader: 'json:loads' would import the module 'json'"
    )
    assert "FILE.py:function" in err and "--allow-module-loaders" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert main([*args, "--plan", "--allow-module-loaders"]) == 0


def test_a_file_loader_runs_and_a_module_loader_runs_only_when_allowed(tmp_path, monkeypatch):
    (tmp_path / "my_loader.py").write_text(LOADER)
    cfg = load_config(write_config(tmp_path, models=[{"path": "tiny-llama", "loader": "my_loader.py:load"}]))
    assert cfg.runs[0]["model"]["loader"] == f"{tmp_path / 'my_loader.py'}:load"
    assert ModelCache().get(cfg.runs[0]["model"]).model.config.vocab_size == 64

    monkeypatch.syspath_prepend(str(tmp_path))
    module = write_config(tmp_path, models=[{"path": "tiny-llama", "loader": "my_loader:load"}])
    with pytest.raises(ConfigError, match="--allow-module-loaders"):
        load_config(module)
    allowed = load_config(module, out=str(tmp_path / "o"), allow_module_loaders=True)
    spec = allowed.runs[0]["model"]
    with pytest.raises(ValueError, match=r"would import the module 'my_loader'.*allow"):
        ModelCache().get(spec)  # the resolved spec alone does not let a module be imported
    assert [e["status"] for e in run_sweep(allowed)] == ["done"]


def test_import_loader_refuses_modules_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="'json:loads' would import the module 'json'"):
        import_loader("json:loads")
    assert import_loader("json:loads", allow_modules=True) is json.loads
    with pytest.raises(FileNotFoundError, match="does not exist; give an existing FILE.py:function"):
        import_loader(f"{tmp_path / 'nope.py'}:load")


def test_a_missing_loader_file_is_reported_before_running(tmp_path, capsys):
    config = write_config(tmp_path, models=[{"path": "tiny-llama", "loader": "nope.py:load"}])
    assert main(["sweep", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"models[0].loader: {tmp_path / 'nope.py'} does not exist" in err
    assert "--set models[0].loader=FILE.py:function" in err and not (tmp_path / "o").exists()


# -- prompts files and one-line errors ---------------------------------------------------------------
def test_a_malformed_prompts_file_stops_the_sweep_before_anything_is_written(tmp_path, capsys):
    config = write_config(tmp_path)
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write('{"input_ids": [1, 2.5]}\n')
    assert main(["sweep", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uniprobe sweep: error: tasks[0].prompts: ")
    assert "prompts.jsonl:5: input_ids[1] is 2.5, not a token id" in err and not (tmp_path / "o").exists()
    assert main(["sweep", str(config), "--plan", "--out", str(tmp_path / "o")]) == 0
    assert "to fix before running: tasks[0].prompts:" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - {path: tiny-llama\n")  # yaml's message spans several lines
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uniprobe sweep: error: ") and "not valid YAML" in err and err.count("\n") == 1
