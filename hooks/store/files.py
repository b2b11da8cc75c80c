"""Writing files the way a store needs them: atomically, readable by whoever the user's umask allows,
with a clear error when the disk is full — and never reading a file outside the store's directory.

Every artifact that is written through a temp file and a rename (store shards and manifest, probe
directions, tuned lenses, sweep indices) goes through :func:`atomic_write`:

* the temp file is created next to the target with ``O_CREAT | O_EXCL`` and mode ``0o666``, so the
  kernel applies the umask (and any default ACL) exactly as for a plain ``open(path, "w")``; that
  mode is restored after the writer ran, because writers such as safetensors' ``save_file`` replace
  the file with a private (``0600``) one — lab-mates on a shared cluster could not read the shards;
* data and directory are fsynced, then ``os.replace`` puts the file in place: readers see the old
  file or the whole new one;
* on any failure the temp file is removed; running out of space or quota (``ENOSPC``/``EDQUOT``,
  also when a Rust writer reports it as "os error 28") raises :class:`StoreDiskFullError` naming
  the file, the bytes needed and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from uniprobe.hooks.store.errors import StoreDiskFullError

TMP_MARK = ".tmp."
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how Rust writers (safetensors) spell ENOSPC / EDQUOT in their messages
_FULL_TEXT = ("os error 28", "os error 122", "No space left on device", "Disk quota exceeded", "StorageFull")

T = TypeVar("T")


def human_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KB"``."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file of :func:`atomic_write` (``.NAME.tmp.PID.RANDOM``)."""
    return name.startswith(".") and TMP_MARK in name


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (not every platform can open a directory; then skip)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the user's quota) is full."""
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err)
    return any(t in text for t in _FULL_TEXT)


def disk_full_error(
    path: Path, err: BaseException, *, what: str, needed: int, fix: str
) -> StoreDiskFullError:
    """The error for a write of ``what`` (``needed`` bytes) to ``path`` that hit a full disk."""
    try:
        free = human_bytes(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    text = str(err)
    quota = (isinstance(err, OSError) and err.errno == errno.EDQUOT) or (
        "os error 122" in text or "Disk quota exceeded" in text
    )
    cause = "the disk quota is exceeded" if quota else "no space left on the device"
    code = errno.EDQUOT if quota else errno.ENOSPC
    return StoreDiskFullError(
        code,
        f"cannot write {what} ({path}): {cause}; it needs about {human_bytes(needed)}, free on that "
        f"disk: {free} (a quota may allow less). Nothing partial was left behind. "
        f"Free some space (or write to another disk), then {fix}",
    )


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    what: str | None = None,
    needed: int = 0,
    fix: str = "re-run the command",
    inspect: Callable[[Path], T] | None = None,
) -> T | None:
    """Write ``path`` through a temp file beside it; readers never see a partial file.

    Args:
        write: writes the whole content to the temp path it is given (it may replace the file).
        what / needed / fix: for the disk-full error: what is written, about how many bytes, and
            what the user does after freeing space.
        inspect: called on the finished temp file before the rename (e.g. to hash it); its result
            is returned.

    Raises:
        StoreDiskFullError: out of space or quota; the temp file is gone.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}")
    try:
        # O_EXCL + 0o666: the kernel applies the umask (and default ACLs) as for any new file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)  # save_file replaces the file with a 0600 one; give it the umask's mode
        _fsync_file(tmp)
        result = inspect(tmp) if inspect is not None else None
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path, err, what=what or str(path), needed=needed, fix=fix) from err
        raise
    fsync_dir(path.parent)
    return result


def atomic_write_text(
    path: Path, text: str, *, what: str | None = None, fix: str = "re-run the command"
) -> None:
    """Write ``text`` (UTF-8) so readers see the old file or the whole new one, never a part."""
    data = text.encode("utf-8")
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data), what=what, needed=len(data), fix=fix)


def save_safetensors(
    path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None, *, what: str | None = None
) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_write` (umask mode, disk-full error)."""
    from safetensors.torch import save_file

    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(
        Path(path),
        lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
        what=what,
        needed=needed,
    )


def inside(directory: Path, file: Path) -> bool:
    """Whether ``file`` (following symbolic links) lies directly in ``directory`` (also resolved)."""
    try:
        return Path(os.path.realpath(file)).parent == Path(os.path.realpath(directory))
    except (OSError, ValueError):
        return False
