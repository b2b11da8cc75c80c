"""Tests for uniprobe.hooks.guard: nothing installs at run time, also when TransformerLens boots a
multimodal model."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uniprobe.hooks.guard as guard
from transformer_lens.model_bridge.sources.transformers import helpers
from uniprobe.experiments.tiny import build_tiny
from uniprobe.hooks.adapters import adapter_for
from uniprobe.hooks.guard import RuntimeInstallError, disable_transformer_lens_installs, no_runtime_installs

# TransformerLens's own helper, taken at import (before any test neutralised it): it runs
# `pip install torchvision` when torchvision does not import
ORIGINAL_ENSURE_TORCHVISION = helpers._ensure_torchvision
SUBPROCESS_FUNCTIONS = ("check_call", "run", "call", "check_output", "Popen")
# absent here, which is what makes a multimodal boot dangerous: the helper would install it
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def installed() -> set[tuple[str, str]]:
    importlib.invalidate_caches()
    return {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()}


class Spawns:
    """Stands in for ``subprocess.Popen``: records every process start and refuses it."""

    def __init__(self) -> None:
        self.commands: list[Any] = []

    def __call__(self, cmd: Any, *args: Any, **kwargs: Any) -> Any:
        self.commands.append(cmd)
        raise OSError(f"test refused to start a process: {cmd!r}")


@pytest.fixture
def dangerous_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put TransformerLens's installing helper back (an earlier test may have replaced it)."""
    assert ORIGINAL_ENSURE_TORCHVISION.__module__ == helpers.__name__
    monkeypatch.setattr(helpers, "_ensure_torchvision", ORIGINAL_ENSURE_TORCHVISION)


def test_booting_emu3_through_transformer_lens_installs_nothing(
    dangerous_helper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniprobe.hooks.backends.tl_backend import bridge_for

    # safety net: if the guard failed, no process may start (and the test must see it)
    spawns = Spawns()
    monkeypatch.setattr(subprocess, "Popen", spawns)
    # count calls of the neutralised helper, to show the boot really reaches the install path
    reached: list[bool] = []
    real_disable = guard.disable_transformer_lens_installs

    def disable_and_count() -> None:
        real_disable()
        safe = helpers._ensure_torchvision
        assert safe is not ORIGINAL_ENSURE_TORCHVISION

        def counted() -> bool:
            result = safe()
            reached.append(result)
            return result

        monkeypatch.setattr(helpers, "_ensure_torchvision", counted)

    monkeypatch.setattr(guard, "disable_transformer_lens_installs", disable_and_count)

    functions = {fn: getattr(subprocess, fn) for fn in SUBPROCESS_FUNCTIONS}
    before = installed()
    model, _ = build_tiny("tiny-emu3")
    bridge = bridge_for(model, adapter_for(model))
    after = installed()

    assert type(bridge).__name__ == "TransformerBridge"
    # the modality-processor fallback asked for torchvision and got the non-installing answer
    assert reached == [HAS_TORCHVISION]
    assert spawns.commands == []
    assert before == after
    assert len(before) > 50  # the snapshot really lists the environment
    assert {fn: getattr(subprocess, fn) for fn in SUBPROCESS_FUNCTIONS} == functions  # restored


def test_no_runtime_installs_refuses_pip_without_running_it(monkeypatch: pytest.MonkeyPatch) -> None:
    spawns = Spawns()
    monkeypatch.setattr(subprocess, "Popen", spawns)
    with no_runtime_installs():
        with pytest.raises(RuntimeInstallError, match="refused to run .*pip.*install.*never installs"):
            subprocess.check_call([sys.executable, "-m", "pip", "install", "x"])
        for fn in ("run", "call", "check_output"):
            with pytest.raises(RuntimeInstallError):
                getattr(subprocess, fn)(["uv", "pip", "install", "torchvision", "-q"])
        with pytest.raises(RuntimeInstallError):
            subprocess.run("pip3 install --upgrade torch", shell=True)
        with pytest.raises(RuntimeInstallError):
            subprocess.check_call(["/usr/bin/conda", "install", "-y", "torchvision"])
    assert spawns.commands == []


def test_refused_command_has_no_effect(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # a python command that would leave a trace; "install" among its words makes it an install
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()", "install"]
    with no_runtime_installs(), pytest.raises(RuntimeInstallError):
        subprocess.run(cmd, check=True)
    assert not marker.exists()
    subprocess.run(cmd, check=True)  # outside the guard it runs: the marker is a real trace
    assert marker.exists()


def test_non_install_commands_still_work() -> None:
    with no_runtime_installs():
        out = subprocess.run(
            [sys.executable, "-c", "print('hello')"], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "hello"
        assert subprocess.check_output([sys.executable, "-c", "print(6 * 7)"], text=True).strip() == "42"
        assert subprocess.call([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
        assert subprocess.check_call([sys.executable, "-c", "pass"]) == 0
        # words that merely mention installing are fine without an installer
        echo = subprocess.run(["echo", "pip", "list"], capture_output=True, text=True, check=True)
        assert echo.stdout.strip() == "pip list"
        listed = subprocess.run([sys.executable, "-c", "print('install')"], capture_output=True, text=True)
        assert listed.stdout.strip() == "install"


def test_subprocess_functions_are_restored_also_after_an_error() -> None:
    saved = {fn: getattr(subprocess, fn) for fn in SUBPROCESS_FUNCTIONS}
    with no_runtime_installs():
        assert subprocess.check_call is not saved["check_call"]
        assert subprocess.run is not saved["run"]
    assert {fn: getattr(subprocess, fn) for fn in SUBPROCESS_FUNCTIONS} == saved
    with pytest.raises(KeyError), no_runtime_installs():
        raise KeyError("boom")
    assert {fn: getattr(subprocess, fn) for fn in SUBPROCESS_FUNCTIONS} == saved


def test_disable_transformer_lens_installs_neutralises_the_helper(
    dangerous_helper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[Any] = []

    def fail(*args: Any, **kwargs: Any) -> None:
        called.append(args)
        pytest.fail(f"subprocess called: {args!r}")

    for fn in SUBPROCESS_FUNCTIONS:
        monkeypatch.setattr(subprocess, fn, fail)
    monkeypatch.setattr("shutil.which", lambda name: None)
    disable_transformer_lens_installs()
    assert helpers._ensure_torchvision is not ORIGINAL_ENSURE_TORCHVISION
    assert helpers._ensure_torchvision() is HAS_TORCHVISION  # reported, never installed
    assert called == []


def test_the_original_helper_would_have_installed(
    dangerous_helper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the test above: without the guard, the helper does reach for pip."""
    calls: list[Any] = []

    def record(cmd: Any, *args: Any, **kwargs: Any) -> int:
        calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd)  # never actually run it

    if HAS_TORCHVISION:
        pytest.skip("torchvision imports here, so the helper has nothing to install")
    monkeypatch.setattr(subprocess, "check_call", record)
    assert helpers._ensure_torchvision() is False
    assert len(calls) == 1 and "install" in calls[0] and "torchvision" in calls[0]


def test_no_runtime_installs_also_refuses_popen_and_os_system():
    import os
    import subprocess
    import sys

    from uniprobe.hooks.guard import RuntimeInstallError, no_runtime_installs

    before_popen, before_system = subprocess.Popen, os.system
    with no_runtime_installs():
        with pytest.raises(RuntimeInstallError):
            subprocess.Popen([sys.executable, "-m", "pip", "install", "torchvision"])
        with pytest.raises(RuntimeInstallError):
            os.system("pip install torchvision")
        proc = subprocess.Popen([sys.executable, "-c", "print(1)"], stdout=subprocess.PIPE)
        assert proc.communicate()[0].strip() == b"1"
        assert isinstance(proc, before_popen)
    assert subprocess.Popen is before_popen and os.system is before_system
