"""Small value checkers for the sweep config: each returns the normalised value or raises
:class:`ConfigError` naming the key path, the bad value and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

from uniprobe.hooks.errors import UniprobeError

Check = Callable[[Any, str], Any]


class ConfigError(UniprobeError, ValueError):
    """A sweep config that cannot run; the message starts with the offending key path."""


def near(name: str, choices: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` when ``name`` is close to one of ``choices``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: expected a non-empty string, got {value!r}")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def integer(lo: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if lo is not None and value < lo:
            raise ConfigError(f"{path}: must be at least {lo}, got {value}")
        return value

    return check


def number(lo: float, hi: float) -> Check:
    def check(value: Any, path: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo < value < hi:
            raise ConfigError(f"{path}: expected a number strictly between {lo} and {hi}, got {value!r}")
        return float(value)

    return check


def choice(allowed: Sequence[str]) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in allowed:
            raise ConfigError(
                f"{path}: unknown value {value!r}{near(value, allowed)}; allowed: {', '.join(allowed)}"
            )
        return value

    return check


def optional(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def list_of(inner: Check, min_len: int = 1, scalar_ok: bool = False) -> Check:
    """A list whose items pass ``inner``; ``scalar_ok``: a single item stands for a one-item list."""

    def check(value: Any, path: str) -> list:
        if scalar_ok and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(value) < min_len:
            raise ConfigError(f"{path}: needs at least {min_len} item(s)")
        return [inner(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return check


def token_spec(value: Any, path: str) -> str:
    """An answer / target token: a word (an int is the word of that number, ``3`` → ``"3"``) or
    ``"id:N"`` for token id ``N`` (its range is checked against the model when the run loads it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = string(value, path)
    if text.startswith("id:") and not text[3:].strip().isdigit():
        raise ConfigError(f"{path}: {value!r} is not a token id; write id:N with N an integer from 0")
    return text


def reduce_value(value: Any, path: str) -> str | int:
    if value in ("last", "first", "mean") or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: unknown value {value!r}; allowed: last, first, mean, or an integer position")


def mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {value!r}")
    return value


def anything(value: Any, path: str) -> Any:
    return value


def section(spec: dict[str, tuple[Check, Any]], value: Any, path: str) -> dict[str, Any]:
    """Check a mapping against ``spec`` (key → (checker, default)); unknown keys are errors.

    A default of :data:`REQUIRED` makes the key mandatory.
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {value!r}")
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in spec:
            raise ConfigError(
                f"{prefix}{key}: unknown key{near(key, list(spec))}; allowed: {', '.join(spec)}"
            )
    out = {}
    for key, (check, default) in spec.items():
        if key in value:
            out[key] = check(value[key], f"{prefix}{key}")
        elif default is REQUIRED:
            raise ConfigError(f"{prefix}{key}: required key is missing")
        else:
            out[key] = default
    return out


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
