"""Sandbox models as CLI model specs: ``--model sandbox-ar``, ``sandbox-query`` or a checkpoint folder.

Sandbox models take prompts as text (they build their own batches), so ``info["text_prompts"]``
is set and a prompts file line ``{"text": ...}`` becomes an example ``{"prompt": ...}``.
"""

from __future__ import annotations

from pathlib import Path

from uniprobe.experiments.models import LoadedModel
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


def load_dir(path: str | Path, verify: bool = True) -> LoadedModel:
    """Load a sandbox checkpoint folder (sha256-verified)."""
    model = load_sandbox(path, verify=verify)
    info = {"arch": model.arch, "text_prompts": True}
    return LoadedModel(model, adapter_for(model), _SandboxTokenizer(model.tokenizer), info, str(path))


def load_named(name: str) -> LoadedModel:
    """Load a shipped sandbox model by name."""
    loaded = load_dir(SANDBOX_MODELS[name])
    loaded.spec = name
    return loaded
