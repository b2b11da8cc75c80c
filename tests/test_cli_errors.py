"""How the ``uniprobe`` command reports errors: the toolkit's own errors and user-facing OS errors
in one line (exit 2), anything else as an internal error with its traceback (exit 70)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from uniprobe.experiments import patching
from uniprobe.experiments.cli import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, is_user_error, main
from uniprobe.hooks.errors import MissingDependencyError, UniprobeError, UsageError

import uniprobe

PATCH = ["patch", "--model", "tiny-llama", "--clean", "t1 t2", "--corrupted", "t1 t3"]
PATCH += ["--target", "t4", "--foil", "t5"]


def _fail_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def patch_pair(*args: object, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(patching, "patch_pair", patch_pair)


def test_toolkit_error_is_one_line(monkeypatch, tmp_path, capsys):
    _fail_with(monkeypatch, UsageError("the prompts do not line up\n  make them the same length"))
    assert main([*PATCH, "--out", str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "uniprobe patch: error: the prompts do not line up make them the same length\n"


@pytest.mark.parametrize(
    "exc", [TypeError("f() got an unexpected keyword"), AttributeError("x"), KeyError("k")]
)
def test_other_exceptions_are_internal_errors_with_traceback(monkeypatch, tmp_path, capsys, exc):
    _fail_with(monkeypatch, exc)
    assert main([*PATCH, "--out", str(tmp_path)]) == EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err.startswith("uniprobe patch: internal error (a bug in uniprobe, please report it):\n")
    assert "Traceback (most recent call last)" in err and type(exc).__name__ in err


def test_a_type_error_from_inside_a_library_call_is_internal(monkeypatch, tmp_path, capsys):
    def broken(loaded: object, *args: object, **kwargs: object) -> None:
        return len(loaded.spec, 2)  # a genuine TypeError, raised by the library's own code

    monkeypatch.setattr(patching, "patch_pair", broken)
    assert main([*PATCH, "--out", str(tmp_path)]) == EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "internal error" in err and "TypeError" in err and "in broken" in err


def test_missing_path_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("uniprobe inspect: error: ") and err.count("\n") == 1


def test_toolkit_errors_keep_their_builtin_bases():
    from uniprobe.experiments.sweep.schema import ConfigError
    from uniprobe.hooks.adapters import NoAdapterError
    from uniprobe.hooks.points import UnknownHookPointError
    from uniprobe.hooks.store.errors import StoreExistsError

    assert issubclass(UsageError, ValueError) and issubclass(MissingDependencyError, ImportError)
    assert issubclass(NoAdapterError, TypeError) and issubclass(UnknownHookPointError, KeyError)
    assert issubclass(StoreExistsError, FileExistsError) and issubclass(ConfigError, ValueError)
    for cls in (UsageError, NoAdapterError, UnknownHookPointError, StoreExistsError, ConfigError):
        assert issubclass(cls, UniprobeError) and is_user_error(cls("x"))
    assert not is_user_error(ValueError("x")) and not is_user_error(TypeError("x"))


def test_store_error_names_the_flag():
    from uniprobe.experiments.cli import one_line
    from uniprobe.hooks.store.errors import StoreExistsError

    assert one_line(StoreExistsError("pass resume=True to continue it")) == "pass --resume to continue it"
    assert one_line(StoreExistsError("pass resume=True (--resume)")) == "pass resume=True (--resume)"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"uniprobe {uniprobe.__version__}\n"


def _imports(module: str) -> set[str]:
    """The uniprobe modules a fresh interpreter has loaded after importing ``module``."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('uniprobe.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_no_import_circles():
    # the general model loader knows the sandbox; the sandbox's registry does not import the loader
    assert "uniprobe.experiments.models" not in _imports("uniprobe.experiments.sandbox.registry")
    # the command line calls the sweep; the sweep never imports the command line
    runner = _imports("uniprobe.experiments.sweep.runner") | _imports("uniprobe.experiments.sweep.analyses")
    assert not any(m.startswith("uniprobe.experiments.cli") for m in runner)
