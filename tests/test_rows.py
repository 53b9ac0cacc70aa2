"""mailer.rows: the hot INSERTs, and COPY's text lines on PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.safestring import mark_safe

import mailer
from mailer.models import Message
from mailer.rows import RowInserter, copy_line, copy_lines

# --- copy_line ------------------------------------------------------------------


def test_copy_line_escapes_what_copy_text_format_reserves():
    line = copy_line(["a\\b", "tab\there", "two\nlines\r\n", "plain é", None, 7])
    assert line == "a\\\\b\ttab\\there\ttwo\\nlines\\r\\n\tplain é\t\\N\t7\n"


def test_copy_line_writes_datetimes_in_iso_form():
    aware = dt.datetime(2026, 11, 30, 12, 0, 1, 5, tzinfo=dt.timezone.utc)
    assert copy_line([aware]) == "2026-11-30T12:00:01.000005+00:00\n"


@pytest.mark.parametrize("value", [1.5, b"bytes", dt.date(2026, 1, 1), mark_safe("safe"), True])
def test_copy_line_leaves_other_kinds_to_psycopg(value):
    assert copy_line(["text", value]) is None


def _bulk_like_rows():
    """Rows as a bulk makes them: copies of one list of values (shared
    objects), a few columns set per row."""
    stamp = dt.datetime(2026, 11, 30, 12, 0, 1, tzinfo=dt.timezone.utc)
    base = ["data", stamp, 2, 0, None, "subject", "100% \\N"]
    rows = []
    for i, subject in enumerate(["plain", "tab\there", "50% off", "back\\slash", "two\nlines\r\n"]):
        row = base.copy()
        row[0] = f"payload {i}\n"
        row[5] = subject
        rows.append(row)
    return rows


def test_copy_lines_are_copy_line_of_each_row():
    rows = _bulk_like_rows()
    assert copy_lines(rows) == [copy_line(row) for row in rows]
    # The constant columns' text holds "%": formatted once, never as a format.
    assert copy_lines(rows)[0].split("\t")[-1] == "100% \\\\N\n"


def test_copy_lines_with_one_or_no_varying_column():
    shared = ["same", None, 7]
    same = [shared, shared.copy(), shared.copy()]
    assert copy_lines(same) == [copy_line(shared)] * 3
    one = [["50%", f"subject {i}%s", None] for i in range(3)]
    for row in one[1:]:
        row[0] = one[0][0]
    assert copy_lines(one) == [copy_line(row) for row in one]
    assert copy_lines([]) == []


def test_copy_lines_leave_other_kinds_to_psycopg():
    varying = _bulk_like_rows()
    varying[3][5] = 1.5  # in a column that varies
    assert copy_lines(varying) is None
    constant = _bulk_like_rows()
    for row in constant:
        row[2] = True  # the same object in every row: formatted once
    assert copy_lines(constant) is None


# --- bulk rows, read back -------------------------------------------------------

TRICKY = ["back\\slash", "tab\tin it", "\\N", "ünïcödé ✉", "\\t literal"]


def _queue_tricky(extra=()):
    emails = [
        EmailMessage(subject, f"body {i}\n\\ \t end", "from@example.com", [f"r{i}@example.com"])
        for i, subject in enumerate(TRICKY)
    ]
    emails.extend(extra)
    return emails, mail.get_connection("mailer.backend.DbBackend").send_messages(emails)


def _assert_stored_as_given(emails):
    rows = list(Message.objects.order_by("id"))
    assert [r.subject_text for r in rows] == [str(e.subject) for e in emails]
    assert [r.email.subject for r in rows] == [str(e.subject) for e in emails]
    assert [r.email.body for r in rows] == [e.body for e in emails]
    assert [r.recipients for r in rows] == ["\n".join(e.to + e.cc + e.bcc) for e in emails]
    assert [r.message_id for r in rows] == [e.extra_headers["Message-ID"] for e in emails]


@pytest.mark.django_db
def test_bulk_rows_keep_every_character():
    emails, sent = _queue_tricky(
        [EmailMessage("two people", "b", "from@example.com", ["a@example.com", "b@example.com"])]
    )
    assert sent == len(emails)
    _assert_stored_as_given(emails)


@pytest.mark.django_db
def test_a_row_of_another_kind_in_the_bulk_keeps_the_order():
    """A message whose values COPY's text lines don't cover (a SafeString
    subject) is written by the driver's own adaptation, in its place."""
    odd = EmailMessage(mark_safe("safe <b>subject</b>"), "b", "from@example.com", ["s@example.com"])
    emails, sent = _queue_tricky([odd])
    assert sent == len(emails)
    _assert_stored_as_given(emails)


@pytest.mark.django_db
def test_scheduled_bulk_rows_store_their_time():
    when = timezone.now() + dt.timedelta(hours=2)
    emails = [
        EmailMessage(f"later {i}", "b", "from@example.com", [f"r{i}@example.com"]) for i in range(3)
    ]
    assert mailer.models.queue_emails(emails, send_at=when) == 3
    stored = list(Message.objects.order_by("id").values_list("not_before", flat=True))
    assert stored == [when] * 3


@pytest.mark.postgres
@pytest.mark.django_db
def test_bulk_on_postgresql_is_one_statement():
    """psycopg 3: one COPY; psycopg2: one INSERT ... SELECT FROM unnest()."""
    emails = [EmailMessage(f"s{i}", "b", "f@example.com", [f"r{i}@example.com"]) for i in range(50)]
    with CaptureQueriesContext(connection) as captured:
        assert mail.get_connection("mailer.backend.DbBackend").send_messages(emails) == 50
    statements = [q["sql"] for q in captured.captured_queries if "mailer_message" in q["sql"]]
    assert len(statements) == 1, statements
    if connection.Database.__name__ == "psycopg":
        assert statements[0].startswith("COPY") and statements[0].endswith("-- 50 rows")
    else:
        assert "unnest(" in statements[0]
    assert Message.objects.count() == 50


@pytest.mark.django_db
def test_inserter_prepares_values_as_the_orm_does():
    inserter = RowInserter.for_model(Message, "default")
    now = timezone.now()
    at = inserter.index["when_added"]
    field = Message._meta.get_field("when_added")
    assert inserter.prepare(at, now) == field.get_db_prep_save(now, connection)
    assert inserter.prepare(inserter.index["message_data"], "x") == "x"
    assert inserter.prepare(at, None) is None


# --- what watchers see ------------------------------------------------------------


def _two_and_one():
    bulk = [EmailMessage(f"s{i}", "b", "f@example.com", [f"r{i}@example.com"]) for i in range(2)]
    mailer.models.queue_emails(bulk)
    mailer.send_mail("one", "b", "f@example.com", ["one@example.com"])


@pytest.mark.django_db(transaction=True)
def test_execute_wrappers_and_the_query_log_see_djangos_placeholders():
    """On SQLite, statements nobody watches are written with sqlite3's own
    ``?``; a hook, the query log and assertNumQueries get Django's ``%s``
    (Django formats logged statements with ``%``)."""
    seen = []

    def hook(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(hook):
        _two_and_one()
    inserts = [sql for sql in seen if "mailer_message" in sql and sql.startswith(("INSERT", "COPY"))]
    # With psycopg 3 the bulk is a COPY, which execute_wrapper() doesn't see.
    copied = connection.vendor == "postgresql" and connection.Database.__name__ == "psycopg"
    assert len(inserts) == (1 if copied else 2), seen
    assert all("?" not in sql for sql in inserts)
    with CaptureQueriesContext(connection) as captured:
        _two_and_one()
    logged = [q["sql"] for q in captured.captured_queries if "mailer_message" in q["sql"]]
    assert len(logged) == 2 and all("?" not in sql and "%s" not in sql for sql in logged)
    assert "'one@example.com'" in logged[1]  # formatted with its values
    _two_and_one()  # unwatched
    assert Message.objects.count() == 9
    assert sorted(Message.objects.values_list("subject_text", flat=True)) == sorted(["s0", "s1", "one"] * 3)
