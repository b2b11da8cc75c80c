"""Markdown report → one self-contained-looking HTML page (figures stay beside it as PNG files).

The Markdown is rendered by markdown-it-py (CommonMark + tables); only the page wrapper is here.
"""

from __future__ import annotations

import html
from pathlib import Path

from markdown_it import MarkdownIt

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; }
th { background: #f3f3f3; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def render_html(markdown: str, title: str = "report") -> str:
    """The HTML page of ``markdown`` (image links are kept relative)."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


def write_html(markdown: str, path: str | Path, title: str = "report") -> Path:
    """Write :func:`render_html` to ``path`` and return it."""
    path = Path(path)
    path.write_text(render_html(markdown, title))
    return path
