"""An exclusive lock on a folder between processes and threads (two napari windows, napari and the CLI).

On POSIX the folder itself is locked with ``flock`` (no lock file to leave behind); where a folder
cannot be locked (some network file systems) a hidden ``.lock`` file inside it is locked instead, and
on Windows that file is locked with ``msvcrt``. The kernel releases the lock when its holder dies, so
a crashed writer never blocks the folder.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, os.PathLike]
LOCK_FILE = ".lock"


class LockTimeout(ValueError):
    """The folder stayed locked by another writer for longer than the timeout; the message names it."""


def _try_lock(fd: int) -> bool:
    """One non-blocking attempt; True when locked. Raises OSError when this fd cannot be locked at all."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _open_lock_file(folder: Path) -> int:
    return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)


@contextmanager
def folder_lock(folder: PathLike, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the ``with`` block.

    Args:
        folder: an existing folder.
        timeout_s: how long to wait for another holder before giving up.

    Raises:
        LockTimeout: the lock was not free within ``timeout_s``.
        OSError: the folder cannot be opened.
    """
    root = Path(folder)
    fd = -1
    if fcntl is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            locked = _try_lock(fd)
        except OSError:  # e.g. NFS emulates flock with byte-range locks that need a writable file
            os.close(fd)
            fd = _open_lock_file(root)
            locked = _try_lock(fd)
    else:
        fd = _open_lock_file(root)
        locked = _try_lock(fd)
    try:
        deadline = time.monotonic() + timeout_s
        while not locked:
            if time.monotonic() > deadline:
                raise LockTimeout(f"{root}: another program has held this folder's lock for more than "
                                  f"{timeout_s:.0f} s; try again when it has finished saving")
            time.sleep(0.02)
            locked = _try_lock(fd)
        yield
    finally:
        if locked and fcntl is None:
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)  # closing the descriptor releases a flock
