"""pandas, an optional dependency: imported only by the ``to_pandas()`` methods that need it.

The toolkit never installs anything; without pandas those methods raise
:class:`~uniprobe.hooks.errors.MissingDependencyError` naming the install command.
"""

from __future__ import annotations

from typing import Any

from uniprobe.hooks.errors import MissingDependencyError


def import_pandas(what: str) -> Any:
    """The ``pandas`` module, or :class:`MissingDependencyError` saying ``what`` needs it."""
    try:
        import pandas
    except ImportError as err:
        raise MissingDependencyError(
            f"{what} needs pandas, an optional dependency that is not installed: pip install pandas "
            "(or read the plain lists / tensors: .rows, .values, .to_dict())"
        ) from err
    return pandas
