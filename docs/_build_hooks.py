"""mkdocs hook: a folder of links that lays the installed namespace out for griffe.

hooks/, probes/, experiments/ install as uniprobe.hooks, uniprobe.probes, uniprobe.experiments
(setup.py package_dir), so no folder on disk is named uniprobe/hooks. griffe reads source statically
(nothing is imported), so it is given build/docs-src/uniprobe/ holding the public face's files and
links to the three folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "build" / "docs-src" / "uniprobe"


def on_startup(command, dirty, **kwargs):  # before mkdocstrings sets up its paths
    if SRC.exists():
        shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    for f in (ROOT / "uniprobe").glob("*.py"):
        (SRC / f.name).symlink_to(f)
    for name in ("hooks", "probes", "experiments"):
        (SRC / name).symlink_to(ROOT / name, target_is_directory=True)
