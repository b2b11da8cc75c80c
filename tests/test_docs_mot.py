"""docs/mixture-of-transformers.md: its ```python blocks run as written, in order, and print what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "mixture-of-transformers.md"


def test_page_code_blocks_run(capsys: pytest.CaptureFixture) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {"__name__": "guide"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 - the page's own code
    out = capsys.readouterr().out
    assert "blocks.0.mlp_gen.out" in out and "blocks.0.attn_und.q" in out
    assert "{0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25}" in out
    assert "torch.Size([9, 32])" in out and "tensor(1.)" in out


def test_page_is_in_the_nav() -> None:
    nav = (PAGE.parents[1] / "mkdocs.yml").read_text()
    assert "mixture-of-transformers.md" in nav
