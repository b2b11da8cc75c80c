"""Progress bars for the steps that take more than a few seconds (evaluation, STARS, R3, the demo).

One rule for every bar: ``tqdm.auto`` on stderr (stdout stays the command's result), off when the
caller passes ``progress=False`` or ``TQDM_DISABLE`` is set (to anything but ``0``/``false``), and
sparse in logs: at most one refresh a second, one every 30 s under ``CI=true``, so a CI log gets a
few lines per bar rather than thousands.

    for chunk in bar(chunks, desc="understand", unit="batch", progress=progress): ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

_OFF = ("", "0", "false", "no")


def progress_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _OFF


def refresh_seconds() -> float:
    """Least seconds between two redraws of a bar: 30 under CI (logs keep every redraw), else 1."""
    return 30.0 if os.environ.get("CI", "").strip().lower() not in _OFF else 1.0


def bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm`` over ``iterable`` (or with ``total=``), or a disabled one.

    A disabled bar still iterates and accepts ``update`` / ``set_postfix``, so callers never branch.
    """
    from tqdm.auto import tqdm  # here, not at import: the CLI's parser must not pay for it

    kwargs.setdefault("mininterval", refresh_seconds())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", None)  # a finished bar stays only at the top level, not inside the demo's
    return tqdm(iterable, file=sys.stderr, disable=not progress or progress_disabled(), **kwargs)


def chunks(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive chunks of ``size`` (the last may be shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]
