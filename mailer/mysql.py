"""MariaDB / MySQL: keep queued rows within the server's ``max_allowed_packet``.

The server refuses a statement bigger than its ``max_allowed_packet`` (16 MB
by default on MariaDB, 64 MB on MySQL 8) and hangs up: the client sees "Got a
packet bigger than 'max_allowed_packet' bytes" or, when the server closes
while the client is still writing, "Server has gone away". Queueing sizes its
rows first: a message too large for one row is a clear error before anything
is sent (the connection and the caller's transaction stay usable), and many
messages are inserted in as many statements as needed to stay under the
limit. Statements under 1 MiB are never checked (no server allows less than
that by default), so the usual small message costs no query.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import OperationalError, connections
from django.db.models import Model

# ER_NET_PACKET_TOO_LARGE (server), CR_NET_PACKET_TOO_LARGE (client library).
PACKET_TOO_LARGE = frozenset({1153, 2020})
# Statements up to this size are sent without asking the server its limit.
CHECK_ABOVE = 1 << 20
# The INSERT's own text, and each row's punctuation and non-text values.
STATEMENT_OVERHEAD = 1024
ROW_OVERHEAD = 256
# Characters the driver escapes with a backslash (each costs one more byte).
_ESCAPED = ("\\", "'", '"', "\n", "\r", "\0", "\x1a")

# The server's limit per open DB-API connection (read once per connection:
# a session's max_allowed_packet is fixed when it connects).
_limits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

BatchFitter = Callable[[int | None], int | None]


def row_size(obj: Model | Sequence[Any]) -> int:
    """About how many bytes a row's values take in an INSERT statement
    (``obj``: a model instance or the list of its values)."""
    size = ROW_OVERHEAD
    if isinstance(obj, Model):
        obj = [getattr(obj, field.attname) for field in obj._meta.concrete_fields]
    for value in obj:
        if isinstance(value, str):
            size += (len(value) if value.isascii() else len(value.encode())) + sum(
                value.count(char) for char in _ESCAPED
            )
    return size


def max_allowed_packet(using: str) -> int:
    """The server's ``max_allowed_packet`` for this connection, in bytes."""
    wrapper = connections[using]
    wrapper.ensure_connection()
    raw = wrapper.connection
    limit = _limits.get(raw)
    if limit is None:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT @@max_allowed_packet")
            limit = int(cursor.fetchone()[0])
        _limits[raw] = limit
    return limit


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


def too_large(size: int, limit: int | None) -> str:
    """The error text for a message that does not fit in one statement."""
    server = (
        f"the database server's max_allowed_packet ({_megabytes(limit)})"
        if limit is not None
        else "the database server's max_allowed_packet"
    )
    return (
        f"The message is too large to queue: stored, it takes about {_megabytes(size)}, "
        f"more than {server}. Raise max_allowed_packet on the MariaDB/MySQL server "
        "(e.g. max_allowed_packet = 64M in the [mysqld] section; connections opened "
        "afterwards use it), or set MAILER_ATTACHMENT_STORAGE so that big attachments "
        "are stored outside the database row. Nothing was queued."
    )


@contextmanager
def packet_limit(using: str, rows: Sequence[Model | Sequence[Any]]) -> Iterator[BatchFitter]:
    """Insert ``rows`` on ``using`` within the server's ``max_allowed_packet``.

    Raises ``ValueError`` naming the setting (and ``MAILER_ATTACHMENT_STORAGE``)
    before anything is sent when one row can't fit. Yields a function that
    caps a bulk insert's batch size so that each statement fits. Should the
    server refuse a statement all the same, its error becomes the same
    ``ValueError`` and the dropped connection is closed, so the next query
    reconnects (inside a transaction, that transaction is lost: the server
    rolled it back). On other databases it does nothing.
    """
    wrapper = connections[using]
    if wrapper.vendor != "mysql" or not rows:
        yield lambda batch_size: batch_size
        return
    sizes = [row_size(row) for row in rows]
    largest = max(sizes)
    total = STATEMENT_OVERHEAD + sum(sizes)
    limit = max_allowed_packet(using) if total > CHECK_ABOVE else None
    if limit is not None and STATEMENT_OVERHEAD + largest > limit:
        raise ValueError(too_large(largest, limit))

    def fit(batch_size: int | None) -> int | None:
        if limit is None or total <= limit:
            return batch_size
        fitting = max(1, (limit - STATEMENT_OVERHEAD) // largest)
        return fitting if batch_size is None else min(batch_size, fitting)

    try:
        yield fit
    except OperationalError as err:
        if not err.args or err.args[0] not in PACKET_TOO_LARGE:
            raise
        wrapper.close()  # the server hung up; the next query reconnects
        raise ValueError(too_large(largest, limit)) from err
