"""mailer/cursors.py: the kept cursor of the per-message statements."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction

from mailer.cursors import kept_cursor
from mailer.models import Message

pytestmark = pytest.mark.django_db(transaction=True)

TABLE = Message._meta.db_table


def test_the_same_cursor_while_the_connection_lasts_and_a_new_one_after():
    first = kept_cursor(connection)
    # SQLite: a new cursor each time (one kept mid-SELECT would hold a lock).
    assert (kept_cursor(connection).cursor is first.cursor) == (connection.vendor != "sqlite")
    first.execute(f"SELECT COUNT(*) FROM {TABLE}")
    assert [tuple(r) for r in first.fetchall()] == [(0,)]
    connection.close()
    second = kept_cursor(connection)  # reconnects, with a cursor of the new connection
    assert second.cursor is not first.cursor
    second.execute(f"SELECT COUNT(*) FROM {TABLE}")
    assert [tuple(r) for r in second.fetchall()] == [(0,)]


def test_statements_are_seen_and_errors_are_djangos():
    seen = []
    connection.ensure_connection()  # MariaDB sets the isolation level on connecting

    def spy(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        kept_cursor(connection).execute(f"SELECT COUNT(*) FROM {TABLE}")
    assert seen == [f"SELECT COUNT(*) FROM {TABLE}"]
    with pytest.raises(IntegrityError), transaction.atomic():
        kept_cursor(connection).execute(
            f"INSERT INTO {TABLE} (message_data) VALUES (%s)", [None]
        )
    cursor = kept_cursor(connection)
    cursor.execute(f"SELECT COUNT(*) FROM {TABLE}")  # still usable
    assert [tuple(r) for r in cursor.fetchall()] == [(0,)]
