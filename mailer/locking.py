"""The ``send_mail`` file lock, with take-over of locks left by dead workers.

The lock is ``lockfile.FileLock(path).acquire(timeout)`` (a hard link to a
per-process file on POSIX) at ``MAILER_LOCK_PATH + ".lock"``, as in
django-mailer 2.3.2; ``lockfile.FileLock`` is looked up at each call, so a test
that replaces it is obeyed. Everything beyond taking and releasing works from
the path we computed, never from attributes of the lock object. On top of it we
write the owner's host and pid into the lock file once we hold it. When the
lock is held and that owner is a process on this host that no longer exists
(it was killed with SIGKILL, the machine lost power...), the lock is stale: we
remove it, with a warning, and try once more. Removal happens under an
``flock`` on a side file so two workers never both "break" a lock one of them
has just taken. A lock we can't attribute (written by django-mailer 2.3.2,
another host, or too new to carry its owner yet) is always respected.

A lock that can't be created at all (its directory is missing, not a
directory, or not writable) raises :class:`LockPathError`, which names the
path, the reason and the fix; ``mailer.E007`` reports an explicit
``MAILER_LOCK_PATH`` with that problem before anything runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import lockfile

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no fcntl on Windows; checked before use


DEFAULT_LOCK_PATH = "send_mail"


class LockPathError(lockfile.LockFailed):
    """The lock file can't be created where the settings put it.

    A subclass of ``lockfile.LockFailed`` (what django-mailer 2.3.2 let
    through in this case), so code catching that keeps working.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"Can't create the send_mail lock file {self.path}.lock: {self.reason}. "
            "Set MAILER_LOCK_PATH to a path (without '.lock') in a directory that "
            "exists and that this user can write to, e.g. '/run/mailer/send_mail'."
        )


def lock_path(configured: str | None) -> str:
    """The path given to ``FileLock`` (``.lock`` is appended by it)."""
    return configured or DEFAULT_LOCK_PATH


def lock_path_problem(path: str) -> str | None:
    """Why no lock file can be created at ``path`` + ``.lock``, or ``None``.

    Checks the directory only: it must exist, be a directory and be writable.
    (For root, permission bits don't matter; ``acquire`` still reports what
    the file system actually refuses.)
    """
    try:
        directory = os.path.dirname(os.path.abspath(path))
    except OSError as err:  # the working directory was removed
        return f"the working directory is gone ({err.strerror})"
    if not os.path.exists(directory):
        return f"the directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable by this user"
    return None


def lock_file_of(configured: str | None) -> str:
    """The file ``FileLock`` holds for ``configured``: the path plus ``.lock``."""
    return lock_path(configured) + ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(lock_file: str) -> tuple[str, int] | None:
    """``(host, pid)`` written into a held lock, or ``None`` if unknown."""
    try:
        with open(lock_file, encoding="utf-8") as fh:
            text = fh.read(200)
    except OSError:
        return None
    parts = text.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _write_owner(lock_file: str) -> None:
    """Write our host and pid into the lock file we now hold.

    The file is never created here: a lock implementation that holds no file
    at that path (a test's replacement ``FileLock``) leaves nothing behind
    that a real lock would take for a held one.
    """
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_TRUNC)
    except OSError:
        return
    with contextlib.suppress(OSError), os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")


def _stale_owner(lock_file: str) -> tuple[str, int] | None:
    owner = read_owner(lock_file)
    if owner is None:
        return None
    host, pid = owner
    if host != socket.gethostname() or pid == os.getpid() or _pid_alive(pid):
        return None
    return owner


def break_if_stale(lock_file: str) -> bool:
    """Remove ``lock_file`` if the process that holds it is dead; True if removed."""
    if fcntl is None:  # pragma: no cover
        return False
    # Compared with the directory's entries below: the same form for both
    # (the default path is relative to the working directory).
    lock_file = os.path.abspath(lock_file)
    guard_path = lock_file + ".guard"
    with open(guard_path, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            owner = _stale_owner(lock_file)
            if owner is None:
                return False
            stale_ino = os.stat(lock_file).st_ino
            # The per-process file the lock links to is named after the dead
            # owner: remove it as well so it doesn't pile up.
            directory = os.path.dirname(lock_file)
            for name in os.listdir(directory):
                full = os.path.join(directory, name)
                if full != lock_file:
                    with contextlib.suppress(OSError):
                        if os.stat(full).st_ino == stale_ino:
                            os.unlink(full)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_file)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
    logger.warning(
        "Took over the lock %s: its owner (pid %s on %s) is gone.",
        lock_file,
        owner[1],
        owner[0],
    )
    return True


def _failure_reason(path: str, err: BaseException) -> str:
    problem = lock_path_problem(path)
    if problem:
        return problem
    # lockfile drops the OSError (e.g. a read-only file system) but keeps it
    # as the exception's context.
    cause = err.__cause__ or err.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(err)


def acquire(
    path: str | None, timeout: float, log: logging.Logger = logger
) -> tuple[bool, Any]:
    """Take the file lock. Returns ``(acquired, lock)``.

    When the lock is held elsewhere, ``log`` gets 2.3.2's ERROR line
    (``lock already in place. quitting.`` or, after waiting ``timeout``
    seconds, ``waiting for the lock timed out. quitting.``). Raises
    :class:`LockPathError` when the lock file can't be created at all.
    """
    target = lock_path(path)
    lock_file = lock_file_of(path)
    try:
        lock = lockfile.FileLock(target)  # makes the path absolute
    except OSError as err:  # the working directory was removed
        raise LockPathError(target, lock_path_problem(target) or str(err)) from err
    for attempt in (1, 2):
        try:
            lock.acquire(timeout)
        except lockfile.LockFailed as err:
            raise LockPathError(target, _failure_reason(target, err)) from err
        except (lockfile.AlreadyLocked, lockfile.LockTimeout) as err:
            if attempt == 1 and break_if_stale(lock_file):
                continue
            if isinstance(err, lockfile.LockTimeout):
                log.error("waiting for the lock timed out. quitting.")
            else:
                log.error("lock already in place. quitting.")
            owner = read_owner(lock_file)
            logger.info(
                "Lock %s is held by %s; not sending now.",
                lock_file,
                f"pid {owner[1]} on {owner[0]}" if owner else "another process",
            )
            return False, lock
        _write_owner(lock_file)
        return True, lock
    return False, lock  # pragma: no cover


def release(lock: Any) -> None:
    """Release a lock taken by :func:`acquire`.

    If our lock file was deleted and another process has taken the lock
    since, only our own part is removed: lockfile's ``release()`` would
    delete the other process's lock file too.
    """
    i_am_locking = getattr(lock, "i_am_locking", None)  # a replaced FileLock may lack it
    if i_am_locking is not None and lock.is_locked() and not i_am_locking():
        logger.warning(
            "The send lock was taken over by another process; leaving its lock in place."
        )
        unique = getattr(lock, "unique_name", None)
        if unique:
            with contextlib.suppress(OSError):
                os.unlink(unique)
        return
    try:
        lock.release()
    except lockfile.NotLocked:
        logger.warning("The send lock was already released.")
    except lockfile.NotMyLock:
        logger.warning("The send lock was taken over by another process.")
