"""Reading a prompts file (JSON lines) into examples, with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.models import LoadedModel, encode

ALLOWED = ("id", "text", "input_ids", "labels", "meta", "roles", "pixel_values", "image_sizes")


class PromptFileError(ValueError):
    """A malformed line in a prompts file."""


def read_prompts(path: str | Path, loaded: LoadedModel) -> list[dict[str, Any]]:
    """One example per non-empty line: ``{"text": ...}`` or ``{"input_ids": [...]}``, plus optional
    ``id``, ``labels`` (``{key: value}``), ``meta``, ``roles`` (role name per token)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(item, dict):
            raise PromptFileError(f"{where}: each line must be a JSON object, got {type(item).__name__}")
        unknown = sorted(set(item) - set(ALLOWED))
        if unknown:
            raise PromptFileError(f"{where}: unknown keys {unknown}; allowed: {', '.join(ALLOWED)}")
        if ("text" in item) == ("input_ids" in item):
            raise PromptFileError(f"{where}: give exactly one of 'text' or 'input_ids'")
        if loaded.info.get("text_prompts"):
            if "text" not in item:
                raise PromptFileError(f"{where}: {loaded.spec} takes prompts as 'text', not 'input_ids'")
            item["prompt"] = item.pop("text")
            item.setdefault("id", str(n))
            examples.append(item)
            continue
        if "text" in item:
            try:
                item["input_ids"] = encode(loaded, item.pop("text"))
            except ValueError as err:
                raise PromptFileError(f"{where}: {err}") from err
        ids = item["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise PromptFileError(f"{where}: 'input_ids' must be a non-empty list of integers")
        if "labels" in item and not isinstance(item["labels"], dict):
            raise PromptFileError(f"{where}: 'labels' must be an object like {{\"answer\": 3}}")
        item.setdefault("id", str(n))
        examples.append(item)
    if not examples:
        raise PromptFileError(f"{path}: no prompts (the file is empty)")
    return examples
