"""The analysis pages (docs/analyses/*.md): their python examples run as written, their figures exist
and stay small, and docs/make_figures.py, which makes those figures from the toolkit, still runs.

The pages' ```bash blocks are the README's `uniprobe gap` / `uniprobe seeds` commands, which
tests/test_readme.py runs (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["capture.md", "probes.md", "lens.md", "patching.md", "protocols.md"]  # in the order they build on
FIGURES = [
    "capture.png", "probe_map.png", "lens_map.png", "patch_heatmap.png", "patch_attribution.png",
    "gap_table.png", "gapeval.png",
]  # fmt: skip
MAX_BYTES = 150 * 1024


def _env() -> dict[str, str]:
    return dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1")


@pytest.mark.slow  # five processes loading torch and a sandbox model: ~40 s of CPU
def test_analysis_pages_examples_run_in_order(tmp_path: Path) -> None:
    """Each page's python blocks run in a fresh process, in a folder outside the repository; the probes
    page reads the store the capture page wrote."""
    for page in PAGES:
        blocks = re.findall(r"```python\n(.*?)```", (DOCS / "analyses" / page).read_text(), flags=re.S)
        assert blocks, f"{page} has no python example"
        for block in blocks:
            done = subprocess.run(
                [sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, f"{page}:\n{block}\n{done.stderr[-3000:]}"
            assert done.stdout.strip(), f"{page}: the example printed nothing"
    assert (tmp_path / "probe-run" / "probe_map.png").exists()


def test_every_page_figure_exists_is_small_and_is_shown() -> None:
    shown = set()
    for page in PAGES:
        shown |= set(re.findall(r"\]\(\.\./figures/([\w.-]+\.png)\)", (DOCS / "analyses" / page).read_text()))
    assert shown == set(FIGURES)
    for name in FIGURES:
        png = DOCS / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size < MAX_BYTES, f"{name}: {png.stat().st_size} bytes"
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    assert all(f"analyses/{page}" in nav for page in PAGES)


@pytest.mark.slow
def test_make_figures_script_runs(tmp_path: Path) -> None:
    """About 30 s of CPU; writes into a scratch folder, never over the committed figures."""
    done = subprocess.run(
        [sys.executable, str(DOCS / "make_figures.py"), "--out", str(tmp_path / "fig"), "--work",
         str(tmp_path / "work"), "--per-category", "2"],
        env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in FIGURES:
        png = tmp_path / "fig" / name
        assert png.exists() and png.stat().st_size < MAX_BYTES, name
