"""mailer/monitoring.py: mailer.status(message_id), the queue summary, outcomes per hour."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core.mail import EmailMessage
from django.db import connection
from django.utils import timezone

import mailer
from mailer.backend import DbBackend
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
)
from mailer.monitoring import hourly_outcomes, message_status, queue_summary

pytestmark = pytest.mark.django_db(transaction=True)


def queue_one(subject="Hello", to="to@example.com", **kwargs) -> str:
    email = EmailMessage(subject, "body", "from@example.com", [to])
    DbBackend(**kwargs).send_messages([email])
    return email.extra_headers["Message-ID"]


def status_in_two_queries(message_id, django_assert_max_num_queries):
    with django_assert_max_num_queries(2):
        return mailer.status(message_id)


# --- mailer.status --------------------------------------------------------------------


def test_never_queued_is_none(django_assert_max_num_queries):
    queue_one()
    assert status_in_two_queries("<unknown@example.com>", django_assert_max_num_queries) is None
    assert mailer.status("") is None


@pytest.mark.parametrize("odd", ["\x00", "<a\x00b@example.com>", "x" * 2000, "<\udcff@x>"])
def test_any_string_that_matches_nothing_is_none(odd):
    queue_one()
    assert mailer.status(odd) is None


def test_sent_to_some_recipients_tells_who_was_refused(smtp_settings, smtp_server):
    email = EmailMessage("Hi", "b", "from@example.com", ["ok@example.com", "gone@example.com"])
    DbBackend().send_messages([email])
    message_id = email.extra_headers["Message-ID"]
    smtp_server.refuse = {"gone@example.com": "550 5.1.1 no such user"}
    assert send_all().sent == 1
    st = mailer.status(message_id)
    assert st.state == "sent" and st.error is None
    assert st.refused is not None
    assert "gone@example.com" in st.refused and "550" in st.refused
    assert "no such user" in st.refused and "ok@example.com" not in st.refused


def test_every_state_transition(smtp_settings, smtp_server, django_assert_max_num_queries):
    message_id = queue_one()
    before = timezone.now()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert (st.state, st.attempts, st.last_attempt, st.next_attempt, st.error) == (
        "queued",
        0,
        None,
        None,
        None,
    )
    assert st.message_id == message_id and st.priority == PRIORITY_MEDIUM and not st.done

    # queued -> deferred (a 4xx reply)
    smtp_server.fail_with = "451 4.3.0 mailbox busy"
    send_all()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert st.state == "deferred" and st.attempts == 1 and st.priority == PRIORITY_DEFERRED
    assert "451" in st.error and "mailbox busy" in st.error
    assert st.last_attempt >= before

    # deferred -> queued again (retry_deferred): the last error is still told
    Message.objects.retry_deferred()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert st.state == "queued" and st.attempts == 1 and "mailbox busy" in st.error

    # -> deferred once more, then sent
    send_all()
    assert mailer.status(message_id).attempts == 2
    Message.objects.retry_deferred()
    smtp_server.fail_with = None
    send_all()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert (st.state, st.attempts, st.error, st.next_attempt) == ("sent", 3, None, None)
    assert st.priority is None and st.done
    assert st.last_attempt == MessageLog.objects.latest("id").when_attempted


def test_failed(smtp_settings, smtp_server, django_assert_max_num_queries):
    message_id = queue_one()
    Message.objects.update(message_data="damaged")
    send_all()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert st.state == "failed" and st.attempts == 1 and st.done
    assert st.error.startswith("Could not decode the stored message")


def test_dont_send(smtp_settings, smtp_server, django_assert_max_num_queries):
    DontSendEntry.objects.create(to_address="to@example.com")
    message_id = queue_one()
    send_all()
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert (st.state, st.attempts, st.error) == ("dont_send", 0, None)
    assert st.last_attempt is not None


def test_requeued_from_the_log_is_queued_again(smtp_settings, smtp_server):
    message_id = queue_one()
    send_all()
    assert mailer.status(message_id).state == "sent"
    # The admin's requeue keeps the Message-ID: the newest queue row wins.
    log = MessageLog.objects.get()
    mailer.send_mail("x", "y", "from@example.com", ["other@example.com"])  # another message
    from mailer.models import queue_emails

    queue_emails([log.email])
    st = mailer.status(message_id)
    assert st.state == "queued" and st.attempts == 1 and st.error is None


@pytest.mark.postgres
def test_status_queries_use_the_message_id_indexes():
    now = timezone.now()
    with connection.cursor() as cursor:
        for table in ("mailer_message", "mailer_messagelog"):
            extra = ", result, log_message, when_attempted" if table.endswith("log") else ""
            values = ", '1', '', now()" if table.endswith("log") else ""
            cursor.execute(
                f"INSERT INTO {table} (message_data, when_added, priority, message_id{extra}"
                + (", retry_count" if not extra else "")
                + f") SELECT '', %s, 2, '<' || i || '@example.com>'{values}"
                + (", 0" if not extra else "")
                + " FROM generate_series(1, 20000) AS i",
                [now],
            )
            cursor.execute(f"ANALYZE {table}")
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        st = mailer.status("<777@example.com>")
    assert st.state == "queued" and st.attempts == 1
    with connection.cursor() as cursor:
        for query in queries.captured_queries:
            cursor.execute("EXPLAIN " + query["sql"])
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan" not in plan, plan
            assert "message_id" in plan, plan


# --- the queue summary ---------------------------------------------------------------


def make_log(when, result, priority=PRIORITY_MEDIUM):
    return MessageLog(
        message_data=None,
        when_added=when,
        when_attempted=when,
        priority=priority,
        result=result,
        log_message="",
        message_id=f"<{when.timestamp()}.{result}.{priority}@example.com>",
    )


def test_queue_summary(django_assert_max_num_queries):
    now = timezone.now()
    queue_one("h", priority=PRIORITY_HIGH)
    queue_one("m")
    queue_one("l", priority=PRIORITY_LOW)
    queue_one("d")
    Message.objects.filter(subject_text="d").update(priority=PRIORITY_DEFERRED)
    Message.objects.filter(subject_text="l").update(when_added=now - dt.timedelta(seconds=600))
    Message.objects.filter(subject_text="d").update(when_added=now - dt.timedelta(days=2))
    MessageLog.objects.bulk_create(
        [
            make_log(now - dt.timedelta(minutes=5), RESULT_SUCCESS),
            make_log(now - dt.timedelta(minutes=6), RESULT_FAILURE, PRIORITY_DEFERRED),
            make_log(now - dt.timedelta(minutes=7), RESULT_FAILURE),
            make_log(now - dt.timedelta(hours=3), RESULT_SUCCESS),
            make_log(now - dt.timedelta(hours=4), RESULT_DONT_SEND),
            make_log(now - dt.timedelta(days=3), RESULT_SUCCESS),
        ]
    )
    with django_assert_max_num_queries(3):
        summary = queue_summary(now)
    assert (summary.queued, summary.scheduled, summary.deferred) == (3, 0, 1)
    assert summary.deferred_waiting == 1
    assert summary.by_priority == {"high": 1, "medium": 1, "low": 1, "deferred": 1}
    assert 600 <= summary.oldest_queued_seconds < 620
    assert 2 * 86400 <= summary.oldest_deferred_seconds < 2 * 86400 + 20
    assert summary.last_success_seconds == 300
    assert summary.last_hour == {"sent": 1, "deferred": 1, "failed": 1, "dont_send": 0}
    assert summary.last_day == {"sent": 2, "deferred": 1, "failed": 1, "dont_send": 1}
    data = summary.as_dict()
    for key in ("queued", "scheduled", "deferred", "oldest_queued_seconds"):
        assert isinstance(data[key], int)


def test_empty_queue_summary():
    summary = queue_summary()
    assert (summary.queued, summary.scheduled, summary.deferred) == (0, 0, 0)
    assert summary.oldest_queued_seconds is None and summary.last_success is None
    assert summary.as_dict()["oldest_queued_seconds"] is None


def test_hourly_outcomes_in_one_query(django_assert_num_queries):
    now = timezone.now().replace(minute=30)
    MessageLog.objects.bulk_create(
        [
            make_log(now, RESULT_SUCCESS),
            make_log(now - dt.timedelta(minutes=1), RESULT_SUCCESS),
            make_log(now - dt.timedelta(hours=1), RESULT_FAILURE, PRIORITY_DEFERRED),
            make_log(now - dt.timedelta(hours=47), RESULT_FAILURE),
            make_log(now - dt.timedelta(hours=48), RESULT_SUCCESS),  # outside the window
        ]
    )
    with django_assert_num_queries(1):
        hours = hourly_outcomes(48, now=now)
    assert len(hours) == 48
    starts = [start for start, _ in hours]
    assert starts == sorted(starts) and starts[-1] <= now < starts[-1] + dt.timedelta(hours=1)
    assert hours[-1][1] == {"sent": 2, "deferred": 0, "failed": 0, "dont_send": 0}
    assert hours[-2][1]["deferred"] == 1
    assert hours[0][1]["failed"] == 1
    assert sum(sum(counts.values()) for _, counts in hours) == 4


def test_message_status_on_another_database_alias_argument():
    message_id = queue_one()
    assert message_status(message_id, using="default").state == "queued"


def test_scheduled_then_queued(settings, django_assert_max_num_queries):
    send_at = timezone.now() + dt.timedelta(hours=1)
    mailer.send_mail("Later", "b", "from@example.com", ["to@example.com"], send_at=send_at)
    message_id = Message.objects.get().message_id
    st = status_in_two_queries(message_id, django_assert_max_num_queries)
    assert st.state == "scheduled" and st.next_attempt == send_at and st.attempts == 0
    summary = queue_summary()
    assert (summary.queued, summary.scheduled) == (0, 1)
    assert summary.oldest_queued_seconds is None  # not late before its time
    # Its time has come: queued, and late only since then.
    Message.objects.update(not_before=timezone.now() - dt.timedelta(seconds=30))
    st = mailer.status(message_id)
    assert st.state == "queued" and st.next_attempt is None
    summary = queue_summary()
    assert (summary.queued, summary.scheduled) == (1, 0)
    assert 30 <= summary.oldest_queued_seconds < 60


def test_deferred_with_an_automatic_retry(settings, smtp_settings, smtp_server):
    settings.MAILER_AUTO_RETRY = True
    smtp_server.fail_with = "451 4.3.0 later"
    message_id = queue_one()
    before = timezone.now()
    send_all()
    st = mailer.status(message_id)
    assert st.state == "deferred" and st.attempts == 1 and "451" in st.error
    assert st.next_attempt is not None and st.next_attempt > before
    summary = queue_summary()
    assert (summary.deferred, summary.deferred_waiting) == (1, 0)  # a retry is planned
    # A permanent failure waits for an operator: no next attempt.
    smtp_server.fail_with = "550 5.1.1 no such user"
    other = queue_one("Permanent", to="gone@example.com")
    send_all()
    st = mailer.status(other)
    assert st.state == "deferred" and st.next_attempt is None
    assert queue_summary().deferred_waiting == 1
