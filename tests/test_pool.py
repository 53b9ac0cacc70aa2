"""Concurrent delivery (mailer/pool.py): N SMTP connections per worker.

Against a real SMTP server that takes its time over each message, on the
test database (SQLite: lanes share one claim cursor; PostgreSQL/MariaDB: row
locks), in process and as real subprocesses.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest
from django.core import checks
from django.core.management import CommandError, call_command

import mailer
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db(transaction=True)


def queue(n, prefix="S"):
    for i in range(n):
        mailer.send_mail(f"{prefix} {i}", f"Body {i}", "from@example.com", [f"to{i}@example.com"])


def test_n_messages_in_flight_at_once(smtp_settings, smtp_server):
    smtp_server.delay = 0.3
    queue(12)
    result = send_all(concurrency=4)
    assert result.sent == 12
    assert smtp_server.max_active == 4  # four DATA phases overlapped
    assert smtp_server.connections == 4  # one connection per lane, reused
    ids = smtp_server.message_ids()
    assert len(ids) == len(set(ids)) == 12  # each message exactly once
    assert not Message.objects.exists()
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 12


def test_default_is_one_connection(smtp_settings, smtp_server, settings):
    smtp_server.delay = 0.05
    queue(4)
    assert send_all().sent == 4
    assert smtp_server.max_active == 1
    settings.MAILER_CONCURRENCY = 3
    queue(6)
    assert send_all().sent == 6
    assert smtp_server.max_active == 3


def test_sending_order_is_kept_per_claim(smtp_settings, smtp_server):
    from mailer.models import PRIORITY_HIGH, PRIORITY_LOW

    mailer.send_mail("low", "b", "f@example.com", ["t@example.com"], priority=PRIORITY_LOW)
    queue(3, prefix="medium")
    mailer.send_mail("high", "b", "f@example.com", ["t@example.com"], priority=PRIORITY_HIGH)
    smtp_server.delay = 0.1
    send_all(concurrency=2)
    subjects = smtp_server.subjects()
    # Claims go in sending order; with two lanes arrivals may swap pairwise.
    assert set(subjects[:2]) <= {"high", "medium 0"}
    assert subjects[-1] == "low" or subjects[-2] == "low"


def test_a_dropped_connection_defers_only_its_message(smtp_settings, smtp_server):
    smtp_server.delay = 0.1
    smtp_server.drop_matching = "drop me"
    queue(4, prefix="first")
    mailer.send_mail("drop me", "b", "f@example.com", ["t@example.com"])
    queue(4, prefix="second")
    result = send_all(concurrency=3)
    assert result.sent == 8
    assert result.deferred == 1
    assert Message.objects.get().subject == "drop me"
    assert Message.objects.get().priority == PRIORITY_DEFERRED
    assert MessageLog.objects.filter(result=RESULT_FAILURE).count() == 1
    # The broken connection was replaced; the others carried on.
    assert smtp_server.connections == 4


def test_max_batch_counts_across_the_lanes(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_MAX_BATCH = 5
    smtp_server.delay = 0.1
    queue(12)
    assert send_all(concurrency=4).sent == 5
    assert len(smtp_server.messages) == 5
    assert Message.objects.count() == 7


def test_max_deferred_stops_the_pool(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_MAX_DEFERRED = 2
    smtp_server.fail_with = "451 4.3.0 Temporary failure"
    smtp_server.delay = 0.1
    queue(20)
    result = send_all(concurrency=3)
    # Lanes stop claiming once two are deferred; those in flight finish.
    assert 2 <= result.deferred <= 2 + 3 - 1
    assert Message.objects.non_deferred().count() == 20 - result.deferred


def test_throttle_paces_the_whole_worker(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_THROTTLE = 0.1
    queue(6)
    started = time.monotonic()
    assert send_all(concurrency=4).sent == 6
    # One message per 0.1 s for the process, not per connection: 6 messages
    # need at least 5 gaps.
    assert time.monotonic() - started >= 0.5


calls: list[int] = []
calls_lock = threading.Lock()


def counting_handler(connection, message, exc):
    from mailer.engine import handle_delivery_exception

    with calls_lock:
        calls.append(message.pk)
    return handle_delivery_exception(connection, message, exc)


def test_error_handler_once_per_failed_message(smtp_settings, smtp_server, settings):
    settings.MAILER_ERROR_HANDLER = "tests.test_pool.counting_handler"
    smtp_server.fail_with = "554 no"
    calls.clear()
    queue(9)
    pks = set(Message.objects.values_list("pk", flat=True))
    result = send_all(concurrency=3)
    assert result.deferred == 9
    assert sorted(calls) == sorted(pks)  # each failed message once


def test_unexpected_error_in_one_lane_lets_the_others_finish(settings, smtp_settings,
                                                             smtp_server):
    from mailer.engine import handle_delivery_exception  # noqa: F401

    mailer.send_mail("boom", "b", "f@example.com", ["t@example.com"])
    queue(5)
    # A header Django refuses at send time (stored bypassing queue checks).
    msg = Message.objects.get(subject_text="boom")
    email = msg.email
    email.attachments = [("evil\nname.txt", "x", "text/plain")]
    Message.objects.filter(pk=msg.pk).update(message_data=mailer.models.email_to_db(email))
    with pytest.raises(ValueError):
        send_all(concurrency=3)
    assert len(smtp_server.messages) == 5
    assert Message.objects.get().priority == PRIORITY_DEFERRED


def test_concurrency_setting_is_checked(settings):
    for bad in (0, 2.5, "4", True):
        settings.MAILER_CONCURRENCY = bad
        errors = checks.run_checks(tags=["mailer"])
        assert [e.id for e in errors] == ["mailer.E001"], bad
        assert "MAILER_CONCURRENCY" in errors[0].msg
    with pytest.raises(ValueError, match="concurrency"):
        send_all(concurrency=0)


def test_command_option(smtp_settings, smtp_server, capsys):
    smtp_server.delay = 0.2
    queue(6)
    call_command("send_mail", "--concurrency", "3")
    assert "sent 6" in capsys.readouterr().out
    assert smtp_server.max_active == 3
    with pytest.raises(CommandError, match="--concurrency"):
        call_command("send_mail", "--concurrency", "0")


# --- processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_what_is_in_flight(manage, smtp_server):
    smtp_server.delay = 0.5
    queue(30)
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "60"
    proc = manage.popen("runmailer", "--concurrency", "4")
    try:
        smtp_server.wait_for(2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    arrived = len(smtp_server.messages)
    ids = smtp_server.message_ids()
    assert len(ids) == len(set(ids))
    # Every message the server accepted is recorded; nothing lost.
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == arrived
    assert Message.objects.count() == 30 - arrived
    assert arrived < 30


@pytest.mark.slow
def test_sigkill_with_n_in_flight_loses_nothing(manage, smtp_server):
    smtp_server.delay = 0.3
    queue(24)
    expected = set(Message.objects.values_list("message_id", flat=True))
    proc = manage.popen("send_mail", "--concurrency", "4")
    smtp_server.wait_for(6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)
    time.sleep(0.6)  # let the server finish the DATA phases it was in
    smtp_server.delay = 0
    manage.run("send_mail", "--concurrency", "4")
    ids = smtp_server.message_ids()
    assert set(ids) == expected  # nothing lost
    duplicates = sum(n - 1 for n in Counter(ids).values())
    assert duplicates <= 4  # at most one per message in flight, same Message-ID
    assert Message.objects.count() == 0
