"""Sweep analysis `steer`: each pair's corrupted prompt steered along (clean − corrupted state) at points ×
alphas; files per pair, headline from the results (alpha 0 = the plain run), bad YAML named."""

from __future__ import annotations

import pytest
import yaml
from test_sweep import write_config
from uniprobe.experiments.sweep import ConfigError, load_config, run_sweep
from uniprobe.probes.attention import SteerResult

pytestmark = pytest.mark.usefixtures("one_thread")


def test_steer_analysis(tmp_path) -> None:
    path = write_config(tmp_path, analyses=["steer"], steer={"n_pairs": 1, "alphas": [0, 1], "role": "text"})
    raw = yaml.safe_load(path.read_text())
    raw["models"] = raw["models"][:1]
    path.write_text(yaml.safe_dump(raw))
    entries = run_sweep(load_config(path, out=str(tmp_path / "out")))
    assert entries[0]["status"] == "done", entries[0]["error"]
    res = SteerResult.load(tmp_path / "out" / entries[0]["dir"] / "steer" / "pair-0")
    assert res.points == ["blocks.0.resid_pre", "blocks.1.resid_pre"] and res.alphas == [0.0, 1.0]
    assert float((res.values[:, 0] - res.plain).abs().max()) <= 1e-5
    h = entries[0]["headline"]
    assert h["steer.pairs"] == 1 and h["steer.gain_max"] == pytest.approx(
        float((res.values - res.plain).max())
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [({"steer": {"alphas": ["big"]}}, r"steer.alphas\[0\]"), ({"steer": {"role": "txt"}}, "steer.role")],
)
def test_bad_steer_sections_are_named(tmp_path, section, message) -> None:
    path = write_config(tmp_path, analyses=["steer"], **section)
    with pytest.raises(ConfigError, match=message):
        load_config(path, out=str(tmp_path / "out"))
