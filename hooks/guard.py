"""Nothing installs at run time.

TransformerLens 4.x, when it boots a multimodal model, may call its helper
``_ensure_torchvision``, which runs ``pip install torchvision`` — on this kind of machine that
replaces the CPU torch with a multi-GB CUDA build. :func:`no_runtime_installs` neutralises the
helper and refuses any subprocess that would run a package installer while it is active.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import Any

from uniprobe.hooks.errors import UniprobeError

_INSTALLERS = ("pip", "pip3", "uv", "conda", "mamba")


class RuntimeInstallError(UniprobeError, RuntimeError):
    """Something tried to install a package while uniprobe was running."""


def _is_install(cmd: Any) -> bool:
    words = (
        cmd.split()
        if isinstance(cmd, str)
        else [str(c) for c in cmd]
        if isinstance(cmd, (list, tuple))
        else []
    )
    names = [w.rsplit("/", 1)[-1] for w in words]
    return "install" in names and any(n in _INSTALLERS or n.startswith("python") for n in names)


def _refuse(original: Any) -> Any:
    def wrapper(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_install(cmd):
            raise RuntimeInstallError(
                f"refused to run {cmd!r}: uniprobe never installs packages at run time. "
                "Install what you need yourself, in your environment, before running."
            )
        return original(cmd, *args, **kwargs)

    return wrapper


def disable_transformer_lens_installs() -> None:
    """Replace TransformerLens's ``_ensure_torchvision`` by an import check that never installs."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:
        return

    def ensure_torchvision_without_installing() -> bool:
        try:
            import torchvision  # noqa: F401
        except Exception:
            return False
        return True

    helpers._ensure_torchvision = ensure_torchvision_without_installing


@contextlib.contextmanager
def no_runtime_installs() -> Iterator[None]:
    """Within the block, installer subprocesses raise :class:`RuntimeInstallError`."""
    disable_transformer_lens_installs()
    saved = {
        name: getattr(subprocess, name) for name in ("check_call", "run", "call", "check_output", "Popen")
    }
    saved_system = os.system
    original_popen = saved["Popen"]

    refusing_popen: Any = _refuse(original_popen)
    if isinstance(original_popen, type):  # keep Popen a class, so isinstance checks elsewhere still work

        class RefusingPopen(original_popen):  # type: ignore[misc, valid-type]
            def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
                if _is_install(args):
                    _refuse(None)(args)
                super().__init__(args, *rest, **kwargs)

        refusing_popen = RefusingPopen

    try:
        for name, fn in saved.items():
            setattr(subprocess, name, refusing_popen if name == "Popen" else _refuse(fn))
        os.system = _refuse(saved_system)
        yield
    finally:
        for name, fn in saved.items():
            setattr(subprocess, name, fn)
        os.system = saved_system
