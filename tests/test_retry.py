"""mailer/retry.py: the automatic retry policy and ``send_at``, against a real SMTP server.

Delays are set short through the settings (time itself is never patched);
timings are asserted as ranges.
"""

import datetime as dt
import smtplib
import time
import zoneinfo

import pytest
from django.core.mail import EmailMessage
from django.utils import timezone

import mailer
from mailer import retry
from mailer.backend import DbBackend
from mailer.engine import has_sendable, seconds_until_due, send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Scheduler slack: passes are polled every POLL seconds.
POLL = 0.02
SLACK = 0.6


def queue_one(to=("to@example.com",), **kwargs):
    assert mailer.send_mail("Subject", "Body", "from@example.com", list(to), **kwargs) == 1
    return Message.objects.latest("id")


def run_until_sent(timeout: float = 10) -> None:
    """Run passes until the queue (deferred included) is empty."""
    deadline = time.monotonic() + timeout
    while Message.objects.exists():
        assert time.monotonic() < deadline, list(Message.objects.values())
        send_all()
        time.sleep(POLL)


def failures() -> list[str]:
    return list(
        MessageLog.objects.filter(result=RESULT_FAILURE).order_by("id").values_list(
            "log_message", flat=True
        )
    )


@pytest.fixture
def auto_retry(settings, smtp_settings):
    settings.MAILER_AUTO_RETRY = True
    settings.MAILER_RETRY_DELAY = 0.3
    settings.MAILER_RETRY_DELAY_MAX = 10
    return settings


# --- the policy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, expected",
    [
        (smtplib.SMTPDataError(451, b"try later"), retry.TRANSIENT),
        (smtplib.SMTPDataError(554, b"rejected"), retry.PERMANENT),
        (smtplib.SMTPSenderRefused(550, b"no", "f@example.com"), retry.PERMANENT),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), retry.TRANSIENT),
        (smtplib.SMTPRecipientsRefused({"a@x": (550, b"no such user")}), retry.PERMANENT),
        (
            smtplib.SMTPRecipientsRefused({"a@x": (550, b"no"), "b@x": (451, b"later")}),
            retry.TRANSIENT,
        ),
        (smtplib.SMTPServerDisconnected("gone"), retry.TRANSIENT),
        (ConnectionRefusedError(111, "refused"), retry.TRANSIENT),
        (TimeoutError("timed out"), retry.TRANSIENT),
    ],
    ids=["451", "554", "sender-550", "auth-535", "all-550", "550+451", "dropped", "refused",
         "timeout"],
)
def test_classify(exc, expected):
    assert retry.classify(exc) == expected


def test_next_delay_doubles_with_up_to_ten_percent_jitter_and_a_cap(settings):
    settings.MAILER_RETRY_DELAY = 60
    settings.MAILER_RETRY_DELAY_MAX = 3600
    for attempts, full in [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (50, 3600),
                           (10_000, 3600)]:
        samples = [retry.next_delay(attempts) for _ in range(300)]
        assert all(0.9 * full <= d <= full for d in samples), (attempts, min(samples))
        assert max(samples) - min(samples) > 0.05 * full  # really random
    assert retry.next_delay(1, rand=lambda: 0.0) == 60
    assert retry.next_delay(1, rand=lambda: 1.0) == pytest.approx(54)


# --- send_all with MAILER_AUTO_RETRY ------------------------------------------------


def test_transient_failures_are_retried_when_due_with_growing_delays(auto_retry, smtp_server):
    auto_retry.MAILER_RETRY_DELAY = 0.5
    smtp_server.fail_first = 3  # 451, 451, 451, then 250
    msg = queue_one()
    result = send_all()
    assert result.deferred == 1
    msg.refresh_from_db()
    assert msg.priority == PRIORITY_DEFERRED
    wait = (msg.not_before - timezone.now()).total_seconds()
    assert 0.45 - SLACK <= wait <= 0.5
    # Not due yet: a pass leaves it alone (and says nothing is sendable).
    assert send_all().attempted == 0
    assert not has_sendable()
    assert 0 <= seconds_until_due() <= 0.5
    run_until_sent()
    assert len(smtp_server.messages) == 1
    assert smtp_server.attempts == 4
    notes = failures()
    assert len(notes) == 3
    for n, note in enumerate(notes, start=1):
        assert "451" in note and "transient: retry at " in note and f"(attempt {n})" in note
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 1
    # Delays 0.45-0.5, 0.9-1, 1.8-2 s (plus the polling slack).
    times = smtp_server.attempt_times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for gap, full in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert 0.9 * full - 0.01 <= gap <= full + SLACK, gaps


def test_a_retried_message_comes_back_at_medium_priority_counted(auto_retry, smtp_server):
    smtp_server.fail_first = 1
    msg = queue_one(priority=PRIORITY_HIGH)
    send_all()
    time.sleep(0.35)
    assert Message.objects.release_due_retries() == 1
    msg.refresh_from_db()
    assert (msg.priority, msg.retry_count, msg.not_before) == (PRIORITY_MEDIUM, 1, None)
    assert send_all().sent == 1


def test_every_recipient_refused_550_is_permanent_and_not_retried(auto_retry, smtp_server):
    smtp_server.refuse = {
        "gone@example.com": "550 5.1.1 No such user",
        "old@example.com": "550 5.1.1 No such user",
    }
    msg = queue_one(to=("gone@example.com", "old@example.com"))
    assert send_all().deferred == 1
    msg.refresh_from_db()
    assert (msg.priority, msg.not_before) == (PRIORITY_DEFERRED, None)
    assert failures()[0].endswith("permanent: not retried")
    time.sleep(0.7)
    assert not has_sendable() and seconds_until_due() is None
    assert send_all().attempted == 0
    assert len(failures()) == 1
    assert Message.objects.waiting_for_operator().count() == 1


def test_some_recipients_refused_550_is_sent_to_the_others(auto_retry, smtp_server):
    smtp_server.refuse = {"gone@example.com": "550 5.1.1 No such user"}
    queue_one(to=("gone@example.com", "here@example.com"))
    assert send_all().sent == 1
    assert smtp_server.messages[0]["to"] == ["here@example.com"]
    log = MessageLog.objects.get()
    assert log.result == RESULT_SUCCESS and "gone@example.com (550" in log.log_message


def test_550_and_451_mixed_is_transient(auto_retry, smtp_server):
    smtp_server.refuse = {"gone@example.com": "550 No such user", "busy@example.com": "451 Later"}
    queue_one(to=("gone@example.com", "busy@example.com"))
    send_all()
    assert "transient: retry at" in failures()[0]
    assert Message.objects.retrying().count() == 1


def test_data_554_is_permanent(auto_retry, smtp_server):
    smtp_server.fail_with = "554 5.7.1 Message rejected"
    queue_one()
    send_all()
    assert failures()[0].endswith("permanent: not retried")


def test_server_down_is_transient(auto_retry, smtp_server):
    from tests.conftest import free_port
    from tests.settings import smtp_mailers

    port = free_port()  # nothing listens there
    if hasattr(auto_retry, "MAILER_USING"):
        auto_retry.MAILERS = smtp_mailers(port)
    else:
        auto_retry.EMAIL_PORT = port
    queue_one()
    send_all()
    assert "Connection refused" in failures()[0] and "transient: retry at" in failures()[0]


def test_max_retries_caps_automatic_retries(auto_retry, smtp_server):
    auto_retry.MAILER_EMAIL_MAX_RETRIES = 2
    auto_retry.MAILER_RETRY_DELAY = 0.1
    smtp_server.fail_first = 100
    msg = queue_one()
    deadline = time.monotonic() + 10
    while not Message.objects.waiting_for_operator().exists():
        assert time.monotonic() < deadline
        send_all()
        time.sleep(POLL)
    notes = failures()
    assert len(notes) == 3
    assert notes[-1].endswith("gave up after 3 attempts (MAILER_EMAIL_MAX_RETRIES=2)")
    time.sleep(0.5)
    send_all()
    assert smtp_server.attempts == 3
    msg.refresh_from_db()
    assert (msg.priority, msg.retry_count, msg.not_before) == (PRIORITY_DEFERRED, 2, None)


def test_give_up_age(auto_retry, smtp_server):
    auto_retry.MAILER_RETRY_GIVE_UP_AFTER = 3600
    smtp_server.fail_first = 100
    msg = queue_one()
    Message.objects.update(when_added=timezone.now() - dt.timedelta(hours=2))
    send_all()
    msg.refresh_from_db()
    assert (msg.priority, msg.not_before) == (PRIORITY_DEFERRED, None)
    assert "gave up after 1 attempts / 2.0 hours (MAILER_RETRY_GIVE_UP_AFTER=3600)" in failures()[0]
    auto_retry.MAILER_RETRY_GIVE_UP_AFTER = None  # never: a young message is retried
    queue_one()
    Message.objects.non_deferred().update(when_added=timezone.now() - dt.timedelta(days=30))
    send_all()
    assert "transient: retry at" in failures()[1]


def test_retry_deferred_still_moves_every_deferred_message_back_now(auto_retry, smtp_server):
    smtp_server.refuse = {"gone@example.com": "550 No such user"}
    queue_one(to=("gone@example.com",))  # permanent
    smtp_server.fail_first = 1
    auto_retry.MAILER_RETRY_DELAY = 3600
    auto_retry.MAILER_RETRY_DELAY_MAX = 3600
    queue_one()  # transient, retry in an hour
    send_all()
    assert Message.objects.retrying().count() == 1
    assert Message.objects.waiting_for_operator().count() == 1
    assert Message.objects.retry_deferred() == 2
    assert list(Message.objects.values_list("priority", "retry_count", "not_before")) == [
        (PRIORITY_MEDIUM, 1, None)
    ] * 2
    smtp_server.refuse = {}
    assert send_all().sent == 2


def test_auto_retry_off_defers_as_before(smtp_settings, smtp_server):
    smtp_server.fail_first = 1
    msg = queue_one()
    send_all()
    msg.refresh_from_db()
    assert (msg.priority, msg.not_before) == (PRIORITY_DEFERRED, None)
    assert "retry at" not in failures()[0] and "451" in failures()[0]
    assert not has_sendable() and seconds_until_due() is None
    assert send_all().attempted == 0


def deferring_handler(connection, message, exc):
    message.defer()
    MessageLog.objects.log(message, RESULT_FAILURE, log_message=f"custom: {exc}")
    return None, "deferred"


def test_a_custom_error_handler_keeps_its_contract(auto_retry, smtp_server):
    auto_retry.MAILER_ERROR_HANDLER = "tests.test_retry.deferring_handler"
    smtp_server.fail_first = 1
    queue_one()
    send_all()
    assert failures()[0].startswith("custom: ")
    assert Message.objects.waiting_for_operator().count() == 1  # not retried automatically


# --- send_at -----------------------------------------------------------------------


def test_scheduled_message_is_not_sent_before_its_time(smtp_settings, smtp_server):
    send_at = timezone.now() + dt.timedelta(seconds=2)
    msg = queue_one(send_at=send_at)
    assert msg.not_before == send_at
    assert Message.objects.scheduled().count() == 1
    assert send_all().attempted == 0
    assert not has_sendable()
    assert 0 <= seconds_until_due() <= 2
    while timezone.now() < send_at:
        time.sleep(POLL)
    assert has_sendable()
    assert send_all().sent == 1
    assert smtp_server.attempt_times[0] >= send_at.timestamp()


def test_send_at_forms(smtp_settings):
    now = timezone.now()
    tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")
    with timezone.override(tokyo):
        naive = (now + dt.timedelta(hours=1)).astimezone(tokyo).replace(tzinfo=None)
        assert retry.not_before_from(naive) == (now + dt.timedelta(hours=1))
        tomorrow = (now + dt.timedelta(days=1)).astimezone(tokyo).date()
        assert retry.not_before_from(tomorrow) == dt.datetime.combine(tomorrow, dt.time(), tokyo)
    stamp = now.timestamp() + 60
    assert retry.not_before_from(stamp) == dt.datetime.fromtimestamp(stamp, dt.timezone.utc)
    assert retry.not_before_from(now - dt.timedelta(seconds=1)) is None  # past: now
    assert retry.not_before_from(None) is None
    with pytest.raises(TypeError, match="send_at must be"):
        mailer.send_mail("S", "B", "f@example.com", ["t@example.com"], send_at="tomorrow")
    assert not Message.objects.exists()


def test_send_html_mail_send_at(smtp_settings):
    later = timezone.now() + dt.timedelta(minutes=5)
    mailer.send_html_mail("S", "B", "<p>B</p>", "f@example.com", ["t@example.com"], send_at=later)
    assert Message.objects.get().not_before == later


def test_dbbackend_takes_anymails_send_at_attribute(smtp_settings):
    later = timezone.now() + dt.timedelta(minutes=5)
    email = EmailMessage("S", "B", "f@example.com", ["t@example.com"])
    email.send_at = later
    assert DbBackend().send_messages([email]) == 1
    row = Message.objects.get()
    assert row.not_before == later
    assert email.send_at == later  # the caller's object is left alone
    # The stored form drops it, so a sending backend that reads send_at
    # (anymail's) doesn't schedule it again.
    assert not hasattr(row.email, "send_at")
    assert Message.objects.scheduled().count() == 1


def test_retry_action_and_requeue_send_now_whatever_the_time(smtp_settings, smtp_server):
    msg = queue_one(send_at=timezone.now() + dt.timedelta(hours=1))
    msg.requeue()
    assert send_all().sent == 1


def test_a_232_worker_still_queues_and_claims_without_the_column(smtp_settings, smtp_server):
    """Rolling upgrade: 2.3.2 inserts and reads rows naming only its own
    columns; the new column is nullable, so that works, and such a row is due."""
    from django.db import connection

    from mailer.models import email_to_db

    email = EmailMessage("from 2.3.2", "b", "f@example.com", ["t@example.com"])
    table = connection.ops.quote_name(Message._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (message_data, when_added, priority, retry_count) "
            "VALUES (%s, %s, %s, %s)",
            [email_to_db(email), connection.ops.adapt_datetimefield_value(timezone.now()), 2, 0],
        )
        cursor.execute(f"SELECT id, message_data, priority FROM {table} WHERE priority < 4")
        assert len(cursor.fetchall()) == 1
    assert Message.objects.get().not_before is None
    assert send_all().sent == 1
    assert smtp_server.subjects() == ["from 2.3.2"]


def test_with_concurrency_scheduled_and_retried_messages_are_sent_once(auto_retry, smtp_server):
    """MAILER_CONCURRENCY shares the one claim: the due filter holds per lane."""
    auto_retry.MAILER_CONCURRENCY = 3
    smtp_server.fail_first = 3
    for i in range(6):
        mailer.send_mail(f"S{i}", "b", "f@example.com", [f"t{i}@example.com"])
    later = timezone.now() + dt.timedelta(seconds=3)
    mailer.send_mail("scheduled", "b", "f@example.com", ["t@example.com"], send_at=later)
    first = send_all()
    assert (first.sent, first.deferred) == (3, 3)
    run_until_sent()
    subjects = smtp_server.subjects()
    assert sorted(subjects) == sorted([f"S{i}" for i in range(6)] + ["scheduled"])
    arrived = dict(zip(subjects, smtp_server.attempt_times[3:], strict=True))
    assert arrived["scheduled"] >= later.timestamp()


def test_without_use_tz(settings, smtp_settings, smtp_server):
    """USE_TZ = False: naive times throughout, in the current time zone."""
    settings.USE_TZ = False
    settings.MAILER_AUTO_RETRY = True
    settings.MAILER_RETRY_DELAY = 600
    smtp_server.fail_first = 1
    later = dt.datetime.now() + dt.timedelta(minutes=5)
    queue_one(send_at=later)
    assert Message.objects.get().not_before == later
    assert send_all().attempted == 0
    Message.objects.update(not_before=None)
    send_all()
    assert "transient: retry at " in failures()[0]
    retry_at = Message.objects.get().not_before
    assert timezone.is_naive(retry_at)
    assert 540 - 5 <= (retry_at - dt.datetime.now()).total_seconds() <= 600


def test_dbbackend_batch_keeps_each_messages_send_at(smtp_settings):
    """Several messages in one call (one multi-row INSERT): each keeps its own time."""
    now = timezone.now()
    emails = []
    for minutes in (None, 5, 10):
        email = EmailMessage(f"in {minutes}", "B", "f@example.com", ["t@example.com"])
        if minutes is not None:
            email.send_at = now + dt.timedelta(minutes=minutes)
        emails.append(email)
    assert DbBackend().send_messages(emails) == 3
    rows = dict(Message.objects.values_list("subject_text", "not_before"))
    assert rows == {
        "in None": None,
        "in 5": now + dt.timedelta(minutes=5),
        "in 10": now + dt.timedelta(minutes=10),
    }


@pytest.mark.parametrize(
    "use_tz, send_at",
    [
        # Aware, at the end of the calendar, moved into the current zone (UTC+1).
        (False, dt.datetime.max.replace(tzinfo=dt.timezone.utc)),
        # Naive in a zone behind UTC: stored in UTC, past the end of the calendar.
        (True, dt.datetime.max),
        # A timestamp no datetime can hold.
        (True, 1e20),
    ],
)
def test_send_at_past_the_end_of_the_calendar_is_a_valueerror(settings, use_tz, send_at):
    """Was an OverflowError (aware year 9999 with USE_TZ = False)."""
    settings.USE_TZ = use_tz
    settings.TIME_ZONE = "Europe/Paris" if not use_tz else "America/New_York"
    with pytest.raises(ValueError, match=r"^send_at .* can't be used"):
        mailer.send_mail("S", "B", "f@example.com", ["t@example.com"], send_at=send_at)
    assert not Message.objects.exists()
    settings.USE_TZ = True
    far = dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)  # still fine
    assert mailer.send_mail("S", "B", "f@example.com", ["t@example.com"], send_at=far) == 1
