"""Several workers on one queue, kept apart by row locks alone (mailer/claims.py).

On PostgreSQL, MariaDB >= 10.6 and MySQL >= 8.0 each message is claimed
``SELECT ... FOR UPDATE SKIP LOCKED`` inside the transaction that records it,
so workers need no file lock to share a queue, even on several machines.
These tests run the workers with ``MAILER_USE_FILE_LOCK = False``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import pytest
from django.db import connection, connections, transaction

import mailer
from mailer.engine import send_all
from mailer.models import Message, MessageLog
from tests.conftest import Manage

pytestmark = [pytest.mark.rowlocks, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

NO_FILE_LOCK = {"MAILER_TEST_NO_FILE_LOCK": "1", "MAILER_TEST_EMPTY_QUEUE_SLEEP": "0.1"}


def queue(n: int, prefix: str) -> list[str]:
    subjects = [f"{prefix} {i}" for i in range(n)]
    with transaction.atomic():
        for subject in subjects:
            mailer.send_mail(subject, "body", "from@example.com", ["to@example.com"])
    return subjects


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"worker did not stop:\n{stderr}") from None
    return proc.returncode, stderr


def sent_by(log: str) -> int:
    return sum(int(n) for n in re.findall(r"Pass done: sent (\d+)", log))


def test_the_database_skips_locked_rows():
    assert connection.features.has_select_for_update
    assert connection.features.has_select_for_update_skip_locked, (
        f"{connection.vendor} {connection.Database.__name__}: SKIP LOCKED needs "
        "PostgreSQL, MariaDB >= 10.6 or MySQL >= 8.0"
    )


def test_a_claimed_row_is_passed_over_not_waited_for(smtp_settings, smtp_server):
    """Another worker's claim is skipped at once; the rest of the queue goes."""
    queue(1, "held")
    held = Message.objects.get().pk
    queue(2, "free")
    locked, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        try:
            with transaction.atomic():
                list(Message.objects.select_for_update().filter(pk=held))
                locked.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=other_worker, daemon=True)
    holder.start()
    assert locked.wait(10)
    try:
        started = time.monotonic()
        result = send_all()
        elapsed = time.monotonic() - started
    finally:
        release.set()
        holder.join(30)
    assert result.sent == 2
    assert elapsed < 10  # not blocked until the holder let go
    assert sorted(smtp_server.subjects()) == ["free 0", "free 1"]
    assert list(Message.objects.values_list("pk", flat=True)) == [held]


def test_several_workers_send_each_message_once(manage, smtp_server):
    """Three looping workers and cron passes on one queue: no duplicates."""
    smtp_server.delay = 0.005  # keep several sessions in flight at once
    env = Manage(env={**manage.env, **NO_FILE_LOCK})
    workers = [env.popen("runmailer") for _ in range(3)]
    crons = []
    try:
        for batch in range(20):
            queue(10, f"b{batch}")
            if batch % 5 == 0:
                crons.append(env.popen("send_mail"))
        smtp_server.wait_for(200, timeout=120)
        for cron in crons:
            _, err = cron.communicate(timeout=60)
            assert cron.returncode == 0, err
        wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    finally:
        results = [stop(worker) for worker in workers]
    for code, log in results:
        assert code == 0, log
        assert "Traceback" not in log, log
    # Everything has stopped: whatever was sent has arrived.
    ids = smtp_server.message_ids()
    assert len(ids) == 200
    assert len(set(ids)) == 200
    assert MessageLog.objects.count() == 200
    # The workers really shared the queue.
    assert sum(sent_by(log) > 0 for _, log in results) >= 2, [log for _, log in results]


def test_killing_one_of_two_workers_loses_nothing(manage, smtp_server):
    """SIGKILL one worker mid-drain: its claim is released with its connection
    and the other worker sends the rest; at most the message in flight twice."""
    smtp_server.delay = 0.1
    queue(30, "m")
    expected = set(Message.objects.values_list("message_id", flat=True))
    env = Manage(env={**manage.env, **NO_FILE_LOCK})
    victim, survivor = env.popen("runmailer"), env.popen("runmailer")
    try:
        smtp_server.wait_for(6)
        stop(victim, signal.SIGKILL)
        wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    finally:
        code, log = stop(survivor)
    assert code == 0, log
    ids = smtp_server.message_ids()
    assert set(ids) == expected  # nothing lost
    assert len(ids) - len(set(ids)) <= 1
    assert MessageLog.objects.count() == 30
