"""Sandbox models as model specs: ``--model sandbox-ar``, ``sandbox-query`` or a checkpoint folder.

:func:`uniprobe.experiments.models.load_model` resolves those specs with :func:`sandbox_parts`; this
module never imports ``models`` (the dependency runs one way: the general loader knows the sandbox).

Sandbox models take prompts as text (they build their own batches), so ``info["text_prompts"]``
is set and a prompts file line ``{"text": ...}`` becomes an example ``{"prompt": ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniprobe.experiments.sandbox.checkpoint import SHIPPED, load_sandbox
from uniprobe.hooks.adapters import adapter_for

SANDBOX_MODELS: dict[str, Path] = dict(SHIPPED)


class _SandboxTokenizer:
    """The sandbox word tokenizer with the ``encode``/``decode`` interface the CLI uses."""

    def __init__(self, tok) -> None:  # noqa: ANN001 - uniprobe.experiments.tasks.vocab.WordTokenizer
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return [self.tok["<bos>"], *self.tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tok.decode(ids).split()


def sandbox_parts(
    path: str | Path, verify: bool = True
) -> tuple[Any, Any, _SandboxTokenizer, dict[str, Any]]:
    """A sandbox checkpoint folder (sha256-verified) as ``(model, adapter, tokenizer, info)``: the
    fields of a :class:`~uniprobe.experiments.models.LoadedModel` but its spec."""
    model = load_sandbox(path, verify=verify)
    info = {"arch": model.arch, "text_prompts": True}
    return model, adapter_for(model), _SandboxTokenizer(model.tokenizer), info
