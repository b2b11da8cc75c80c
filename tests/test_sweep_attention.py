"""Sweep analyses `attention` and `knockout`: files per prompt, headlines from the library, bad YAML named."""

from __future__ import annotations

import pytest
import yaml
from test_sweep import write_config
from uniprobe.experiments.sweep import ConfigError, load_config, run_sweep
from uniprobe.probes.attention.mass import MassTable
from uniprobe.probes.patching.results import PatchResult

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_and_knockout_analyses(tmp_path) -> None:
    path = write_config(
        tmp_path, analyses=["attention", "knockout"], attention={"n_prompts": 2, "key_roles": ["text"]},
        knockout={"keys": {"first": [0], "second": [1]}, "query": [-1], "foil": "t12"},
    )  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["models"] = raw["models"][:1]
    path.write_text(yaml.safe_dump(raw))
    entries = run_sweep(load_config(path, out=str(tmp_path / "out")))
    assert entries[0]["status"] == "done", entries[0]["error"]
    run = tmp_path / "out" / entries[0]["dir"]
    table = MassTable.load(run / "attention" / "prompt-1")
    assert table.key_roles == ["text"] and (run / "attention" / "prompt-0" / "attention.png").exists()
    res = PatchResult.load(run / "knockout" / "prompt-0")
    assert res.grid.columns == ["first", "second"] and res.metric.startswith("logit_diff")
    h = entries[0]["headline"]
    assert h["attention.prompts"] == 2 and h["knockout.key_group"] in ("first", "second")
    grid = res.as_grid(False)[0] - res.clean
    assert h["knockout.largest_change"] == pytest.approx(float(grid.flatten()[grid.abs().flatten().argmax()]))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"knockout": {"keys": {"a": ["text", 0]}}}, "knockout.keys.a: expected role names or positions"),
        ({"knockout": {"query": ["images"]}}, "images"),
        ({"attention": {"key_roles": ["txt"]}}, "attention.key_roles"),
    ],
)
def test_bad_sections_are_named(tmp_path, section, message) -> None:
    path = write_config(tmp_path, analyses=["attention", "knockout"], **section)
    with pytest.raises(ConfigError, match=message):
        load_config(path, out=str(tmp_path / "out"))
