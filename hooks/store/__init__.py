"""ActivationStore: captured activations on disk, as safetensors shards plus a JSON manifest.

    store = ActivationStore.open("artifacts/my-store")
    store.rows("blocks.1.resid_post", roles="text")        # Rows: values [n, d] + index columns
    store.matrix("blocks.1.resid_post", role="image_gen")  # one row per example [n_examples, d] + labels
    store.role_counts("blocks.1.resid_post")               # {"text": 120, "image_gen": 36}
    store.subset([0, 2, 5])                                # a read-only view of some examples

The package, one job a module:

- :mod:`.format`    the directory layout, the manifest's and shard headers' fields, schema versions,
  global example indices; what goes into a shard.
- :mod:`.integrity` manifest digest, shard headers vs manifest, sha256 / size / place checks
  (``verify="lazy" | "full" | "none"``), one JSON type per label key.
- :mod:`.writer`    ``create`` / ``write_shard`` / ``finalize`` / ``close``: one writer at a time
  (:mod:`.lock`), atomic writes and disk-full errors (:mod:`.files`).
- :mod:`.resume`    ``create(..., resume=True)``: continue exactly the capture that was started
  (:mod:`.identity`), rebuilding a lost or edited manifest from the shard headers.
- :mod:`.reader`    :class:`ActivationStore`: ``open``, metadata, ``rows``, ``matrix``, ``role_counts``,
  ``subset``.
- :mod:`.summary`   ``summary()`` (``uniprobe inspect``), ``size_on_disk()``, ``repr``.
- :mod:`.errors`    every error and warning (subclasses of what the CLI maps to exit status 2).

Error messages name the library's fixes (``resume=True``, ``overwrite=True``); a command line that
catches them names its own flags.
"""

from __future__ import annotations

from uniprobe.hooks.store.errors import (
    EmptyCaptureError,
    IncompleteStoreWarning,
    MixedLabelTypesError,
    ResumeMismatchError,
    StoreCorruptError,
    StoreDiskFullError,
    StoreExistsError,
    StoreLockedError,
)
from uniprobe.hooks.store.files import atomic_write, atomic_write_text, save_safetensors
from uniprobe.hooks.store.format import INDEX_COLUMNS, MANIFEST, SCHEMA_VERSION, VERIFY_MODES
from uniprobe.hooks.store.identity import capture_identity
from uniprobe.hooks.store.integrity import DIGEST_KEY, LabelTypes, manifest_digest
from uniprobe.hooks.store.lock import LOCK_NAME
from uniprobe.hooks.store.reader import ActivationStore, Matrix

__all__ = [
    "DIGEST_KEY",
    "INDEX_COLUMNS",
    "LOCK_NAME",
    "MANIFEST",
    "SCHEMA_VERSION",
    "VERIFY_MODES",
    "ActivationStore",
    "EmptyCaptureError",
    "IncompleteStoreWarning",
    "LabelTypes",
    "Matrix",
    "MixedLabelTypesError",
    "ResumeMismatchError",
    "StoreCorruptError",
    "StoreDiskFullError",
    "StoreExistsError",
    "StoreLockedError",
    "atomic_write",
    "atomic_write_text",
    "capture_identity",
    "manifest_digest",
    "save_safetensors",
]
