"""The file lock, with real processes (mailer/locking.py)."""

import logging
import os
import signal
import subprocess
import sys

import pytest

import mailer
from mailer import engine
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
        stdout=subprocess.PIPE, text=True,
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


def test_lock_of_a_killed_worker_is_taken_over(lock_path, smtp_settings, smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="mailer")
    holder = hold_lock(HOLDER, lock_path)
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
    leftovers = [n for n in os.listdir(os.path.dirname(lock_path)) if str(holder.pid) in n]
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
