"""Results of the fine-tuning protocols (knowledge injection, STARS) under the common result contract.

They stay dicts — the reports index them (``result["before"]["summary"]``) and callers read
``result["markdown"]`` — with :mod:`uniprobe.hooks.results_io`'s ``to_dict`` / ``save`` / ``load``.
Live entries (``markdown``, and STARS' fine-tuned ``model``) are not JSON: ``save`` writes the
Markdown beside the JSON and leaves the model out, ``load`` reads the JSON only.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, TypeVar

from uniprobe.hooks.jsonio import read_json, to_plain, write_json
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file

P = TypeVar("P", bound="ProtocolResult")


class ProtocolResult(dict):
    """A protocol's result dict; subclasses name their files (``NAME.json``, ``NAME.md``)."""

    NAME: ClassVar[str] = "result"
    LIVE: ClassVar[tuple[str, ...]] = ("markdown", "model")  # never written to JSON

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able entries, exactly as ``NAME.json`` holds them (objects it cannot convert → text,
        as the protocol writers always did)."""
        return to_plain({k: v for k, v in self.items() if k not in self.LIVE}, fallback=str)

    def save(self, out: str | os.PathLike) -> SavedFiles:
        """Write ``NAME.json`` (:meth:`to_dict`) and, when the result has its Markdown, ``NAME.md``."""
        out = result_dir(out)
        files = {"json": write_json(out / f"{self.NAME}.json", self.to_dict())}
        if "markdown" in self:
            files["md"] = out / f"{self.NAME}.md"
            files["md"].write_text(self["markdown"] + "\n")
        return SavedFiles(out, files)

    @classmethod
    def load(cls: type[P], out: str | os.PathLike) -> P:
        """Read ``NAME.json`` back (without the live entries)."""
        return cls(read_json(result_file(out, f"{cls.NAME}.json")))


class InjectResult(ProtocolResult):
    """:func:`uniprobe.experiments.seeds.inject.run_inject`'s result: ``model_arch``, ``settings``,
    ``characters``, ``before``, ``understanding``, ``generation`` (each ``{"after", "final_loss"}``),
    ``maps``; files ``inject.json`` / ``inject.md``."""

    NAME = "inject"


class StarsResult(ProtocolResult):
    """:func:`uniprobe.experiments.seeds.stars.run_stars`'s result: ``model_arch``, ``settings``,
    ``filter``, ``before``, ``after``, ``final_loss``, ``weight_change``, ``maps``; files
    ``stars.json`` / ``stars.md`` (the fine-tuned ``model`` is returned, not saved)."""

    NAME = "stars"
