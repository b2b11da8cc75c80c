"""The contract every result object keeps: ``to_dict()``, ``save(dir)``, ``load(dir)``.

Probe results, lens results, tuned lenses, patching results and the seed protocols' results
(GapEval, R3, knowledge injection, STARS) all read and write the same way:

* ``to_dict()`` → plain JSON data (dicts, lists, str, numbers, None): what the result's JSON file holds.
* ``save(dir)`` writes the result's files into the folder ``dir`` (created if needed): JSON through
  :mod:`uniprobe.hooks.jsonio`, tensors as safetensors (never pickle), figures where the type
  draws them. It returns :class:`SavedFiles`: name → path of every file written, ``.dir`` the folder.
* ``ResultType.load(dir)`` reads those files back into an equal result (same values, same tensors;
  figures, Markdown and live objects such as a fine-tuned model are not read back).

Nothing here imports probes or experiments: the contract sits in the lowest layer so all can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

R = TypeVar("R", bound="ResultIO")


class SavedFiles(dict[str, Path]):
    """What ``save(dir)`` wrote: ``{"json": dir / "r3.json", ...}``; ``.dir`` is the folder."""

    def __init__(self, directory: str | os.PathLike, files: dict[str, Path] | None = None) -> None:
        super().__init__(files or {})
        self.dir = Path(directory)

    def __repr__(self) -> str:
        return f"SavedFiles({str(self.dir)!r}, {dict(self)!r})"


@runtime_checkable
class ResultIO(Protocol):
    """A result that saves to and loads from a folder (see the module docstring)."""

    def to_dict(self) -> dict:
        """Plain JSON data: what the result's JSON file holds."""
        ...

    def save(self, out: str | os.PathLike) -> SavedFiles:
        """Write the result's files into the folder ``out``; returns the files written."""
        ...

    @classmethod
    def load(cls: type[R], out: str | os.PathLike) -> R:
        """Read what :meth:`save` wrote in ``out``."""
        ...


def result_dir(out: str | os.PathLike) -> Path:
    """The folder a result is saved into (created, with its parents)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def result_file(out: str | os.PathLike, name: str) -> Path:
    """``out / name`` of a saved result, or a FileNotFoundError saying which result is missing."""
    path = Path(out) / name
    if not path.exists():
        where = "no such folder" if not Path(out).is_dir() else f"no {name} in it"
        raise FileNotFoundError(f"cannot load a result from {out}: {where} (was it written by save()?)")
    return path
