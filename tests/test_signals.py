"""mailer/signals.py: sent / deferred / failed, after the outcome is committed.

Against a real SMTP server on loopback, on the test database (SQLite, or
PostgreSQL with MAILER_TEST_DB=postgres, where the claim and the record
share a transaction).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
from django.core.mail import EmailMessage
from django.db import connection, connections

import mailer
from mailer.backend import DbBackend
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_FAILURE,
    DontSendEntry,
    Message,
    MessageLog,
)
from mailer.signals import message_deferred, message_failed, message_sent

SIGNALS = {"sent": message_sent, "deferred": message_deferred, "failed": message_failed}


def committed_log_results(message_id: str) -> list[str]:
    """The log as another connection sees it: only what is committed."""
    found: list[str] = []

    def read() -> None:
        try:
            found.extend(
                MessageLog.objects.filter(message_id=message_id)
                .order_by("id")
                .values_list("result", flat=True)
            )
        finally:
            connections.close_all()

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(20)
    return found


@contextmanager
def recorded(check_committed: bool = False):
    """Connect a receiver to every signal; yield the list of (name, kwargs)."""
    calls: list[tuple[str, dict]] = []
    receivers = {}
    for name, signal in SIGNALS.items():

        def receiver(sender, name=name, **kwargs):
            assert sender is Message
            kwargs = dict(kwargs)
            kwargs.pop("signal")
            kwargs["thread"] = threading.current_thread().name
            kwargs["in_atomic_block"] = connection.in_atomic_block
            if check_committed:
                kwargs["committed"] = committed_log_results(kwargs["message_id"])
            calls.append((name, kwargs))

        receivers[name] = receiver
        signal.connect(receiver)
    try:
        yield calls
    finally:
        for name, signal in SIGNALS.items():
            signal.disconnect(receivers[name])


def queue_one(subject="Hello", to="to@example.com") -> EmailMessage:
    email = EmailMessage(subject, "body", "from@example.com", [to])
    DbBackend().send_messages([email])
    return email


@pytest.mark.django_db(transaction=True)
def test_sent_after_the_outcome_is_committed(smtp_settings, smtp_server):
    email = queue_one()
    message_id = email.extra_headers["Message-ID"]
    with recorded(check_committed=True) as calls:
        assert send_all().sent == 1
    assert [name for name, _ in calls] == ["sent"]
    kwargs = calls[0][1]
    assert kwargs["message_id"] == message_id
    assert isinstance(kwargs["email"], EmailMessage) and kwargs["email"].subject == "Hello"
    assert "error" not in kwargs
    # Another connection already sees the log entry: the outcome is committed.
    assert kwargs["committed"] == ["1"]
    assert kwargs["in_atomic_block"] is False
    assert kwargs["thread"] == threading.current_thread().name


@pytest.mark.django_db(transaction=True)
def test_deferred_with_the_error_after_commit(smtp_settings, smtp_server):
    smtp_server.fail_with = "451 4.3.0 try again later"
    email = queue_one()
    message_id = email.extra_headers["Message-ID"]
    with recorded(check_committed=True) as calls:
        assert send_all().deferred == 1
    assert [name for name, _ in calls] == ["deferred"]
    kwargs = calls[0][1]
    assert kwargs["message_id"] == message_id
    assert kwargs["email"].subject == "Hello"
    assert "451" in kwargs["error"] and "try again later" in kwargs["error"]
    assert kwargs["committed"] == [RESULT_FAILURE]
    assert Message.objects.get().priority == PRIORITY_DEFERRED

    # Retried and sent: the same Message-ID, now "sent".
    smtp_server.fail_with = None
    Message.objects.retry_deferred()
    with recorded() as calls:
        assert send_all().sent == 1
    assert [(name, kw["message_id"]) for name, kw in calls] == [("sent", message_id)]


@pytest.mark.django_db(transaction=True)
def test_failed_undecodable_row_has_no_email(smtp_settings, smtp_server):
    email = queue_one()
    Message.objects.update(message_data="this is not a pickle")  # damaged after queueing
    with recorded(check_committed=True) as calls:
        assert send_all().failed == 1
    assert [name for name, _ in calls] == ["failed"]
    kwargs = calls[0][1]
    assert kwargs["message_id"] == email.extra_headers["Message-ID"]
    assert kwargs["email"] is None
    assert kwargs["error"].startswith("Could not decode the stored message")
    assert kwargs["committed"] == [RESULT_FAILURE]


def giving_up_handler(connection, message, exc):
    # As docs/delivery.rst's example: logged, deleted, and "deferred" for the counter.
    MessageLog.objects.log(message, RESULT_FAILURE, f"gave up: {exc}")
    message.delete()
    return None, "deferred"


def untouching_handler(connection, message, exc):
    return None, "deferred"


def exploding_handler(connection, message, exc):
    raise RuntimeError("handler bug")


@pytest.mark.django_db(transaction=True)
def test_failed_when_the_error_handler_gives_up(settings, smtp_settings, smtp_server):
    settings.MAILER_ERROR_HANDLER = "tests.test_signals.giving_up_handler"
    smtp_server.fail_with = "554 5.7.1 no"
    email = queue_one()
    with recorded() as calls:
        send_all()
    assert [name for name, _ in calls] == ["failed"]
    kwargs = calls[0][1]
    assert kwargs["message_id"] == email.extra_headers["Message-ID"]
    assert "554" in kwargs["error"]
    assert mailer.status(kwargs["message_id"]).state == "failed"


@pytest.mark.django_db(transaction=True)
def test_deferred_when_the_error_handler_leaves_the_message_queued(
    settings, smtp_settings, smtp_server
):
    settings.MAILER_ERROR_HANDLER = "tests.test_signals.untouching_handler"
    smtp_server.fail_with = "451 later"
    queue_one()
    with recorded() as calls:
        send_all()
    assert [name for name, _ in calls] == ["deferred"]
    assert "451" in calls[0][1]["error"]
    assert mailer.status(calls[0][1]["message_id"]).state == "queued"


@pytest.mark.django_db(transaction=True)
def test_deferred_when_the_error_handler_raises(settings, smtp_settings, smtp_server):
    settings.MAILER_ERROR_HANDLER = "tests.test_signals.exploding_handler"
    smtp_server.fail_with = "451 later"
    queue_one()
    with recorded() as calls, pytest.raises(RuntimeError):
        send_all()
    assert [name for name, _ in calls] == ["deferred"]
    assert "handler bug" in calls[0][1]["error"]


@pytest.mark.django_db(transaction=True)
def test_dont_send_sends_no_signal(smtp_settings, smtp_server):
    DontSendEntry.objects.create(to_address="to@example.com")
    queue_one()
    with recorded() as calls:
        assert send_all().dont_send == 1
    assert calls == []


def raising_receiver(sender, **kwargs):
    raise ValueError("receiver bug")


@pytest.mark.django_db(transaction=True)
def test_a_raising_receiver_is_logged_and_mail_goes_on(smtp_settings, smtp_server, caplog):
    queue_one("one")
    queue_one("two")
    message_sent.connect(raising_receiver)
    try:
        with recorded() as calls:
            assert send_all().sent == 2
    finally:
        message_sent.disconnect(raising_receiver)
    assert smtp_server.subjects() == ["one", "two"]
    assert [name for name, _ in calls] == ["sent", "sent"]
    logged = [r for r in caplog.records if r.name == "django.dispatch" and r.exc_info]
    assert len(logged) == 2 and "receiver bug" in caplog.text


@pytest.mark.django_db
def test_nothing_is_scheduled_without_receivers(
    smtp_settings, smtp_server, django_capture_on_commit_callbacks
):
    """No receiver: no on_commit callback is registered (the hot path stays as it was)."""
    for i in range(3):
        queue_one(f"s{i}")
    with django_capture_on_commit_callbacks() as callbacks:
        assert send_all().sent == 3
    assert callbacks == []
    for i in range(2):
        queue_one(f"t{i}")
    with recorded() as calls:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            assert send_all().sent == 2
    assert len(callbacks) == 2
    assert [name for name, _ in calls] == ["sent", "sent"]


@pytest.mark.django_db
def test_in_a_callers_transaction_signals_wait_for_its_commit(
    smtp_settings, smtp_server, django_capture_on_commit_callbacks
):
    """The admin's "Send now" inside ATOMIC_REQUESTS: nothing until the request commits."""
    queue_one()
    with recorded() as calls:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            assert send_all().sent == 1
        assert calls == []
        for callback in callbacks:
            callback()
    assert [name for name, _ in calls] == ["sent"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fail", [False, True])
def test_with_several_lanes_each_signal_runs_in_its_lane_after_commit(
    settings, smtp_settings, smtp_server, fail
):
    """MAILER_CONCURRENCY > 1: one signal per message, from the lane threads."""
    settings.MAILER_CONCURRENCY = 3
    if fail:
        smtp_server.fail_with = "451 4.3.0 later"
    ids = {queue_one(f"s{i}", to=f"to{i}@example.com").extra_headers["Message-ID"] for i in range(9)}
    with recorded(check_committed=True) as calls:
        result = send_all()
    assert (result.deferred if fail else result.sent) == 9
    name = "deferred" if fail else "sent"
    assert sorted(n for n, _ in calls) == [name] * 9
    assert {kw["message_id"] for _, kw in calls} == ids
    expected = [RESULT_FAILURE] if fail else ["1"]
    assert all(kw["committed"] == expected for _, kw in calls)
    assert all(kw["in_atomic_block"] is False for _, kw in calls)
    main = threading.current_thread().name
    assert all(kw["thread"] != main for _, kw in calls)
    for message_id in ids:
        assert mailer.status(message_id).state == name


@pytest.mark.django_db(transaction=True)
def test_deferred_when_a_stored_attachment_is_missing(
    attachment_storage, smtp_settings, smtp_server
):
    from mailer import attachments

    email = EmailMessage("Report", "b", "from@example.com", ["to@example.com"])
    email.attach("big.bin", b"x" * 5000, "application/octet-stream")
    DbBackend().send_messages([email])
    attachment_storage.delete(attachments.references(Message.objects.get().email)[0].key)
    with recorded(check_committed=True) as calls:
        assert send_all().deferred == 1
    assert [name for name, _ in calls] == ["deferred"]
    kwargs = calls[0][1]
    assert kwargs["message_id"] == email.extra_headers["Message-ID"]
    assert "big.bin is missing" in kwargs["error"] and kwargs["committed"] == [RESULT_FAILURE]
    assert mailer.status(kwargs["message_id"]).state == "deferred"
