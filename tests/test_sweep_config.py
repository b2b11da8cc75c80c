"""Sweep configs: every shipped config validates; a bad config names the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from uniprobe.experiments.cli import main
from uniprobe.experiments.sweep.config import ConfigError, apply_override, load_config, missing_files, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.endswith("_adapter.yaml"))


def _resolve(raw: dict, tmp_path: Path):
    return resolve(raw, tmp_path / "sweep.yaml")


def _minimal(**extra) -> dict:
    return {
        "models": [{"path": "sandbox-ar"}],
        "tasks": [{"name": "arith", "categories": ["arithmetic"]}],
        "analyses": ["capture", "probe"],
        **extra,
    }


def test_shipped_configs_are_listed():
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {"unisandbox.yaml", "gapeval.yaml", "r3.yaml"} <= names
    assert {f"real/{n}.yaml" for n in ("janus_pro_1b", "emu3", "chameleon_7b", "query_based")} <= names
    assert (CONFIGS / "real" / "query_adapter.yaml").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.runs and all(r["analyses"] for r in cfg.runs)
    assert len({r["id"] for r in cfg.runs}) == len(cfg.runs)
    problems = missing_files(cfg)
    if path.parent.name == "real":  # the weights are the user's: only the placeholder path is missing
        assert problems and all("--set models[0]." in p for p in problems)
        assert any(p.startswith("models[0].path:") for p in problems)
    else:
        assert problems == []


def test_query_adapter_file_loads():
    from uniprobe.hooks.adapters import load_adapter_file

    adapter = load_adapter_file(CONFIGS / "real" / "query_adapter.yaml")
    assert adapter.name == "metaquery" and "queries" in adapter.extra


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _minimal(analyses=["capture", "probe", "probes"]),
            "analyses[2]: unknown value 'probes' (did you mean 'probe'?); allowed: capture, probe, lens, "
            "patch, attention, knockout, steer, gapeval, r3",
        ),
        (
            _minimal(modles=[]),
            "modles: unknown key (did you mean 'models'?); allowed: name, out, seed, models",
        ),
        (_minimal(capture={"batchsize": 4}), "capture.batchsize: unknown key (did you mean 'batch_size'?)"),
        (_minimal(capture={"batch_size": 0}), "capture.batch_size: must be at least 1, got 0"),
        (
            _minimal(capture={"roles": ["txt"]}),
            "capture.roles[0]: unknown value 'txt' (did you mean 'text'?)",
        ),
        (_minimal(probe={"roles": ["text+querry"]}), "probe.roles[0]: unknown value 'querry'"),
        (_minimal(probe={"reduce": "max"}), "probe.reduce: unknown value 'max'; allowed: last, first, mean"),
        (_minimal(patch={"kinds": ["resid"]}), "patch.kinds[0]: unknown value 'resid'"),
        (_minimal(lens={"answers": "answer"}), "lens.answers: 'answer' is not 'label:KEY'"),
        (_minimal(sweep={"distribute": "ranks"}), "sweep.distribute: unknown value 'ranks'"),
        (_minimal(models=[{"name": "x"}]), "models[0].path: required key is missing"),
        (_minimal(models=[{"path": "sandbox-ar", "dtype": "fp16"}]), "models[0].dtype: unknown value 'fp16'"),
        (_minimal(models=[{"path": "x", "loader": "no_colon"}]), "models[0].loader: 'no_colon' is not"),
        (
            _minimal(tasks=[{"name": "a", "categories": ["arith"]}]),
            "tasks[0].categories[0]: unknown value 'arith' (did you mean 'arithmetic'?); allowed: direct",
        ),
        (_minimal(tasks=[{"name": "a", "form": "drawing"}]), "tasks[0].form: unknown value 'drawing'"),
        (_minimal(tasks=[{"name": "a", "capture": {"mode": "gen"}}]), "tasks[0].capture.mode: unknown value"),
        (_minimal(tasks=[{"categories": ["direct"]}]), "tasks[0].name: required key is missing"),
        (_minimal(tasks=[{"name": "a", "prompts": "p.jsonl", "form": "generation"}]), "tasks[0].form: only"),
        (_minimal(analyses=["probe"]), "analyses: 'probe' reads the run's activation store; add 'capture'"),
        (_minimal(analyses=["lens", "lens"]), "analyses: lens listed more than once"),
        (
            _minimal(tasks=[{"name": "p", "prompts": "p.jsonl"}], analyses=["gapeval"]),
            "analyses: 'gapeval' judge sandbox drawings",
        ),
        (
            _minimal(models=[{"path": "tiny-llama"}]),
            "models[0].path: 'tiny-llama' cannot read tasks[0] ('arith'): sandbox items",
        ),
        (
            _minimal(models=[{"path": "sandbox-ar"}, {"path": "sandbox-ar"}]),
            "models[1] × tasks[0]: run id 'sandbox-ar__arith' repeats models[0] × tasks[0]",
        ),
        (
            _minimal(
                tasks=[{"name": "a", "categories": ["mapping"], "patch": {"across": True}}],
                analyses=["patch"],
            ),
            "tasks[0].patch.across: needs arithmetic items",
        ),
        ([1, 2], "config: expected a mapping of keys"),
        ({"models": [{"path": "sandbox-ar"}]}, "tasks: required key is missing"),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_values(raw, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        _resolve(raw, tmp_path)
    assert str(err.value).startswith(message.split(" (did")[0].split(":")[0])
    assert message in str(err.value)


def test_defaults_overrides_and_run_ids(tmp_path):
    raw = _minimal(
        tasks=[
            {"name": "arith", "categories": ["arithmetic"], "limit": 4, "capture": {"roles": ["text"]}},
            {"name": "draw it", "categories": "arithmetic", "form": "generation", "analyses": ["capture"]},
        ],
        models=[{"path": "sandbox-ar"}, {"path": "sandbox-query", "name": "q"}],
        capture={"batch_size": 8},
    )
    cfg = _resolve(raw, tmp_path)
    assert [r["id"] for r in cfg.runs] == [
        "sandbox-ar__arith",
        "sandbox-ar__draw-it",
        "q__arith",
        "q__draw-it",
    ]
    first, second = cfg.runs[0], cfg.runs[1]
    assert first["capture"]["roles"] == ["text"] and first["capture"]["batch_size"] == 8
    assert second["capture"]["roles"] is None and second["capture"]["batch_size"] == 8
    assert first["analyses"] == ["capture", "probe"] and second["analyses"] == ["capture"]
    assert "probe" not in second and first["probe"]["label"] == "answer"
    assert first["task"]["suite_seed"] == 0 and first["task"]["form"] == "understanding"
    assert cfg.out == Path("artifacts/sweeps/sweep")


def test_set_overrides_edit_values_before_validation(tmp_path):
    raw = _minimal()
    assert (
        apply_override(raw, "models[0].path=/data/Janus-Pro-1B")["models"][0]["path"] == "/data/Janus-Pro-1B"
    )
    assert apply_override(raw, "capture.batch_size=4")["capture"] == {"batch_size": 4}
    assert apply_override(raw, "tasks[0].levels=[1, 2]")["tasks"][0]["levels"] == [1, 2]
    assert apply_override(raw, "models=[{path: sandbox-query}]")["models"] == [{"path": "sandbox-query"}]
    assert raw["models"][0]["path"] == "sandbox-ar"  # the original is not edited
    for bad, message in (
        ("models[3].path=x", "models[3] does not exist (the list has 1 items)"),
        ("capture", "expected KEY=VALUE"),
        ("models.path=x", "models.path is inside a value that is not a mapping"),
    ):
        with pytest.raises(
            ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
        ):
            apply_override(raw, bad)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_file, ["tasks[0].limit=3", "name=renamed"], out=str(tmp_path / "o"))
    assert cfg.runs[0]["task"]["limit"] == 3 and cfg.name == "renamed" and cfg.out == tmp_path / "o"
    with pytest.raises(ConfigError, match=r"tasks\[0\].limit: must be at least 1, got 0"):
        load_config(cfg_file, ["tasks[0].limit=0"])


def test_relative_files_are_read_from_the_config_folder(tmp_path):
    raw = {
        "models": [{"path": "tiny-llama", "adapter": "spec.yaml", "loader": "load.py:build"}],
        "tasks": [{"name": "p", "prompts": "data/p.jsonl"}],
        "analyses": ["capture"],
    }
    cfg = _resolve(raw, tmp_path)
    model, task = cfg.runs[0]["model"], cfg.runs[0]["task"]
    assert (
        model["adapter"] == str(tmp_path / "spec.yaml") and model["loader"] == f"{tmp_path / 'load.py'}:build"
    )
    assert task["prompts"] == str(tmp_path / "data" / "p.jsonl") and task["source"] == "prompts"
    problems = missing_files(cfg)
    assert [p.split(":")[0] for p in problems] == [
        "models[0].adapter",
        "models[0].loader",
        "tasks[0].prompts",
    ]


def test_cli_reports_a_bad_config_with_exit_status_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_minimal(analyses=["capture", "probes"])))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "uniprobe sweep: error: analyses[1]: unknown value 'probes'" in err and "allowed: capture" in err
    assert not (tmp_path / "o").exists()
    cfg.write_text("models: [\n")
    assert main(["sweep", str(cfg)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_plan_lists_runs_without_running(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_minimal()))
    assert main(["sweep", str(cfg), "--plan", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "sandbox-ar__arith" in out and "pending" in out and not (tmp_path / "o").exists()


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiments/configs here: the name resolves to the installed file
    cfg = load_config("unisandbox")
    assert cfg.source.name == "unisandbox.yaml" and cfg.source.is_file() and len(cfg.runs) == 9
    assert load_config("real/janus_pro_1b.yaml").name == "janus-pro-1b"
    with pytest.raises(FileNotFoundError, match="nor is it a shipped config: gapeval, r3, real/chameleon_7b"):
        load_config("unisandbx")
