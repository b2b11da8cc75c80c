"""The committed multi-seed and latent-CoT tables are what their committed JSON gives.

README, RESULTS.md and HELDOUT.md quote these markdown tables; the JSON beside each is the record. A
table edited by hand, or a JSON rewritten without its table, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from uniprobe.experiments.sandbox.latent_cot import attention_lines, latent_cot_table
from uniprobe.experiments.sandbox.multiseed import format_seed_table

SANDBOX = Path(__file__).resolve().parents[1] / "artifacts" / "sandbox"
LATENT = sorted(p.parent for p in SANDBOX.glob("latent-cot*/latent-cot.json"))
SEEDS = sorted(p.parent for p in SANDBOX.glob("seeds-*/seeds.json"))


def test_the_committed_folders_are_found() -> None:
    assert {p.name for p in LATENT} >= {"latent-cot", "latent-cot-chains"}
    assert {p.name for p in SEEDS} >= {"seeds-ar", "seeds-query", "seeds-mot", "seeds-ar-staged"}


@pytest.mark.parametrize("folder", LATENT, ids=lambda p: p.name)
def test_latent_cot_md_is_its_json(folder: Path) -> None:
    groups = json.loads((folder / "latent-cot.json").read_text())
    md = (folder / "latent-cot.md").read_text()
    table = latent_cot_table(groups)
    assert md in (table, table + "\n" + attention_lines(groups))  # the first runs had no attention lines
    for runs in groups.values():  # each run names its checkpoint and its three levels
        assert all(r["checkpoint"] and {"L1", "L2", "L3"} <= set(r["rates"]) for r in runs)


@pytest.mark.parametrize("folder", SEEDS, ids=lambda p: p.name)
def test_seeds_md_is_its_json(folder: Path) -> None:
    summary = json.loads((folder / "seeds.json").read_text())
    md = (folder / "seeds.md").read_text()
    assert md == format_seed_table(summary, title=f"sandbox-{summary['arch']} over seeds")
    assert [r["seed"] for r in summary["runs"]] == summary["seeds"]
