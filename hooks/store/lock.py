"""The writer lock of an activation store: at most one writer (process) at a time.

``DIR/.uniprobe-writer.lock`` is created with ``O_CREAT | O_EXCL`` by
:meth:`ActivationStore.create <uniprobe.hooks.store.ActivationStore.create>` (new store, ``overwrite`` and
``resume`` alike) and removed when the writer finishes (``finalize()``), closes (``close()``, the
context manager, an error inside ``create``/``capture_dataset``) or is garbage-collected. The file
holds JSON: the holder's pid, host, process start time, the time it was taken, the command line and
a random token (so a writer only ever removes its own lock). It is not data: listings of shards, the
store's size and its summary ignore it; ``_wipe`` (``overwrite``) leaves the lock it holds.

**Why a lock file and not ``fcntl.flock``.** ``flock`` is released by the kernel when the holder dies
(no stale locks), but it is advisory per open file, invisible (no way to name the holder in an
error), and on NFS it is either emulated with byte-range locks or local to one client, so two
machines of a cluster could both "hold" it. Exclusive creation is atomic on local disks and on
NFSv3+, and the file says who holds it. The price is a stale file after a crash (``kill -9``, power
loss), which is recovered automatically when the holder is on this host and provably gone: its pid
is not running, is a zombie, or now belongs to a process that started at another time. A lock taken
on another host cannot be checked from here: it is refused, and the message says which file to
delete once the user is sure that writer is gone.

Breaking a stale lock renames it aside first and checks that what was moved is the stale lock that
was judged (not a fresh one another process took in between, which is put back), so two processes
recovering the same stale lock do not both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uniprobe.hooks.store.errors import StoreLockedError

LOCK_NAME = ".uniprobe-writer.lock"
_TRIES = 5
_HELD: dict[str, str] = {}  # lock file -> token, for locks this process holds (a live in-process writer)


def is_lock_name(name: str) -> bool:
    """Whether ``name`` is the lock file or a stale lock set aside while breaking it."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".stale.")


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    with contextlib.suppress(OSError, IndexError):
        text = Path(f"/proc/{pid}/stat").read_text()
        if text[text.rfind(")") + 2 :].split()[0] == "Z":  # a zombie writes nothing
            return False
    return True


def _read_holder(file: Path) -> dict[str, Any] | None:
    """The lock file's JSON; None if it vanished; ``{"unreadable": text}`` if it stays invalid."""
    text = ""
    for _ in range(20):  # a lock being created is empty for a moment
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        time.sleep(0.05)
    return {"unreadable": text[:200]}


def _stale_reason(file: Path, holder: dict[str, Any]) -> str | None:
    """Why ``holder`` provably no longer writes (same host only), or None if it may still."""
    pid, host = holder.get("pid"), holder.get("host")
    if "unreadable" in holder or not isinstance(pid, int) or host != socket.gethostname():
        return None
    if pid == os.getpid():
        if _HELD.get(str(file)) == holder.get("token"):
            return None  # another writer object of this very process
        return f"it was left by an earlier process with this process's pid {pid}"
    if not _alive(pid):
        return f"process {pid} on {host} is no longer running"
    started = holder.get("started")
    if started is not None and _start_time(pid) not in (None, started):
        return f"pid {pid} on {host} now belongs to another process"
    return None


def _held_message(directory: Path, file: Path, holder: dict[str, Any]) -> str:
    if "unreadable" in holder:
        return (
            f"the activation store {directory} has a writer lock {file} that cannot be read "
            f"({holder['unreadable']!r}); if no capture is writing this store, delete {file} and run again"
        )
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    if pid == os.getpid() and host == socket.gethostname():
        return (
            f"the activation store {directory} is already open for writing in this process (pid {pid}); "
            "two writers would corrupt it: finalize() or close() the other writer (or use "
            "`with ActivationStore.create(...) as store:`) before creating another"
        )
    cmd = holder.get("command") or "?"
    return (
        f"the activation store {directory} is being written by another process: pid {pid} on host "
        f"{host} (since {holder.get('created', '?')}, command: {cmd}) holds its writer lock {file}. "
        "Two writers would corrupt the store: wait for that capture to finish (add resume=True if it "
        "stopped early), stop it, or capture into a new directory. If you are sure no process writes "
        f"this store (e.g. the holder ran on another machine and died), delete {file}"
    )


def _break_stale(file: Path, holder: dict[str, Any]) -> bool:
    """Remove the stale lock ``holder``; False if the lock changed meanwhile (then try again)."""
    aside = file.with_name(f"{LOCK_NAME}.stale.{secrets.token_hex(4)}")
    try:
        os.rename(file, aside)
    except FileNotFoundError:  # another process broke it first
        return False
    moved = _read_holder(aside)
    if moved != holder:  # a fresh lock was taken between our read and the rename: give it back
        with contextlib.suppress(OSError):
            os.link(aside, file)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


@dataclass
class StoreLock:
    """The writer lock this process holds on one store directory.

    Attributes:
        file: ``DIR/.uniprobe-writer.lock``. token: random, written into the file. pid: the taker.
    """

    file: Path
    token: str
    pid: int
    released: bool = False

    @classmethod
    def acquire(cls, directory: Path) -> StoreLock:
        """Take the lock of ``directory`` (which must exist), recovering a stale one with a warning.

        Raises:
            StoreLockedError: a live writer (another process, another host, or another writer object
                of this process) holds it.
        """
        file = Path(directory) / LOCK_NAME
        token = secrets.token_hex(16)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _start_time(os.getpid()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
            "token": token,
        }
        for _ in range(_TRIES):
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = _read_holder(file)
                if holder is None:
                    continue  # released between our open and our read
                reason = _stale_reason(file, holder)
                if reason is None:
                    raise StoreLockedError(_held_message(Path(directory), file, holder)) from None
                if _break_stale(file, holder):
                    warnings.warn(
                        f"removed the stale writer lock of {directory} ({reason}; it was taken "
                        f"{holder.get('created', '?')}); that capture stopped without finishing, and this "
                        "one takes over",
                        stacklevel=4,
                    )
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            _HELD[str(file)] = token
            return cls(file, token, os.getpid())
        raise StoreLockedError(
            f"could not take the writer lock {file} of {directory} in {_TRIES} tries: other processes keep "
            "taking and releasing it; make sure only one capture writes this store"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent; a forked child never removes it)."""
        if self.released or os.getpid() != self.pid:
            return
        self.released = True
        if _HELD.get(str(self.file)) == self.token:
            del _HELD[str(self.file)]
        holder = _read_holder(self.file) if self.file.exists() else None
        if holder is not None and holder.get("token") == self.token:
            self.file.unlink(missing_ok=True)
        elif holder is not None:
            warnings.warn(
                f"the writer lock {self.file} was taken over by pid {holder.get('pid')} on "
                f"{holder.get('host')} while this writer held it; check the store with "
                "`uniprobe inspect --verify`",
                stacklevel=2,
            )
