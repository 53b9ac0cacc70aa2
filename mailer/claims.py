"""The pass's claim queries: which queued rows a pass takes, in what order and
under which row locks, and the statements that log a row and take it off the
queue."""

from __future__ import annotations

import logging
from typing import Any

from django.core.mail import EmailMessage
from django.db import connections, transaction
from django.db.models import signals
from django.utils import timezone

from mailer import attachments
from mailer.conf import conf
from mailer.cursors import kept_cursor
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    MessageQuerySet,
    RowInserter,
)

# 2.3.2's logger, which operators' logging configuration and alerts name.
logger = logging.getLogger("mailer.engine")


def _claims_with_row_locks(db_alias: str) -> bool:
    features = connections[db_alias].features
    return connections[db_alias].vendor != "sqlite" and features.has_select_for_update


_MESSAGE_FIELDS = tuple(f.attname for f in Message._meta.concrete_fields)


class _PassQueries:
    """The statements of the send loop, compiled once per pass.

    The claim walks the queue in keyset order: each claim asks for the first
    sendable row after ``(priority, when_added, id)`` of the previous one
    (the very first after priority 0, which precedes every row), passing
    back the database's own ``when_added`` value. Compiling once keeps the
    ORM's per-query cost (about 0.5 ms, ten times the round trip) out of the
    per-message loop; rows still go through the compiler's converters, so
    the instances are exactly what the ORM would build. With signal
    receivers on Message or MessageLog, recording goes through the ORM so
    they still fire.
    """

    FIELDS = _MESSAGE_FIELDS
    KEY = tuple(_MESSAGE_FIELDS.index(name) for name in ("priority", "when_added", "id"))

    def __init__(self, queryset: MessageQuerySet, db: str, lock_rows: bool) -> None:
        self.db = db
        self.connection = connections[db]
        self.queryset = queryset
        self.lock_rows = lock_rows
        self._claim: tuple[Any, ...] | None = None
        quote = self.connection.ops.quote_name
        self.log_inserter = RowInserter.for_model(MessageLog, db)
        table, pk = quote(Message._meta.db_table), quote(Message._meta.pk.column)
        self.delete_sql = f"DELETE FROM {table} WHERE {pk} = %s"
        # PostgreSQL runs both in one statement (data-modifying WITH clauses
        # always run to completion, whether read or not).
        self.record_sql = (
            f"WITH gone AS ({self.delete_sql} RETURNING 1), "
            f"logged AS ({self.log_inserter.sql} RETURNING 1) "
            "SELECT count(*) FROM gone"
            if self.connection.vendor == "postgresql"
            else None
        )
        self.use_orm = False
        # MariaDB/MySQL: the index the claim must walk (FORCE INDEX), so that
        # it locks no row another claim wants (see mailer.routelanes).
        self.index_hint: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Start a pass: recording goes through the ORM if signal receivers
        are connected now."""
        self.use_orm = any(
            signal.has_listeners(MessageLog) for signal in (signals.pre_save, signals.post_save)
        ) or any(
            signal.has_listeners(Message) for signal in (signals.pre_delete, signals.post_delete)
        )

    def first_key(self) -> tuple[Any, ...]:
        return _first_key(self.db)

    def _compile(self) -> tuple[Any, ...]:
        # The keyset (priority, when_added, id), then "due" (not_before: NULL
        # or not after now, passed at each claim): one scan of the
        # sending-order index, not_before checked on the rows it meets.
        markers = (object(), object(), object(), object())
        quote = self.connection.ops.quote_name
        table = quote(Message._meta.db_table)
        cols = ", ".join(f"{table}.{quote(c)}" for c in ("priority", "when_added", "id"))
        not_before = f"{table}.{quote('not_before')}"
        qs = (
            self.queryset.filter(priority__lt=PRIORITY_DEFERRED)
            .extra(
                where=[
                    f"({cols}) > (%s, %s, %s)",
                    f"({not_before} IS NULL OR {not_before} <= %s)",
                ],
                params=list(markers),
            )
            .order_by("priority", "when_added", "id")
        )
        if self.lock_rows:
            skip = self.connection.features.has_select_for_update_skip_locked
            qs = qs.select_for_update(skip_locked=skip)
        compiler = qs.values_list(*self.FIELDS)[:1].query.get_compiler(self.db)
        sql, params = compiler.as_sql()
        if self.index_hint and self.connection.vendor == "mysql":
            table_sql = f"FROM {table}"
            sql = sql.replace(table_sql, f"{table_sql} FORCE INDEX ({quote(self.index_hint)})", 1)
        params = list(params)
        positions = [next(i for i, p in enumerate(params) if p is m) for m in markers]
        converters = compiler.get_converters([col for col, _, _ in compiler.select])
        return sql, params, positions, compiler, converters

    def claim(self, after: tuple[Any, ...]) -> tuple[Message | None, tuple[Any, ...]]:
        """The next sendable message after key ``after``, and its own key.

        With row locks it is locked ``FOR UPDATE SKIP LOCKED`` (inside the
        caller's transaction), so rows other workers hold are passed over.
        """
        if self._claim is None:
            self._claim = self._compile()
        sql, params, positions, compiler, converters = self._claim
        params = list(params)
        now = self.connection.ops.adapt_datetimefield_value(timezone.now())
        for position, value in zip(positions, (*after, now), strict=True):
            params[position] = value
        cursor = kept_cursor(self.connection)
        cursor.execute(sql, params)
        rows = cursor.fetchall()  # to the end: SQLite finishes the statement
        if not rows:
            return None, after
        row = rows[0]
        key = tuple(row[i] for i in self.KEY)
        if converters:
            row = next(iter(compiler.apply_converters([list(row)], converters)))
        return Message.from_db(self.db, self.FIELDS, list(row)), key

    def record(
        self,
        message: Message,
        code: str,
        note: str = "",
        *,
        email: EmailMessage | None = None,
        keep_data: bool | None = None,
        recipients: list[str] | None = None,
    ) -> bool:
        """Log ``message`` with ``code`` and take it off the queue, atomically.

        ``recipients``: the addresses the entry names, when not those of
        ``email`` (a don't-send entry names who was suppressed). Returns False
        when the row was already gone.
        """
        # A sent message is logged as sent (with what the backend added to it).
        entry = MessageLog.from_message(
            message, code, note, email=email, keep_data=keep_data, as_sent=code == RESULT_SUCCESS
        )
        if recipients is not None:
            entry.recipients = "\n".join(recipients)
        with transaction.atomic(using=self.db, savepoint=False):
            if message.attachment_bundle and not entry.attachment_bundle:
                # The log keeps no reference: the stored attachments go once
                # this is committed, unless another row still refers to them.
                attachments.release_on_commit(message.attachment_bundle, self.db)
            if self.use_orm:
                entry.save(force_insert=True, using=self.db)
                deleted, _ = Message.objects.using(self.db).filter(pk=message.pk).delete()
                return bool(deleted)
            cursor = kept_cursor(self.connection)
            if self.record_sql is not None:
                # One round trip: log it, delete it, say if it was there.
                cursor.execute(self.record_sql, [message.pk, *self.log_inserter.values(entry)])
                return cursor.fetchall()[0][0] != 0
            self.log_inserter.insert(entry)
            cursor.execute(self.delete_sql, [message.pk])
            return cursor.rowcount != 0


def _first_key(db: str) -> tuple[Any, ...]:
    """The claim key before every row (see ``_PassQueries``)."""
    return (0, connections[db].ops.adapt_datetimefield_value(timezone.now()), 0)


def _release_due_retries(db: str) -> None:
    released = Message.objects.using(db).release_due_retries()
    if released:
        logger.info("%s deferred message(s) due for an automatic retry back on the queue", released)


#: Shortest idle wait for a message already due (a race with the "is anything
#: sendable" check): a second look soon, never a busy loop.
MIN_DUE_WAIT = 0.05


def idle_wait(cap: float, until_due: float | None) -> float:
    """How long an idle loop sleeps: ``cap``, or less when something falls due."""
    if until_due is None:
        return cap
    return min(cap, max(until_due, MIN_DUE_WAIT))


def seconds_until_due(queryset: MessageQuerySet | None = None) -> float | None:
    """Seconds until the earliest scheduled message or automatic retry, or None.

    The loops sleep at most this long (``MAILER_EMPTY_QUEUE_SLEEP`` caps it).
    """
    if queryset is None:
        queryset = Message.objects.all()
    when = queryset.next_due(retries=conf.AUTO_RETRY)
    if when is None:
        return None
    return max((when - timezone.now()).total_seconds(), 0.0)
