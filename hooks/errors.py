"""The toolkit's own errors: every error uniprobe raises on purpose about its input subclasses
:class:`UniprobeError`.

The ``uniprobe`` command turns a :class:`UniprobeError` into a one-line message (exit status 2);
any other exception is a bug and is shown as one, with its traceback. The concrete classes keep
their older builtin base too (``ValueError``, ``KeyError``, ``TypeError``, ...), so code that caught
those keeps working. This module imports nothing, so every layer (hooks, probes, experiments) can
use it.
"""

from __future__ import annotations


class UniprobeError(Exception):
    """Base class of the errors uniprobe raises about what it was given (inputs, files, settings)."""


class UsageError(UniprobeError, ValueError):
    """A value a user passed (an argument, an option, a prompt) that cannot be used as given."""


class MissingDependencyError(UniprobeError, ImportError):
    """An optional package a requested feature needs is not installed (uniprobe never installs it)."""
