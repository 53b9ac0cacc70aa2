"""The file lock, with real processes (mailer/locking.py)."""

import logging
import os
import signal
import subprocess
import sys

import lockfile
import pytest

import mailer
from mailer import engine, locking
from mailer.engine import send_all
from mailer.models import Message

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

HOLDER = """
import sys, time, lockfile
sys.path.insert(0, {root!r})
from mailer import locking
ok, lock = locking.acquire({path!r}, -1)
print("held" if ok else "not held", flush=True)
time.sleep(600)
"""

FOREIGN = """
import time, lockfile
lock = lockfile.FileLock({path!r})
lock.acquire(-1)
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(code, path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", code.format(path=path, root=root)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def lock_path(settings):
    return settings.MAILER_LOCK_PATH


def test_lock_held_by_a_live_process_blocks_sending(lock_path, smtp_settings, smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="mailer")
    holder = hold_lock(HOLDER, lock_path)
    try:
        mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
        result = send_all()
        assert result.locked_out
        assert f"pid {holder.pid}" in caplog.text
        assert Message.objects.count() == 1
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "default-relative"])
def test_lock_of_a_killed_worker_is_taken_over(
    lock_path, settings, smtp_settings, smtp_server, caplog, relative, tmp_path, monkeypatch
):
    """Also with the default lock path, relative to the working directory
    (README's cron line): the take-over once crashed on it."""
    if relative:
        monkeypatch.chdir(tmp_path)
        settings.MAILER_LOCK_PATH = None
        lock_path = "send_mail"
    caplog.set_level(logging.INFO, logger="mailer")
    holder = hold_lock(HOLDER, lock_path if not relative else None)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(lock_path + ".lock")  # left behind
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    result = send_all()
    assert result.sent == 1
    assert f"owner (pid {holder.pid}" in caplog.text
    assert "is gone" in caplog.text
    # The lock is released again and the dead owner's link file is gone too.
    assert not os.path.exists(lock_path + ".lock")
    directory = os.path.dirname(os.path.abspath(lock_path))
    leftovers = [n for n in os.listdir(directory) if str(holder.pid) in n]
    assert leftovers == []


def test_lock_without_owner_is_respected(lock_path, smtp_settings, smtp_server):
    """A lock written by django-mailer 2.3.2 (no owner inside) is never broken."""
    holder = hold_lock(FOREIGN, lock_path)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
        assert send_all().locked_out
    finally:
        if os.path.exists(lock_path + ".lock"):
            os.unlink(lock_path + ".lock")


def test_lock_wait_timeout(lock_path, settings, smtp_settings, smtp_server):
    settings.MAILER_LOCK_WAIT_TIMEOUT = 0.3
    holder = hold_lock(HOLDER, lock_path)
    try:
        acquired, _ = engine.acquire_lock()  # waits, then gives up cleanly
        assert not acquired
    finally:
        holder.kill()
        holder.wait()


def test_default_lock_path_is_the_working_directory(settings, tmp_path, monkeypatch):
    settings.MAILER_LOCK_PATH = None
    monkeypatch.chdir(tmp_path)
    acquired, lock = engine.acquire_lock()
    try:
        assert acquired
        assert os.path.exists(tmp_path / "send_mail.lock")
    finally:
        engine.release_lock(lock)
    assert not os.path.exists(tmp_path / "send_mail.lock")


# --- a lock file that can't be created ------------------------------------------------


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a directory")
    return path


def test_lock_path_under_a_file_raises_lock_path_error(settings, a_file):
    """Fails for root too: nothing can be created under a regular file."""
    settings.MAILER_LOCK_PATH = str(a_file / "send_mail")
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    with pytest.raises(locking.LockPathError) as info:
        send_all()
    err = info.value
    assert isinstance(err, lockfile.LockFailed)  # what 2.3.2 let through
    assert err.path == str(a_file / "send_mail")
    assert err.reason == f"{a_file} is not a directory"
    assert "MAILER_LOCK_PATH" in str(err)
    assert Message.objects.count() == 1


def test_missing_lock_directory(settings, tmp_path):
    settings.MAILER_LOCK_PATH = str(tmp_path / "missing" / "send_mail")
    with pytest.raises(locking.LockPathError, match="does not exist"):
        engine.acquire_lock()
    (tmp_path / "missing").mkdir()
    acquired, lock = engine.acquire_lock()
    assert acquired
    engine.release_lock(lock)


def test_default_lock_path_in_a_removed_working_directory(settings, tmp_path, monkeypatch):
    settings.MAILER_LOCK_PATH = None
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(locking.LockPathError, match="working directory is gone") as info:
        engine.acquire_lock()
    assert info.value.path == "send_mail"


def test_lock_path_problem(tmp_path, a_file):
    assert locking.lock_path_problem(str(tmp_path / "send_mail")) is None
    assert "does not exist" in locking.lock_path_problem(str(tmp_path / "no" / "send_mail"))
    assert "not a directory" in locking.lock_path_problem(str(a_file / "send_mail"))


def test_release_of_a_lock_file_removed_meanwhile_warns(lock_path, caplog):
    """Somebody deleted the lock file while we held it: releasing says so and goes on."""
    caplog.set_level(logging.WARNING, logger="mailer")
    acquired, lock = locking.acquire(lock_path, -1)
    assert acquired
    os.unlink(lock_path + ".lock")
    locking.release(lock)
    assert "The send lock was already released." in caplog.text



def test_release_never_removes_another_process_lock(lock_path, caplog):
    """Our lock file was deleted and another process took the lock: theirs stays."""
    caplog.set_level(logging.WARNING, logger="mailer")
    acquired, ours = locking.acquire(lock_path, -1)
    assert acquired
    os.unlink(lock_path + ".lock")
    holder = hold_lock(FOREIGN, lock_path)
    try:
        locking.release(ours)
        assert os.path.exists(lock_path + ".lock"), "the other process's lock was deleted"
        assert not os.path.exists(ours.unique_name)
        assert "taken over by another process" in caplog.text
        # It still keeps everyone else out.
        assert locking.acquire(lock_path, -1)[0] is False
    finally:
        holder.kill()
        holder.wait()
