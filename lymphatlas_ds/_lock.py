"""One writer at a time: an OS-level lock on a folder the project writes (WORK, a release, a mirror).

``folder_lock(path, what=..., wait=False)`` takes an exclusive ``fcntl.flock`` on a lock file and
writes the holder's PID and command line into it. A second process is refused at once with a
:class:`LockedError` that names the holder (PID, command, since when) and what to do, or, with
``wait=True``, blocks until the holder is done. The kernel drops the lock when the holder's process
ends, however it ends (kill -9 included): a stale lock file never blocks anyone, so there is no
clean-up to do and no PID to guess about.

Locks are re-entrant within one process (convert writes its QC report under the WORK lock it holds).

Example:
    >>> with folder_lock(work / ".lock", what=f"WORK folder {work}"):  # doctest: +SKIP
    ...     convert(...)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lymphatlas_ds.errors import LymphAtlasError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's msvcrt lock, no holder details
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
"""The lock file of a WORK folder or a mirror (hidden: never copied, listed or published)."""

_held: dict[str, int] = {}
_guard = threading.Lock()


class LockedError(LymphAtlasError):
    """Another process holds the lock of the folder this command writes."""


class LockError(LymphAtlasError):
    """The lock file cannot be created or written (a full disk, a read-only folder): nothing was done."""


def holder(lock_file: str | Path) -> str:
    """What the lock file says about its holder ("PID 123 (python -m builder convert ...) since ...")."""
    try:
        text = Path(lock_file).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its details yet"


def _describe_self() -> str:
    argv = list(sys.argv) if sys.argv and sys.argv[0] else []
    if argv and Path(argv[0]).name == "__main__.py":  # `python -m builder`: argv[0] is the module's file
        argv[0] = f"-m {Path(argv[0]).parent.name}"
    command = " ".join([Path(sys.executable).name, *argv])
    since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"PID {os.getpid()} ({command}) since {since}"


@contextlib.contextmanager
def folder_lock(lock_file: str | Path, *, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_file`` for the ``with`` block; refuse (or wait) if held.

    ``what`` names the protected thing in the refusal ("WORK folder work"). The lock file's
    folder is created. Re-entrant in one process.
    """
    path = Path(lock_file)
    key = str(path.resolve())
    if _reenter(key):
        try:
            yield path
        finally:
            with _guard:
                _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    hold = _flock if fcntl is not None else _filelock
    with hold(path, key, what=what, wait=wait):
        yield path


def _reenter(key: str) -> bool:
    """Count one more hold of a lock this process holds already; False when it does not hold it."""
    with _guard:
        if _held.get(key):
            _held[key] += 1
            return True
    return False


@contextlib.contextmanager
def _flock(path: Path, key: str, *, what: str, wait: bool) -> Iterator[None]:
    """Hold the kernel's exclusive ``flock`` on ``path``, with this process's details written into the file."""
    # O_RDWR without O_TRUNC: opening must not wipe the holder's details before we own the lock.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _cannot_lock(path, what, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(
                f"{what} is in use: {holder(path)} holds {path}. One writer at a time: wait for it to finish "
                "and run again, or pass --wait to queue behind it"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_describe_self() + "\n").encode("utf-8"), 0)
        except OSError as e:  # a full disk: the lock is ours but its holder's details cannot be written
            raise _cannot_lock(path, what, e) from None
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the lock file stays (removing it would race a waiter); empty = free
    finally:
        os.close(fd)  # closing releases the flock


def _cannot_lock(path: Path, what: str, error: OSError) -> LockError:
    """The error for a lock file that cannot be created or written (a full disk, a read-only folder)."""
    why = error.strerror or str(error)
    fix = ("free disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
           "fix the folder's permissions or mount" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
           "check the disk")
    return LockError(f"cannot create or write the lock file {path} of {what}: {why} ({errno.errorcode.get(error.errno, error.errno)}); "
                     f"nothing was changed: {fix} and run the same command again")


@contextlib.contextmanager
def _filelock(path: Path, key: str, *, what: str, wait: bool) -> Iterator[None]:  # pragma: no cover - Windows
    """Hold filelock's lock beside ``path`` (where there is no ``fcntl``): no holder details."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".w")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout as e:
        raise LockedError(f"{what} is in use by another process ({path}); wait for it or pass --wait") from e
    try:
        with _guard:
            _held[key] = 1
        yield
    finally:
        with _guard:
            _held.pop(key, None)
        lock.release()


def work_lock(work: str | Path, *, wait: bool = False) -> contextlib.AbstractContextManager[Path]:
    """The lock of a WORK folder (convert, report, withdraw and release reading it)."""
    return folder_lock(Path(work) / LOCK_NAME, what=f"WORK folder {work}", wait=wait)


def target_lock(target: str | Path, *, what: str, wait: bool = False) -> contextlib.AbstractContextManager[Path]:
    """The lock of a folder that is replaced as a whole (a release): a hidden sibling ``.<name>.lock``."""
    target = Path(target)
    return folder_lock(target.parent / f".{target.name}.lock", what=f"{what} {target}", wait=wait)


__all__ = ["LOCK_NAME", "LockError", "LockedError", "folder_lock", "holder", "target_lock", "work_lock"]
