"""mailer/engine.py against a real SMTP server on loopback."""

import logging
import os
import threading
import time
from unittest.mock import Mock, patch

import lockfile
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage

import mailer
from mailer import engine
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    make_message,
)

pytestmark = pytest.mark.django_db(transaction=True)


def queue(n=1, **kwargs):
    for i in range(n):
        mailer.send_mail(f"Subject {i}", f"Body {i}", "from@example.com", [f"to{i}@example.com"],
                         **kwargs)


def test_sends_in_priority_then_age_order(smtp_settings, smtp_server):
    mailer.send_mail("low", "b", "f@example.com", ["t@example.com"], priority=PRIORITY_LOW)
    mailer.send_mail("medium 1", "b", "f@example.com", ["t@example.com"])
    mailer.send_mail("high", "b", "f@example.com", ["t@example.com"], priority=PRIORITY_HIGH)
    mailer.send_mail("medium 2", "b", "f@example.com", ["t@example.com"])
    result = send_all()
    assert result.sent == 4
    assert smtp_server.subjects() == ["high", "medium 1", "medium 2", "low"]
    assert not Message.objects.exists()
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 4


def test_one_smtp_connection_per_pass(smtp_settings, smtp_server):
    queue(20)
    assert send_all().sent == 20
    assert smtp_server.connections == 1


def test_message_id_from_queue_time_is_sent(smtp_settings, smtp_server):
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    from mailer.backend import DbBackend

    DbBackend().send_messages([email])
    send_all()
    assert smtp_server.message_ids() == [email.extra_headers["Message-ID"]]
    assert MessageLog.objects.get().message_id == email.extra_headers["Message-ID"]


def test_deferred_messages_are_skipped(smtp_settings, smtp_server):
    queue(2)
    Message.objects.order_by("id").first().defer()
    assert send_all().sent == 1
    assert Message.objects.get().priority == PRIORITY_DEFERRED


def test_queryset_restricts_the_pass(smtp_settings, smtp_server):
    queue(3)
    first = Message.objects.order_by("id").first()
    assert send_all(Message.objects.filter(pk=first.pk)).sent == 1
    assert Message.objects.count() == 2


@pytest.mark.parametrize(
    "failure",
    [
        {"fail_with": "451 4.3.0 try again later"},
        {"fail_with": "554 5.7.1 rejected"},
        {"fail_rcpt": "550 5.1.1 no such user"},
        {"drop": True},
    ],
    ids=["4xx", "5xx", "rcpt-refused", "dropped"],
)
def test_provider_failure_defers_and_logs(failure, smtp_settings, smtp_server):
    for key, value in failure.items():
        setattr(smtp_server, key, value)
    queue(2)
    result = send_all()
    assert (result.sent, result.deferred) == (0, 2)
    assert Message.objects.deferred().count() == 2
    logs = MessageLog.objects.filter(result=RESULT_FAILURE)
    assert logs.count() == 2
    assert all(log.log_message for log in logs)
    # Nothing is lost: once the provider is back, retry_deferred + a pass
    # delivers both.
    for key in failure:
        setattr(smtp_server, key, None if key != "drop" else False)
    assert Message.objects.retry_deferred() == 2
    assert send_all().sent == 2
    assert Message.objects.count() == 0
    assert len(smtp_server.messages) == 2


def test_server_down_defers(settings, smtp_settings, smtp_server):
    from tests.conftest import free_port
    from tests.settings import smtp_mailers

    port = free_port()  # nothing listens there
    if hasattr(settings, "MAILER_USING"):
        settings.MAILERS = smtp_mailers(port)
    else:
        settings.EMAIL_PORT = port
    queue(1)
    assert send_all().deferred == 1
    assert Message.objects.deferred().count() == 1


def test_an_outage_is_one_warning_per_pass(smtp_down, smtp_server, caplog):
    """-v 0 (cron) shows warnings only: a pass that delivered nothing because
    the server can't be reached says so once, naming the server and count;
    each deferral stays an INFO line."""
    caplog.set_level(logging.INFO, logger="mailer")
    queue(3)
    assert send_all().deferred == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert text.startswith("No mail went out: 3 message(s) deferred because the mail server")
    assert f"127.0.0.1:{smtp_down}" in text and "Connection refused" in text
    assert len([r for r in caplog.records if r.getMessage().startswith("message deferred")]) == 3


def test_no_outage_warning_when_the_server_answers(smtp_settings, smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="mailer")
    smtp_server.fail_with = "451 4.3.0 later"  # reachable; it said no
    queue(2)
    assert send_all().deferred == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_max_batch(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_MAX_BATCH = 3
    queue(5)
    assert send_all().sent == 3
    assert Message.objects.count() == 2


def test_max_deferred(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_MAX_DEFERRED = 2
    smtp_server.fail_with = "451 later"
    queue(5)
    result = send_all()
    assert result.deferred == 2
    assert Message.objects.non_deferred().count() == 3


def test_throttle_sleeps_after_each_sent_message(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_THROTTLE = 0.25
    naps = []
    queue(3)
    send_all(sleep=naps.append)
    assert naps == [0.25, 0.25, 0.25]


def test_no_file_lock_setting(smtp_settings, smtp_server, settings):
    settings.MAILER_USE_FILE_LOCK = False
    ok, lock = engine.acquire_lock()  # somebody else holds the lock
    try:
        queue(1)
        assert send_all().sent == 1
    finally:
        engine.release_lock(lock)


def test_log_message_data_off(smtp_settings, smtp_server, settings):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    queue(1)
    send_all()
    log = MessageLog.objects.get()
    assert log.message_data is None
    assert log.message_id and log.recipients == "to0@example.com"
    assert log.email is None and log.subject is None


def test_undecodable_message_is_kept_in_the_log(smtp_settings, smtp_server, caplog):
    caplog.set_level("INFO", logger="mailer")
    Message.objects.create(message_data="this is not a pickle", recipients="", subject_text="")
    queue(1)
    result = send_all()
    assert (result.sent, result.failed) == (1, 1)
    log = MessageLog.objects.get(result=RESULT_FAILURE)
    assert log.message_data == "this is not a pickle"
    assert "Could not decode" in log.log_message
    assert "can't be decoded" in caplog.text
    assert not Message.objects.exists()


def test_message_without_recipients_is_logged_dont_send(smtp_settings, smtp_server):
    # make_message() with everyone on the don't-send list: 2.3.2 queued it.
    msg = make_message("S", "b", "f@example.com", [])
    msg.save()
    result = send_all()
    assert result.dont_send == 1 and result.sent == 0
    assert not Message.objects.exists()


def test_legacy_row_gets_a_stable_message_id(smtp_settings, smtp_server):
    from mailer.models import email_to_db

    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    # As django-mailer 2.3.2 stored it: no Message-ID yet.
    (row,) = Message.objects.bulk_create([Message(message_data=email_to_db(email))])
    row = Message.objects.get()
    smtp_server.fail_with = "451 later"
    send_all()
    Message.objects.retry_deferred()
    smtp_server.fail_with = None
    send_all()
    (msg_id,) = smtp_server.message_ids()
    assert f".{row.pk}.django-mailer@" in msg_id
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert failure.message_id == msg_id


def test_loop_is_refused(settings):
    settings.MAILER_EMAIL_BACKEND = "mailer.backend.DbBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    with pytest.raises(ImproperlyConfigured, match="back on the queue"):
        send_all()


class Explodes(Exception):
    pass


def exploding_backend_factory():
    from django.core.mail.backends.base import BaseEmailBackend

    class ExplodingBackend(BaseEmailBackend):
        def send_messages(self, messages):
            if any("explode" in m.subject for m in messages):
                raise Explodes("kaboom")
            return len(messages)

    return ExplodingBackend


ExplodingBackend = exploding_backend_factory()


def test_unexpected_error_propagates_after_the_pass(settings):
    settings.MAILER_EMAIL_BACKEND = "tests.test_engine.ExplodingBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    mailer.send_mail("please explode", "b", "f@example.com", ["t@example.com"],
                     priority=PRIORITY_HIGH)
    queue(2)
    with pytest.raises(Explodes):
        send_all()
    bad = Message.objects.get(priority=PRIORITY_DEFERRED)
    assert bad.subject == "please explode"
    assert "kaboom" in MessageLog.objects.get(result=RESULT_FAILURE).log_message
    # The mail behind it went out in the same pass; the error came after.
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 2
    assert Message.objects.count() == 1


def custom_handler(connection, message, exc):
    message.delete()
    MessageLog.objects.log(message, RESULT_FAILURE, "custom: " + str(exc))
    return connection, "sent"


def test_custom_error_handler(settings, smtp_settings, smtp_server):
    settings.MAILER_ERROR_HANDLER = "tests.test_engine.custom_handler"
    smtp_server.fail_with = "554 no"
    queue(2)
    result = send_all()
    assert result.sent == 2
    assert not Message.objects.exists()
    assert MessageLog.objects.filter(log_message__startswith="custom:").count() == 2


def test_prioritize_excludes_deferred():
    queue(3)
    Message.objects.order_by("id").last().defer()
    assert [m.subject for m in engine.prioritize()] == ["Subject 0", "Subject 1"]


def test_pass_memory_does_not_load_the_queue(smtp_settings, smtp_server, django_assert_max_num_queries):
    # Each message costs a bounded number of queries (claim, log, delete,
    # transaction bookkeeping); nothing loads the whole queue up front.
    queue(30)
    with django_assert_max_num_queries(30 * 6 + 5):
        assert send_all().sent == 30


def test_signal_receivers_still_fire(smtp_settings, smtp_server):
    from django.db.models.signals import post_delete, post_save

    saved, deleted = [], []

    def on_log(sender, instance, created, **kwargs):
        saved.append(instance.result)

    def on_delete(sender, instance, **kwargs):
        deleted.append(instance.pk)

    post_save.connect(on_log, sender=MessageLog)
    post_delete.connect(on_delete, sender=Message)
    try:
        queue(2)
        ids = sorted(Message.objects.values_list("pk", flat=True))
        assert send_all().sent == 2
    finally:
        post_save.disconnect(on_log, sender=MessageLog)
        post_delete.disconnect(on_delete, sender=Message)
    assert saved == [RESULT_SUCCESS, RESULT_SUCCESS]
    assert sorted(deleted) == ids


def test_claimed_rows_are_what_the_orm_builds(smtp_settings, smtp_server):
    queue(1)
    expected = Message.objects.get()
    send_all()
    log = MessageLog.objects.get()
    assert log.when_added == expected.when_added  # converted, tz-aware, exact
    assert log.priority == expected.priority
    assert log.message_id == expected.message_id


# --- 2.3.2's patch points, patched the way a site's own tests do ---------------------


class Stop(Exception):
    """Ends a send_loop() in tests, as 2.3.2's own tests do."""


def test_module_setting_attributes_read_the_current_setting(settings):
    settings.MAILER_LOCK_WAIT_TIMEOUT = 7
    settings.MAILER_EMPTY_QUEUE_SLEEP = 11
    assert (engine.LOCK_WAIT_TIMEOUT, engine.EMPTY_QUEUE_SLEEP) == (7, 11)
    settings.MAILER_EMPTY_QUEUE_SLEEP = 3
    assert engine.EMPTY_QUEUE_SLEEP == 3
    with pytest.raises(AttributeError, match="NO_SUCH_SETTING"):
        engine.NO_SUCH_SETTING  # noqa: B018


def test_send_loop_sleeps_while_empty_then_sends(settings):
    settings.MAILER_EMPTY_QUEUE_SLEEP = 7
    with patch("mailer.engine.send_all", side_effect=Stop) as send, patch(
        "time.sleep", side_effect=Stop
    ) as sleep:
        with pytest.raises(Stop):
            engine.send_loop()
        sleep.assert_called_once_with(engine.EMPTY_QUEUE_SLEEP)
        assert sleep.call_args.args == (7,)
        send.assert_not_called()
        queue(1)
        with pytest.raises(Stop):
            engine.send_loop()
        send.assert_called_once_with()
        sleep.assert_called_once()


def test_send_loop_obeys_a_patched_empty_queue_sleep(settings):
    settings.MAILER_EMPTY_QUEUE_SLEEP = 30
    with patch("mailer.engine.EMPTY_QUEUE_SLEEP", 0.5), patch(
        "time.sleep", side_effect=Stop
    ) as sleep:
        with pytest.raises(Stop):
            engine.send_loop()
    sleep.assert_called_once_with(0.5)
    # Unpatched again: the setting, read now.
    settings.MAILER_EMPTY_QUEUE_SLEEP = 4
    assert engine.EMPTY_QUEUE_SLEEP == 4


def test_worker_passes_go_through_a_patched_send_all(settings):
    from mailer.engine import PassResult
    from mailer.worker import Worker

    queue(1)
    with patch("mailer.engine.send_all", return_value=PassResult(sent=1)) as send:
        assert Worker(install_signal_handlers=False, max_passes=2, sleep=0).run() == 2
    assert send.call_count == 2
    assert Message.objects.count() == 1  # the real send_all never ran


def test_send_all_walks_prioritize(smtp_settings, smtp_server):
    queue(3)
    first, *rest = Message.objects.order_by("id")
    with patch("mailer.engine.prioritize", wraps=engine.prioritize) as prioritize:
        assert send_all().sent == 3
    prioritize.assert_called_once_with(None)
    queue(3)
    chosen = Message.objects.order_by("id").last()
    only_one = Message.objects.filter(pk=chosen.pk)
    with patch("mailer.engine.prioritize", return_value=only_one):
        assert send_all().sent == 1
    with patch("mailer.engine.prioritize", return_value=list(Message.objects.all()[:1])):
        assert send_all().sent == 1
    assert Message.objects.count() == 1


def test_a_replaced_filelock_is_used_with_the_patched_timeout(smtp_settings, smtp_server, settings):
    queue(1)
    with patch("mailer.engine.LOCK_WAIT_TIMEOUT", 5), patch("lockfile.FileLock") as FileLock:
        assert send_all().sent == 1
    FileLock.assert_called_once_with(settings.MAILER_LOCK_PATH)
    FileLock.return_value.acquire.assert_called_once_with(5)
    FileLock.return_value.release.assert_called_once_with()
    # Nothing was written where the real lock lives: a real lock still works.
    assert not os.path.exists(settings.MAILER_LOCK_PATH + ".lock")
    acquired, lock = engine.acquire_lock()
    assert acquired
    engine.release_lock(lock)


def test_a_frozen_replacement_lock_stops_the_pass(smtp_settings, smtp_server, caplog):
    caplog.set_level(logging.DEBUG, logger="mailer")
    frozen = Mock()
    frozen.acquire.side_effect = lockfile.AlreadyLocked
    queue(1)
    with patch("mailer.engine.lockfile.FileLock", return_value=frozen), patch(
        "mailer.engine.prioritize"
    ) as prioritize:
        result = send_all()
    assert result.locked_out
    frozen.acquire.assert_called_once_with(engine.LOCK_WAIT_TIMEOUT)
    frozen.release.assert_not_called()
    prioritize.assert_not_called()
    assert Message.objects.count() == 1
    assert ("mailer.engine", logging.ERROR, "lock already in place. quitting.") in (
        caplog.record_tuples
    )


def test_patched_lock_wait_timeout_waits_for_a_held_lock(settings, caplog):
    held = threading.Event()
    done = threading.Event()

    def hold():
        # Made in this thread: lockfile names its link file after the thread.
        holder = lockfile.FileLock(settings.MAILER_LOCK_PATH)
        holder.acquire()
        held.set()
        done.wait(10)
        holder.release()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        held.wait(5)
        start = time.monotonic()
        with patch("mailer.engine.LOCK_WAIT_TIMEOUT", 0.3):
            acquired, _ = engine.acquire_lock()
        assert not acquired
        assert time.monotonic() - start >= 0.3
    finally:
        done.set()
        thread.join()
    assert ("mailer.engine", logging.ERROR, "waiting for the lock timed out. quitting.") in (
        caplog.record_tuples
    )


# --- log lines operators' alerts match (2.3.2's levels and words) ------------------------


def test_limit_and_deferral_log_lines(smtp_settings, smtp_server, settings, caplog):
    caplog.set_level(logging.DEBUG, logger="mailer")
    settings.MAILER_EMAIL_MAX_BATCH = 1
    queue(2)
    send_all()
    assert (
        "mailer.engine", logging.INFO, "EMAIL_MAX_BATCH (1) reached, stopping for this round"
    ) in caplog.record_tuples
    settings.MAILER_EMAIL_MAX_BATCH = None
    settings.MAILER_EMAIL_MAX_DEFERRED = 1
    smtp_server.fail_with = "451 4.3.0 later"
    caplog.clear()
    send_all()
    assert (
        "mailer.engine", logging.WARNING, "EMAIL_MAX_DEFERRED (1) reached, stopping for this round"
    ) in caplog.record_tuples
    deferrals = [r for r in caplog.records if r.getMessage().startswith("message deferred")]
    assert [(r.name, r.levelno) for r in deferrals] == [("mailer.engine", logging.INFO)]
    assert deferrals[0].getMessage().startswith("message deferred due to failure: ")
    assert "451" in deferrals[0].getMessage()
    # Which message it was, as the success line says: its id and Message-ID.
    deferred = Message.objects.deferred().get()
    assert deferrals[0].getMessage().endswith(f"(message {deferred.pk} {deferred.message_id})")
    assert deferred.message_id.startswith("<")
    assert any(r.getMessage().startswith("Pass done: ") for r in caplog.records)  # ours stays


# --- the don't-send list at delivery time -------------------------------------------------


def dont_send_queries(captured):
    return [q for q in captured if "mailer_dontsendentry" in q["sql"]]


def test_dont_send_list_is_read_once_per_pass(smtp_settings, smtp_server):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from mailer.models import RESULT_DONT_SEND, DontSendEntry

    DontSendEntry.objects.create(to_address="to1@example.com")
    DontSendEntry.objects.create(to_address="To3@Example.com")
    queue(5)
    with CaptureQueriesContext(connection) as captured:
        result = send_all()
    assert (result.sent, result.dont_send) == (3, 2)
    assert len(dont_send_queries(captured)) == 1
    assert sorted(m["to"][0] for m in smtp_server.messages) == [
        "to0@example.com", "to2@example.com", "to4@example.com"
    ]
    skipped = MessageLog.objects.filter(result=RESULT_DONT_SEND).order_by("id")
    assert [e.recipients for e in skipped] == ["to1@example.com", "to3@example.com"]
    # Each skipped entry keeps the content it would have sent.
    assert [e.subject for e in skipped] == ["Subject 1", "Subject 3"]
    # An empty pass never reads the list.
    with CaptureQueriesContext(connection) as captured:
        send_all()
    assert dont_send_queries(captured) == []


def test_a_database_error_reading_the_list_ends_the_pass_not_the_message(
    smtp_settings, smtp_server
):
    from django.db import DatabaseError, connection

    queue(1)
    quote = connection.ops.quote_name
    table, away = quote("mailer_dontsendentry"), quote("mailer_dontsendentry_away")
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {away}")
    try:
        with pytest.raises(DatabaseError):
            send_all()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {away} RENAME TO {table}")
    assert Message.objects.non_deferred().count() == 1
    assert not MessageLog.objects.exists()
    assert smtp_server.messages == []
    assert send_all().sent == 1


def test_named_addresses_are_matched(smtp_settings, smtp_server):
    from mailer.models import DontSendEntry

    DontSendEntry.objects.create(to_address="ada@example.com")
    mailer.send_mail("S", "b", "f@example.com", ["Ada Lovelace <ADA@example.com>", "b@example.com"])
    assert send_all().sent == 1
    assert smtp_server.messages[0]["to"] == ["b@example.com"]


def listing_backend_factory():
    """A sending backend that puts an address on the don't-send list while
    the pass runs (as a bounce handler on another machine would)."""
    from django.core.mail.backends.smtp import EmailBackend

    from mailer.models import DontSendEntry

    class Backend(EmailBackend):
        def send_messages(self, messages):
            sent = super().send_messages(messages)
            DontSendEntry.objects.get_or_create(to_address="late@example.com")
            return sent

    return Backend


ListingBackend = listing_backend_factory()


@pytest.mark.parametrize(("refresh", "late_sent"), [(30.0, True), (0.0, False)])
def test_address_added_during_a_pass(refresh, late_sent, settings, smtp_settings, smtp_server):
    """Honoured once the pass's copy is older than DONT_SEND_REFRESH_SECONDS."""
    settings.MAILER_EMAIL_BACKEND = "tests.test_engine.ListingBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    settings.EMAIL_HOST, settings.EMAIL_PORT = smtp_server.host, smtp_server.port
    mailer.send_mail("first", "b", "f@example.com", ["early@example.com"])
    mailer.send_mail("second", "b", "f@example.com", ["late@example.com"])
    with patch.object(engine, "DONT_SEND_REFRESH_SECONDS", refresh):
        result = send_all()
    assert (result.sent, result.dont_send) == ((2, 0) if late_sent else (1, 1))
    # The next pass reads the list afresh whatever the refresh interval.
    mailer.send_mail("third", "b", "f@example.com", ["late@example.com"])
    assert send_all().dont_send == 1


# --- the log keeps the message as sent --------------------------------------------------


def relay_backend_factory():
    from django.core.mail.backends.smtp import EmailBackend

    class Backend(EmailBackend):
        """A sending backend that stamps what it sends, as relays and ESP
        backends do; a message with subject "unpicklable" is left holding
        something that can't be pickled."""

        def send_messages(self, messages):
            for message in messages:
                message.extra_headers["X-Relay-Id"] = "relay-42"
                if message.subject == "unpicklable":
                    message.tracker = lambda: None
            return super().send_messages(messages)

    return Backend


RelayBackend = relay_backend_factory()


@pytest.fixture
def relay_settings(settings, smtp_server):
    settings.MAILER_EMAIL_BACKEND = "tests.test_engine.RelayBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    settings.EMAIL_HOST, settings.EMAIL_PORT = smtp_server.host, smtp_server.port
    return settings


def test_log_keeps_what_the_backend_added(relay_settings, smtp_server):
    from mailer.models import email_to_db

    # A row as 2.3.2 queued it: no Message-ID until the worker adds one.
    email = EmailMessage("legacy", "b", "f@example.com", ["t@example.com"])
    Message.objects.bulk_create([Message(message_data=email_to_db(email))])
    assert send_all().sent == 1
    (received,) = smtp_server.messages
    logged = MessageLog.objects.get().email
    assert logged.extra_headers["X-Relay-Id"] == "relay-42"
    assert logged.extra_headers["Message-ID"] == received["message"]["Message-ID"]
    assert received["message"]["X-Relay-Id"] == "relay-42"


def test_log_falls_back_to_the_queued_form_when_the_sent_one_cannot_be_stored(
    relay_settings, smtp_server, caplog
):
    caplog.set_level(logging.WARNING, logger="mailer")
    mailer.send_mail("unpicklable", "b", "f@example.com", ["t@example.com"])
    queued = Message.objects.get().message_data
    assert send_all().sent == 1
    assert MessageLog.objects.get().message_data == queued
    assert "can't be serialized" in caplog.text
    assert len(smtp_server.messages) == 1


def test_log_without_data_never_serializes(relay_settings, smtp_server, caplog):
    # The unpicklable message would leave a warning if it were serialized.
    relay_settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    caplog.set_level(logging.WARNING, logger="mailer")
    mailer.send_mail("unpicklable", "b", "f@example.com", ["t@example.com"])
    assert send_all().sent == 1
    entry = MessageLog.objects.get()
    assert entry.message_data is None and entry.message_id
    assert "serialized" not in caplog.text


def test_failures_and_dont_send_keep_the_queued_form(relay_settings, smtp_server):
    from mailer.models import RESULT_DONT_SEND, DontSendEntry

    DontSendEntry.objects.create(to_address="blocked@example.com")
    mailer.send_mail("blocked", "b", "f@example.com", ["blocked@example.com"])
    smtp_server.fail_with = "451 later"
    mailer.send_mail("failing", "b", "f@example.com", ["t@example.com"])
    queued = dict(Message.objects.values_list("subject_text", "message_data"))
    send_all()
    dont_send = MessageLog.objects.get(result=RESULT_DONT_SEND)
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert dont_send.message_data == queued["blocked"]
    assert failure.message_data == queued["failing"]
# --- poison rows: never stop the mail behind them ---------------------------------------


class BrokenRecipients(EmailMessage):
    """A project's message class whose recipients() raises."""

    def recipients(self):
        raise RuntimeError("recipients exploded")


class EvilPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _missing_attribute():
    email = EmailMessage("no to", "b", "f@example.com", ["t@example.com"])
    del email.__dict__["to"]
    return email


def _unrenderable():
    email = EmailMessage("no body", "b", "f@example.com", ["t@example.com"])
    del email.__dict__["body"]
    return email


def _newline_filename():
    email = EmailMessage("bad filename", "b", "f@example.com", ["t@example.com"])
    email.attach("evil\nname.txt", "x", "text/plain")
    return email


POISON = {
    "dict": ({"subject": "not a message"}, "not an email message"),
    "string": ("just a string", "not an email message"),
    "missing attribute": (_missing_attribute, "broken"),
    "recipients raises": (
        lambda: BrokenRecipients("S", "b", "f@example.com", ["t@example.com"]),
        "recipients exploded",
    ),
}


def _store_raw(obj, priority=PRIORITY_HIGH):
    from mailer.models import email_to_db

    data = email_to_db(obj() if callable(obj) else obj)
    # bulk_create: no save(), so nothing checks the row on the way in.
    return Message.objects.bulk_create([Message(message_data=data, priority=priority)])[0]


@pytest.mark.parametrize("kind", POISON)
def test_poison_row_is_logged_and_the_mail_behind_goes(kind, settings, smtp_settings,
                                                       smtp_server, caplog):
    settings.MAILER_PICKLE_ALLOWLIST = ["tests.test_engine.BrokenRecipients"]
    settings.MAILER_MESSAGE_CLASSES = ["tests.test_engine.BrokenRecipients"]
    obj, reason = POISON[kind]
    _store_raw(obj)
    queue(3)
    result = send_all()
    assert result.sent == 3
    assert result.failed == 1
    assert len(smtp_server.messages) == 3
    assert not Message.objects.exists()
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert reason in failure.log_message
    assert failure.message_data  # kept for a person to look at
    assert "moved to the log as a failure" in caplog.text


def test_crafted_pickle_is_never_executed(tmp_path, settings, smtp_settings, smtp_server):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # the row is a pickle
    marker = tmp_path / "pwned"
    _store_raw(EvilPayload(str(marker)))
    queue(2)
    result = send_all()
    assert not marker.exists()
    assert result.sent == 2 and result.failed == 1
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert "system" in failure.log_message and "MAILER_PICKLE_ALLOWLIST" in failure.log_message


# Django < 6.1 raises BadHeaderError (a ValueError), 6.1 the email package's ValueError.
@pytest.mark.parametrize("make,error", [(_newline_filename, "ValueError"),
                                        (_unrenderable, "AttributeError")])
def test_send_time_error_defers_and_the_pass_goes_on(make, error, smtp_settings,
                                                     smtp_server):
    _store_raw(make)
    queue(2)
    with pytest.raises((ValueError, AttributeError)) as raised:
        send_all()
    # The unexpected error is reported after the pass, not instead of it.
    assert isinstance(raised.value, {"ValueError": ValueError,
                                     "AttributeError": AttributeError}[error])
    assert len(smtp_server.messages) == 2
    deferred = Message.objects.get()
    assert deferred.priority == PRIORITY_DEFERRED
    assert type(raised.value).__name__ in MessageLog.objects.get(result=RESULT_FAILURE).log_message
    # After retry_deferred it is deferred again, and still blocks nothing.
    Message.objects.retry_deferred()
    queue(1)
    with pytest.raises((ValueError, AttributeError)):
        send_all()
    assert len(smtp_server.messages) == 3


def test_partial_refusal_is_logged_with_the_replies(smtp_settings, smtp_server, caplog):
    smtp_server.refuse = {"bob@example.com": "550 5.1.1 no such user bob"}
    mailer.send_mail("S", "b", "f@example.com",
                     ["alice@example.com", "bob@example.com", "carol@example.com"])
    result = send_all()
    assert result.sent == 1
    assert smtp_server.messages[0]["to"] == ["alice@example.com", "carol@example.com"]
    entry = MessageLog.objects.get()
    assert entry.result == RESULT_SUCCESS
    assert "bob@example.com (550 5.1.1 no such user bob)" in entry.log_message
    assert "alice" not in entry.log_message
    assert "Refused by the server for some recipients" in caplog.text
    # The next message on the same connection starts with a clean slate.
    mailer.send_mail("S2", "b", "f@example.com", ["alice@example.com"])
    send_all()
    assert MessageLog.objects.get(subject_text="S2").log_message == ""


# --- a provider that accepts and never answers ---------------------------------------------


def test_silent_server_defers_within_the_timeout(settings, smtp_settings, silent_server,
                                                 smtp_server):
    import time

    if hasattr(settings, "MAILERS"):
        settings.MAILERS = {**settings.MAILERS, "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": silent_server.port, "timeout": 1}}}
    else:
        settings.EMAIL_PORT = silent_server.port
        settings.EMAIL_TIMEOUT = 1
    queue(3)
    started = time.monotonic()
    result = send_all()
    # One timeout, not one per message: the pass stops, the rest stays queued.
    assert time.monotonic() - started < 5
    assert result.deferred == 1
    assert "timed out" in MessageLog.objects.get(result=RESULT_FAILURE).log_message
    assert Message.objects.non_deferred().count() == 2


def test_statements_per_sent_message(smtp_settings, smtp_server):
    """The drain's round trips: a claim, then the log entry and the delete
    (one statement on PostgreSQL), in the message's one transaction."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    queue(5)
    with CaptureQueriesContext(connection) as captured:
        assert send_all().sent == 5
    statements = [q["sql"] for q in captured if q["sql"] not in ("BEGIN", "COMMIT")]
    per_message = 2 if connection.vendor == "postgresql" else 3
    # + the don't-send list once, + the claim that finds the queue empty,
    # + the one look per pass for routes paused by their provider.
    assert len(statements) == 5 * per_message + 3, statements
    assert sum("mailer_routequota" in sql for sql in statements) == 1
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 5
    assert not Message.objects.exists()
