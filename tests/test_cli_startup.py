"""`uniprobe --help` and `uniprobe CMD --help` start without importing torch, transformers or matplotlib
(they took seconds: the parser's choices came from modules that import torch); the choices the
parser offers agree with the library's; Ctrl-C says what each command kept; progress bars obey
``progress=False``, ``TQDM_DISABLE`` and ``CI``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from uniprobe.experiments.cli import build_parser, on_interrupt
from uniprobe.experiments.cli._choices import (
    DTYPE_NAMES,
    PATCH_ALIGNS,
    PATCH_DIRECTIONS,
    PATCH_KINDS,
    PATCH_METHODS,
    ROLES,
)
from uniprobe.experiments.progress import bar, chunks, refresh_seconds

HEAVY = ("torch", "transformers", "matplotlib", "numpy", "safetensors", "tqdm")

# in a fresh interpreter: the parser, then `--help` of the command and of every subcommand
_SCRIPT = """
import contextlib, io, json, sys
from uniprobe.experiments.cli import build_parser, main
parser = build_parser()
sub = next(a for a in parser._actions if a.choices and a.dest == "command")
helped = []
for argv in [["--help"]] + [[name, "--help"] for name in sub.choices]:
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: uniprobe" in text.getvalue(), argv
    helped.append(argv[0])
heavy = sorted(m for m in %r if m in sys.modules)
print(json.dumps({"helped": helped, "heavy": heavy}))
"""


def test_help_of_every_command_imports_no_heavy_library():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT % (HEAVY,)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    commands = {"--help", "demo", "capture", "probe", "lens", "patch", "gap", "seeds", "sweep"}
    assert commands <= set(got["helped"])
    assert got["heavy"] == [], f"`uniprobe --help` imported {got['heavy']}: import them inside the handlers"


def test_choices_agree_with_the_library():
    from uniprobe.experiments.cli._choices import SANDBOX_CHAINS
    from uniprobe.experiments.patching import ALIGNS, DIRECTIONS, METHODS
    from uniprobe.experiments.sandbox.staged import CHAINS
    from uniprobe.hooks.dtypes import DTYPES
    from uniprobe.hooks.layout import ROLES as LAYOUT_ROLES
    from uniprobe.probes.patching.sites import HEAD_KINDS, KINDS

    assert ROLES == LAYOUT_ROLES and DTYPE_NAMES == tuple(DTYPES)
    assert (PATCH_KINDS, PATCH_METHODS) == (KINDS + HEAD_KINDS, METHODS)
    assert (PATCH_DIRECTIONS, PATCH_ALIGNS) == (DIRECTIONS, ALIGNS)
    assert SANDBOX_CHAINS == tuple(sorted(CHAINS))
    store_dtype = build_parser()._subparsers._group_actions[0].choices["capture"]._option_string_actions
    assert tuple(store_dtype["--dtype"].choices) == tuple(DTYPES)


def test_interrupt_message_says_what_each_command_kept():
    assert "--resume" in on_interrupt("capture")
    assert "same --out" in on_interrupt("demo") and "kept" in on_interrupt("demo")
    assert "kept" in on_interrupt("sweep") and "again" in on_interrupt("sweep")
    for command in ("train-sandbox", "gap", "seeds", "probe", "lens", "patch"):
        assert "starts it over" in on_interrupt(command)


def test_bars_obey_progress_tqdm_disable_and_ci(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not bar(total=3).disable and bar(total=3).mininterval == 1.0
    assert bar(total=3, progress=False).disable
    assert list(bar(range(3), progress=False)) == [0, 1, 2]  # a disabled bar still iterates
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar(total=3).disable
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not bar(total=3).disable
    monkeypatch.setenv("CI", "true")
    assert refresh_seconds() == 30.0 and bar(total=3).mininterval == 30.0


@pytest.mark.parametrize(("n", "size", "lengths"), [(0, 4, []), (5, 2, [2, 2, 1]), (4, 4, [4])])
def test_chunks_cover_the_range_in_order(n, size, lengths):
    parts = chunks(n, size)
    assert [len(p) for p in parts] == lengths and [k for p in parts for k in p] == list(range(n))
