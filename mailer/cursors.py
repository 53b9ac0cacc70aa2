"""One DB-API cursor per database connection, kept for the hot statements.

``connection.cursor()`` makes a new DB-API cursor every time (with psycopg 3,
a cursor and a copy of the connection's adapters: about 60 µs, a quarter of
a one-row INSERT's round trip). The per-message statements (a ``send_mail``
call's INSERT, the worker's claim and record) use :func:`kept_cursor`
instead: the same cursor for as long as Django's connection object holds the
same DB-API connection, wrapped as ``connection.cursor()`` wraps it (errors
become Django's, ``execute_wrapper()`` hooks and the query log still see
every statement). It is never closed by its users: it goes with its
connection. On SQLite every call gets a new cursor (see :func:`kept_cursor`).
"""

from __future__ import annotations

from typing import Any

_KEPT = "_mailer_kept_cursor"

__all__ = ["kept_cursor"]


def kept_cursor(connection: Any) -> Any:
    """A cursor on ``connection`` (this thread's Django connection), wrapped
    like ``connection.cursor()``'s; don't close it."""
    if connection.vendor == "sqlite":
        # A new sqlite3 cursor costs next to nothing, and one kept with an
        # unfinished SELECT would hold the database's shared lock against
        # every other connection: a new one each time, closed when dropped.
        return connection.cursor()
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    raw = connection.connection
    kept = connection.__dict__.get(_KEPT)
    if kept is None or kept[0] is not raw:
        with connection.wrap_database_errors:
            kept = (raw, connection.create_cursor())
        connection.__dict__[_KEPT] = kept
    connection.validate_thread_sharing()
    if connection.queries_logged:
        return connection.make_debug_cursor(kept[1])
    return connection.make_cursor(kept[1])
