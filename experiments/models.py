"""Model specs for the CLI: a built-in tiny model, a sandbox model, or a local transformers folder.

``load_model(spec)`` returns a :class:`LoadedModel` (model in eval mode, its adapter, a
tokenizer when one is known). Nothing is downloaded: a folder must hold the weights, and a
name that is neither a built-in nor an existing folder is an error listing the choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hooks.adapters import ADAPTERS, Adapter, adapter_for, load_adapter_file
from hooks.tiny import TINY_BUILDERS, build_tiny


@dataclass
class LoadedModel:
    """A model ready for capture: the module, its adapter, a tokenizer (or None), extra info."""

    model: nn.Module
    adapter: Adapter
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    spec: str = ""


def sandbox_names() -> list[str]:
    """Names of the shipped sandbox models (empty until the sandbox is installed)."""
    try:
        from experiments.sandbox.registry import SANDBOX_MODELS
    except ImportError:
        return []
    return list(SANDBOX_MODELS)


def builtin_names() -> list[str]:
    return list(TINY_BUILDERS) + sandbox_names()


def load_model(spec: str, adapter_file: str | None = None) -> LoadedModel:
    """Resolve ``spec``: a built-in tiny config, a sandbox name, or a local folder."""
    if spec in TINY_BUILDERS:
        model, info = build_tiny(spec)
        return LoadedModel(model, adapter_for(model), _tiny_tokenizer(info), info, spec)
    if spec in sandbox_names():
        from experiments.sandbox.registry import load_named

        return load_named(spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither a built-in ({', '.join(builtin_names())}) nor an existing folder. "
            "Pass a local transformers model folder (config.json + weights); nothing is downloaded."
        )
    return _load_folder(path, adapter_file)


def _load_folder(path: Path, adapter_file: str | None) -> LoadedModel:
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get("arch") in (
        "ar",
        "query",
    ):
        from experiments.sandbox.registry import load_dir

        return load_dir(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(
            f"{path}/config.json names architectures {archs or 'none'}, none of them a transformers class. "
            f"Supported families: {', '.join(ADAPTERS)}"
        )
    model = cls.from_pretrained(path).eval()
    adapter = load_adapter_file(adapter_file) if adapter_file else adapter_for(model)
    return LoadedModel(model, adapter, _folder_tokenizer(path), {}, str(path))


def _folder_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model folder, or None.

    A generic ``PreTrainedTokenizerFast`` (e.g. a word-level one built in code) is loaded as
    itself: ``AutoTokenizer`` would pick the model family's class from config.json and re-split it.
    """
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = path / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") or (
        declared is None and (path / "tokenizer.json").exists()
    ):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class WordTokenizer:
    """The tiny models' tokenizer: ``"t5 t6"`` ↔ ``[5, 6]`` (a word is ``t`` + its id)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not (word.startswith("t") and word[1:].isdigit() and int(word[1:]) < self.vocab_size):
                raise ValueError(f"tiny tokenizer: {word!r} is not a token t0..t{self.vocab_size - 1}")
            ids.append(int(word[1:]))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


def _tiny_tokenizer(info: dict[str, Any]) -> WordTokenizer:
    return WordTokenizer(int(info.get("vocab_size", 64)))


def encode(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer (error when the model has none)."""
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {loaded.spec!r} has no tokenizer: give 'input_ids' instead of 'text'")
    if callable(tok) and not isinstance(tok, WordTokenizer):
        return list(tok(text, add_special_tokens=True)["input_ids"])
    return tok.encode(text)
