"""The guides' code runs as written: every ```python block of a guide, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ["serve-your-own-model.md"]


@pytest.fixture
def adapters_restored():
    """The guide registers an adapter: leave the registry as the other tests expect it."""
    from uniprobe.hooks.adapters import ADAPTERS

    saved = dict(ADAPTERS)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(saved)


@pytest.mark.usefixtures("adapters_restored")
@pytest.mark.parametrize("guide", GUIDES)
def test_guide_code_blocks_run(guide: str, capsys: pytest.CaptureFixture) -> None:
    text = (DOCS / guide).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{guide} has no python blocks"
    namespace: dict = {"__name__": "guide"}
    for block in blocks:
        exec(compile(block, f"{guide}", "exec"), namespace)  # noqa: S102 - the guide's own code
    out = capsys.readouterr().out
    assert "my-research-model" in out and "torch.Size" in out
