"""Reading a prompts file into examples, with errors that name the line and the fix.

The file is JSON Lines (https://jsonlines.org): UTF-8 text, one JSON value per line, a final
newline optional. Lines end at ``"\\n"`` only, and a ``"\\r"`` before it is dropped (Windows line
ends read the same). ``str.splitlines`` is not used: it also splits at U+2028, U+2029 and U+0085,
which JSON allows unescaped inside strings, so it would cut a valid line in two. Leniences beyond
JSON Lines: a UTF-8 byte order mark at the start of the file is skipped (Windows editors write
one), and blank lines (only spaces and tabs) are skipped. Constants JSON does not have (``NaN``,
``Infinity``) are errors.

Each line is an object: ``{"text": ...}`` or ``{"input_ids": [...]}``, plus optional ``id``,
``labels`` (``{key: value}``), ``meta`` (an object), ``roles`` (one role name per token).
:func:`parse_prompts` checks everything a model is not needed for; :func:`read_prompts` then
tokenizes and checks the ids against the model's vocabulary and positions.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uniprobe.experiments.models import LoadedModel, TokenLimits, encode, token_limits
from uniprobe.hooks.errors import UniprobeError
from uniprobe.hooks.layout import ROLES

ALLOWED = ("id", "text", "input_ids", "labels", "meta", "roles", "pixel_values", "image_sizes")
# "pad" marks the positions padding adds to a batch; a real token tagged so would vanish from analyses
LINE_ROLES = tuple(r for r in ROLES if r != "pad")
BOM = b"\xef\xbb\xbf"


class PromptFileError(UniprobeError, ValueError):
    """A malformed line in a prompts file."""


def read_prompts(path: str | Path, loaded: LoadedModel) -> list[dict[str, Any]]:
    """One example per non-blank line, checked against ``loaded`` (see the module docstring).

    Text is tokenized with the model's tokenizer (sandbox models take it as ``prompt``); token ids
    must be whole numbers in the model's vocabulary, no more than its positions, and a line's
    ``roles`` must name one known role per token. Raises :class:`PromptFileError` naming the line.
    """
    limits = token_limits(loaded)
    return [_for_model(item, where, loaded, limits) for where, item in parse_prompts(path)]


def parse_prompts(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, item)`` per non-blank line (``where`` is ``FILE:LINE``), checked without a model.

    Raises:
        FileNotFoundError: no such file.
        PromptFileError: a line that is not UTF-8 or not JSON, or an item with unknown keys or values
            of the wrong kind; also a file without prompts.
    """
    path = Path(path)
    items = []
    for n, text in _lines(path):
        where = f"{path}:{n}"
        item = _check_item(_parse_json(text, where), where)
        item.setdefault("id", str(n))
        items.append((where, item))
    if not items:
        raise PromptFileError(
            f"{path}: no prompts (the file is empty or blank); write one JSON object per line"
        )
    return items


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line."""
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise PromptFileError(f"{path} is not a file; --prompts takes a JSON-lines file")
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(
                f"{path}:{n}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if text.strip(" \t"):
            yield n, text


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"{where}: not valid JSON ({err.msg}, column {err.colno}); each line must be one JSON object"
        ) from None
    except _NotJSONError as err:
        raise PromptFileError(f"{where}: {err} is not JSON; write a number, or null") from None


class _NotJSONError(ValueError):
    pass


def _not_json(name: str) -> Any:
    raise _NotJSONError(name)


def _check_item(item: Any, where: str) -> dict[str, Any]:
    """The model-independent checks of one line's object."""
    if not isinstance(item, dict):
        raise PromptFileError(f"{where}: each line must be a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(ALLOWED))
    if unknown:
        raise PromptFileError(f"{where}: unknown keys {unknown}; allowed: {', '.join(ALLOWED)}")
    if ("text" in item) == ("input_ids" in item):
        raise PromptFileError(f"{where}: give exactly one of 'text' or 'input_ids'")
    if "text" in item and (not isinstance(item["text"], str) or not item["text"].strip()):
        raise PromptFileError(f"{where}: 'text' must be a non-empty string, got {json.dumps(item['text'])}")
    for key, example in (("labels", '{"answer": 3}'), ("meta", '{"source": "x"}')):
        if key in item and not isinstance(item[key], dict):
            raise PromptFileError(f"{where}: '{key}' must be an object like {example}")
    if "input_ids" in item:
        _check_ids(item["input_ids"], where)
    if "roles" in item:
        _check_role_names(item["roles"], where)
        if "input_ids" in item:
            _check_role_count(item["roles"], len(item["input_ids"]), where)
    return item


def _check_ids(ids: Any, where: str) -> None:
    if not isinstance(ids, list) or not ids:
        raise PromptFileError(f"{where}: 'input_ids' must be a non-empty list of integers, got {_show(ids)}")
    for k, i in enumerate(ids):
        # JSON true/false load as bool, which Python counts as int
        if isinstance(i, bool) or not isinstance(i, int):
            raise PromptFileError(
                f"{where}: input_ids[{k}] is {_show(i)}, not a token id; write whole numbers (3, not 3.0)"
            )
        if i < 0:
            raise PromptFileError(f"{where}: input_ids[{k}] is {i}; token ids start at 0")


def _check_role_names(roles: Any, where: str) -> None:
    if not isinstance(roles, list) or not roles:
        raise PromptFileError(
            f"{where}: 'roles' must be a list of role names, one per token, got {_show(roles)}"
        )
    for k, role in enumerate(roles):
        if role not in LINE_ROLES:
            close = difflib.get_close_matches(str(role), LINE_ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PromptFileError(
                f"{where}: roles[{k}] is {_show(role)}, not a role{hint}; roles: {', '.join(LINE_ROLES)}"
            )


def _check_role_count(roles: list, n_tokens: int, where: str) -> None:
    if len(roles) != n_tokens:
        raise PromptFileError(
            f"{where}: 'roles' has {len(roles)} entries but the prompt has {n_tokens} tokens; "
            "give one role per token"
        )


def _for_model(item: dict[str, Any], where: str, loaded: LoadedModel, limits: TokenLimits) -> dict[str, Any]:
    """The line as an example of ``loaded``: tokenized, its ids checked against the model."""
    if loaded.info.get("text_prompts"):
        return _text_prompt(item, where, loaded, limits)
    if "text" in item:
        try:
            item["input_ids"] = encode(loaded, item.pop("text"))
        except (ValueError, KeyError) as err:
            raise PromptFileError(f"{where}: {_reason(err)}") from None
        if not item["input_ids"]:
            raise PromptFileError(f"{where}: the text makes no tokens; write some words, or give 'input_ids'")
        if "roles" in item:
            _check_role_count(item["roles"], len(item["input_ids"]), where)
    _check_limits(item["input_ids"], where, loaded, limits)
    return item


def _text_prompt(
    item: dict[str, Any], where: str, loaded: LoadedModel, limits: TokenLimits
) -> dict[str, Any]:
    """Sandbox models build their own batches from text: the line keeps its text as ``prompt``."""
    if "text" not in item:
        raise PromptFileError(f"{where}: {loaded.spec} takes prompts as 'text', not 'input_ids'")
    if "roles" in item:
        raise PromptFileError(
            f"{where}: {loaded.spec} sets every position's role itself; drop 'roles' from the line"
        )
    if loaded.tokenizer is not None:  # tokenize only to check the words and the length
        try:
            ids = loaded.tokenizer.encode(item["text"])
        except (ValueError, KeyError) as err:
            raise PromptFileError(f"{where}: {_reason(err)}") from None
        _check_limits(ids, where, loaded, limits)
    item["prompt"] = item.pop("text")
    return item


def _check_limits(ids: list[int], where: str, loaded: LoadedModel, limits: TokenLimits) -> None:
    vocab, positions = limits.vocab_size, limits.max_positions
    if vocab is not None:
        for k, i in enumerate(ids):
            if i >= vocab:
                raise PromptFileError(
                    f"{where}: input_ids[{k}] is {i}, outside the vocabulary of {loaded.spec!r} "
                    f"(ids 0..{vocab - 1}); use token ids of this model's tokenizer"
                )
    if positions is not None and len(ids) > positions:
        raise PromptFileError(
            f"{where}: the prompt has {len(ids)} tokens, more than the {positions} positions "
            f"{loaded.spec!r} takes; shorten it or split it into several lines"
        )


def _reason(err: Exception) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _show(value: Any) -> str:
    """A value as it appears in the file (``true``, ``3.0``, ``"x"``)."""
    return json.dumps(value, ensure_ascii=False)
