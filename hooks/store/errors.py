"""The errors and warnings of :mod:`uniprobe.hooks.store` (one small module, so the store's helper modules
can raise them without importing the store).

Every class subclasses one that ``uniprobe``'s command line already turns into a one-paragraph
message and exit status 2 (``ValueError``, ``FileExistsError`` or ``RuntimeError``).
"""

from __future__ import annotations

from uniprobe.hooks.errors import UniprobeError


class StoreExistsError(UniprobeError, FileExistsError):
    """A store already exists where a new one was to be created."""


class StoreCorruptError(UniprobeError, ValueError):
    """A store's manifest or shards are damaged or disagree with each other."""


class ResumeMismatchError(UniprobeError, ValueError):
    """A resumed capture differs from the capture that started the store (model, points, identity)."""


class MixedLabelTypesError(UniprobeError, ValueError):
    """One label key holds values of different JSON types (``0`` and ``"0"``) across examples."""


class EmptyCaptureError(UniprobeError, ValueError):
    """A capture stored no rows at some hook point (so probes could never read it)."""


class StoreLockedError(UniprobeError, RuntimeError):
    """Another writer (process) holds the store's writer lock."""


class StoreDiskFullError(UniprobeError, OSError, RuntimeError):
    """A write into a store ran out of disk space or quota (``ENOSPC`` / ``EDQUOT``).

    An ``OSError`` (``errno`` is set) and a ``RuntimeError`` (so the command line maps it to exit 2).
    """


class IncompleteStoreWarning(UserWarning):
    """Results were computed from a store whose capture is unfinished."""
