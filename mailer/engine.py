"""Delivery: one pass over the queue (``send_all``) and the loop (``send_loop``).

Guarantees (see docs/delivery.rst):

* at-least-once: a message leaves the queue only in the transaction that logs
  its result, committed after the backend accepted it. A worker killed in the
  middle re-sends at most the one message it had in flight, with the same
  Message-ID;
* one committed transaction per message, never one across a whole pass;
* on PostgreSQL and MySQL/MariaDB the message is claimed with ``SELECT ... FOR
  UPDATE SKIP LOCKED`` inside that transaction, so workers on any number of
  machines share a queue and never send a message twice;
* on SQLite no transaction is open while the SMTP server is talking; workers
  are kept apart by the file lock;
* the pass walks the queue in sending order one message at a time, so memory
  does not grow with the queue.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import make_msgid
from typing import Any

import lockfile  # noqa: F401  - sites patch mailer.engine.lockfile.FileLock
from django.core.mail import EmailMessage
from django.core.mail.utils import DNS_NAME
from django.db import connections, models, router, transaction
from django.db.models import signals
from django.utils import timezone
from django.utils.module_loading import import_string

from mailer import attachments, locking, retry, smtpstream
from mailer.compat import get_sending_backend, require_no_backend_loop
from mailer.conf import conf
from mailer.cursors import kept_cursor
from mailer.errors import describe_delivery_error
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
    MessageQuerySet,
    RowInserter,
    due_q,
    get_message_id,
)
from mailer.pool import PassState, SharedCursor, run_lanes
from mailer.signals import message_deferred, message_failed, message_sent, send_outcome

logger = logging.getLogger(__name__)

# Module attributes 2.3.2 read from settings at import and that sites patch in
# their tests: here they give the current setting unless patched.
_SETTING_ATTRIBUTES = ("LOCK_WAIT_TIMEOUT", "EMPTY_QUEUE_SLEEP")
_UNSET = object()


def __getattr__(name: str) -> Any:
    if name in _SETTING_ATTRIBUTES:
        return getattr(conf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _setting(name: str) -> Any:
    """``LOCK_WAIT_TIMEOUT``/``EMPTY_QUEUE_SLEEP``: a value patched onto this
    module (``mock.patch("mailer.engine.EMPTY_QUEUE_SLEEP", 1)``), else the
    current setting."""
    patched = globals().get(name, _UNSET)
    return getattr(conf, name) if patched is _UNSET else patched


__all__ = [
    "PassResult",
    "Session",
    "acquire_lock",
    "ensure_message_id",
    "handle_delivery_exception",
    "prioritize",
    "release_lock",
    "send_all",
    "send_loop",
]

DEFERRABLE_ERRORS = (
    smtplib.SMTPAuthenticationError,
    smtplib.SMTPDataError,
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPSenderRefused,
    socket.error,
)


@dataclass
class PassResult:
    """What one ``send_all`` pass did."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    dont_send: int = 0
    seconds: float = 0.0
    locked_out: bool = False
    # The server stopped answering: every further message would wait the
    # whole SMTP timeout too, so the pass ends (the rest stays queued).
    timed_out: bool = False
    # The pass ended because it found nothing more to send.
    drained: bool = False

    @property
    def attempted(self) -> int:
        return self.sent + self.deferred + self.failed + self.dont_send

    def __str__(self) -> str:
        if self.locked_out:
            return "lock held elsewhere, nothing sent"
        text = f"sent {self.sent}, deferred {self.deferred}, failed {self.failed}"
        if self.dont_send:
            text += f", don't send {self.dont_send}"
        return f"{text} in {self.seconds:.2f}s"


# --- compat helpers ------------------------------------------------------------


def prioritize(queryset: MessageQuerySet | None = None) -> MessageQuerySet:
    """The sendable messages in sending order: priority, then age."""
    if queryset is None:
        queryset = Message.objects.all()
    return queryset.non_deferred().in_sending_order()


def ensure_message_id(email: EmailMessage, message: Message | None = None) -> str:
    """Give ``email`` a Message-ID if it has none; return it.

    Messages queued by this package carry one from queue time. For older rows
    (queued by django-mailer 2.3.2) the id is derived from the row, so every
    retry of that row sends the same Message-ID.
    """
    msg_id = get_message_id(email)
    if msg_id is None:
        if message is not None and message.pk is not None:
            stamp = message.when_added.strftime("%Y%m%d%H%M%S%f") if message.when_added else "0"
            msg_id = f"<{stamp}.{message.pk}.django-mailer@{DNS_NAME}>"
        else:
            msg_id = make_msgid(domain=str(DNS_NAME))
        email.extra_headers = {**email.extra_headers, "Message-ID": msg_id}
    return msg_id


def acquire_lock() -> tuple[bool, Any]:
    """Take the ``send_mail`` file lock: ``(acquired, lock)``.

    ``lockfile.FileLock(path).acquire(LOCK_WAIT_TIMEOUT)``, with the
    take-over of a lock left by a dead worker (see ``mailer.locking``).
    """
    return locking.acquire(conf.LOCK_PATH, _setting("LOCK_WAIT_TIMEOUT"), log=logger)


def release_lock(lock: Any) -> None:
    locking.release(lock)


def handle_delivery_exception(
    connection: Any, message: Message, exc: BaseException
) -> tuple[Any, str]:
    """Default ``MAILER_ERROR_HANDLER``: defer on SMTP/socket errors, else raise.

    With ``MAILER_AUTO_RETRY`` the retry policy (``mailer.retry.decide``)
    says whether and when the message is retried, and the log entry says
    which it was.
    """
    if isinstance(exc, DEFERRABLE_ERRORS):
        text = describe_delivery_error(exc, connection)  # names the server
        retry_at = None
        if conf.AUTO_RETRY:
            decision = retry.decide(message, exc)
            text = f"{text}; {decision.note}"
            retry_at = decision.retry_at
        logger.info("message deferred due to failure: %s", text)
        message.defer(retry_at)
        MessageLog.objects.log(message, RESULT_FAILURE, log_message=text)
        return None, "deferred"
    raise exc


# --- the pass ------------------------------------------------------------------


class _Sender:
    """The sending backend for one pass, opened lazily and reused.

    Django's SMTP backend drops what ``smtplib`` says about recipients the
    server refused while accepting the others; ``refused`` collects it
    (address -> (code, reply)) for the message being sent.
    """

    def __init__(self) -> None:
        self.backend: Any = None
        self.refused: dict[str, Any] = {}
        # kept: the connection was kept open after a pass (set by Session);
        # reused: the message being sent is the first on it since, and the
        # server may have closed it meanwhile.
        self.kept = False
        self.reused = False
        # Stored attachments to stream into the next sendmail (smtpstream).
        self.plan: smtpstream.Plan | None = None

    def get(self) -> Any:
        self.reused, self.kept = self.kept and self.backend is not None, False
        if self.backend is None:
            self.backend = get_sending_backend()
            self.backend.open()
        self.watch_refusals()
        return self.backend

    def may_resend(self, exc: BaseException) -> bool:
        """Was ``exc`` a connection the server had closed while we kept it
        between passes?

        Then the message was not accepted on it and goes out on a new
        connection instead of being deferred (a timeout is not that: the
        server is there but silent).
        """
        return (
            self.reused
            and isinstance(exc, (smtplib.SMTPServerDisconnected, ConnectionError))
            and not _is_timeout(exc)
        )

    def watch_refusals(self) -> None:
        smtp: Any = getattr(self.backend, "connection", None)
        sendmail = getattr(smtp, "sendmail", None)
        if sendmail is None or getattr(sendmail, "mailer_watched", False):
            return
        refused = self.refused

        def watched_sendmail(*args: Any, **kwargs: Any) -> Any:
            plan = self.plan
            if plan is not None:
                answer = smtpstream.sendmail(plan, smtp, *args, **kwargs)
            else:
                answer = sendmail(*args, **kwargs)
            if answer:
                refused.update(answer)
            return answer

        watched_sendmail.mailer_watched = True  # type: ignore[attr-defined]
        smtp.sendmail = watched_sendmail

    def watched(self, backend: Any) -> bool:
        """Is ``backend``'s open connection one whose ``sendmail`` we watch?"""
        sendmail = getattr(getattr(backend, "connection", None), "sendmail", None)
        return bool(getattr(sendmail, "mailer_watched", False))

    def replace(self, backend: Any) -> None:
        if backend is not self.backend:
            self.close()
            self.backend = backend

    def close(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                logger.debug("Closing the email backend failed", exc_info=True)
            self.backend = None


#: How long a pass trusts its copy of the don't-send list before reading it again.
DONT_SEND_REFRESH_SECONDS = 30.0


class DontSendSnapshot:
    """The don't-send list as a pass sees it, applied to each claimed message.

    Read with one query when the pass meets its first message, and again
    whenever the copy is older than ``DONT_SEND_REFRESH_SECONDS``: no query
    per message, and an address added during a long pass is honoured for
    every message whose turn comes at least that long after it was added
    (and for every message of the next pass).
    """

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = refresh_seconds
        self.addresses: frozenset[str] | None = None
        self.loaded_at = 0.0
        self.loads = 0

    def current(self) -> frozenset[str]:
        refresh = DONT_SEND_REFRESH_SECONDS if self.refresh_seconds is None else self.refresh_seconds
        now = time.monotonic()
        if self.addresses is None or now - self.loaded_at >= refresh:
            self.addresses = DontSendEntry.objects.all_addresses()
            self.loaded_at = now
            self.loads += 1
        return self.addresses

    def apply(self, email: EmailMessage) -> list[str]:
        """Drop listed addresses from ``email``'s To, Cc and Bcc; return them."""
        blocked = self.current()
        if not blocked:
            return []
        dropped: list[str] = []
        for field in ("to", "cc", "bcc"):
            values = list(getattr(email, field, None) or [])
            kept = [a for a in values if not DontSendEntry.matches(a, blocked)]
            if len(kept) != len(values):
                dropped.extend(str(a) for a in values if DontSendEntry.matches(a, blocked))
                setattr(email, field, kept)
        return dropped


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
        self.refresh()

    def refresh(self) -> None:
        """Start a pass: the don't-send list is read again, and recording
        goes through the ORM if signal receivers are connected now."""
        self.dont_send = DontSendSnapshot()
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


#: How long a worker keeps an SMTP connection open between passes.
KEEP_CONNECTION_SECONDS = 10.0


class Session:
    """What a worker keeps from one pass to the next (``send_all(session=...)``).

    * The lanes' SMTP connections, for up to ``keep_seconds`` after a pass:
      the next pass sends on them without connecting and greeting again. A
      kept connection the server closed meanwhile is replaced and the
      message sent on the new one, not deferred. The worker calls
      ``close_expired()`` as it waits and ``close()`` when it stops.
    * The compiled statements of a single lane over the default queue, so a
      pass does not compile them again (the don't-send list is still read
      once per pass).

    Lanes of one pass may run in threads: every method is thread-safe.
    """

    def __init__(self, keep_seconds: float = KEEP_CONNECTION_SECONDS) -> None:
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._senders: list[tuple[float, _Sender]] = []
        self._queries: dict[tuple[str, bool], _PassQueries] = {}

    def sender(self) -> _Sender:
        """A kept sender still within its time, else a new one."""
        self.close_expired()
        with self._lock:
            if self._senders:
                return self._senders.pop()[1]
        return _Sender()

    def keep(self, sender: _Sender) -> None:
        """Keep ``sender``'s open connection for the next pass."""
        if sender.backend is None:
            return
        sender.kept = True
        with self._lock:
            self._senders.append((time.monotonic(), sender))

    def queries(self, queryset: MessageQuerySet, db: str, lock_rows: bool) -> _PassQueries:
        """The compiled statements for the default queue (one lane only)."""
        with self._lock:
            queries = self._queries.pop((db, lock_rows), None)
        if queries is None:
            return _PassQueries(queryset, db, lock_rows)
        queries.refresh()
        return queries

    def keep_queries(self, queries: _PassQueries) -> None:
        with self._lock:
            self._queries[(queries.db, queries.lock_rows)] = queries

    def expires_in(self) -> float | None:
        """Seconds until the oldest kept connection is due to close (None: none kept)."""
        with self._lock:
            if not self._senders:
                return None
            oldest = min(kept_at for kept_at, _ in self._senders)
        return max(0.0, oldest + self.keep_seconds - time.monotonic())

    def close_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [s for t, s in self._senders if now - t >= self.keep_seconds]
            self._senders = [(t, s) for t, s in self._senders if now - t < self.keep_seconds]
        for sender in expired:
            sender.close()

    def close(self) -> None:
        """Close every kept connection (the worker stops)."""
        with self._lock:
            senders, self._senders = self._senders, []
        for _, sender in senders:
            sender.close()


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _record_unusable(
    message: Message, queries: _PassQueries, result: PassResult, problem: str, reason: str
) -> None:
    """A row that can never be sent: to the log as a failure, data kept.

    ``problem`` is "can't be decoded" or "can't be sent".
    """
    logger.error(
        "Message %s %s (%s); moved to the log as a failure with its data kept.",
        message.pk,
        problem,
        reason,
    )
    text = (
        f"Could not decode the stored message: {reason}"
        if problem == _UNDECODABLE
        else f"Can't be sent: {reason}"
    )
    queries.record(message, RESULT_FAILURE, text, keep_data=True)
    result.failed += 1
    send_outcome(message_failed, message, message.email, text)


def _record_success(
    message: Message, email: EmailMessage, queries: _PassQueries, code: str, note: str = ""
) -> None:
    if not queries.record(message, code, note, email=email):
        logger.warning(
            "Message %s was removed from the queue by someone else while this worker sent it.",
            message.pk,
        )
    send_outcome(message_sent, message, email)


def _record_dont_send(
    message: Message, email: EmailMessage, queries: _PassQueries, suppressed: list[str]
) -> None:
    """Nobody left to send to: log "don't send", naming who was suppressed."""
    note = "every recipient is on the don't-send list" if suppressed else "no recipients"
    if not queries.record(message, RESULT_DONT_SEND, note, email=email, recipients=suppressed):
        logger.warning("Message %s was removed from the queue by someone else.", message.pk)


def _record_unhandled(
    message: Message, exc: BaseException, email: EmailMessage | None = None
) -> None:
    """The error handler raised: defer the message so later passes move on."""
    text = _error_text(exc)
    logger.error("Message %s failed with an unexpected error; deferred: %s", message.pk, text)
    with transaction.atomic(using=message._state.db):
        message.defer()
        MessageLog.objects.log(message, RESULT_FAILURE, f"Unexpected error: {text}")
    send_outcome(message_deferred, message, email, f"Unexpected error: {text}")


def _signal_handled(
    action: str, message: Message, email: EmailMessage, exc: BaseException, connection: Any
) -> None:
    """Signal what the error handler did: "sent" as it says; otherwise failed
    when it took the message off the queue, else deferred (one query, and
    only when someone listens)."""
    if action == "sent":
        send_outcome(message_sent, message, email)
        return
    if not (message_failed.receivers or message_deferred.receivers):
        return
    gone = not Message.objects.using(message._state.db).filter(pk=message.pk).exists()
    signal = message_failed if gone else message_deferred
    send_outcome(signal, message, email, describe_delivery_error(exc, connection))


_UNDECODABLE = "can't be decoded"
_UNSENDABLE = "can't be sent"
_UNAVAILABLE = "can't be sent now"


def _record_unavailable(message: Message, result: PassResult, reason: str) -> None:
    """A stored attachment can't be read: defer, never send without it."""
    logger.error("Message %s deferred: %s", message.pk, reason)
    with transaction.atomic(using=message._state.db):
        message.defer()
        MessageLog.objects.log(message, RESULT_FAILURE, f"Not sent: {reason}")
    result.deferred += 1
    send_outcome(message_deferred, message, message.email, f"Not sent: {reason}")


def _prepare(message: Message) -> tuple[EmailMessage | None, str, str]:
    """The claimed row's message ready to send, or ``(None, problem, reason)``.

    Nothing about a stored object is trusted: it may not decode, may not be
    an email message, or may be a project's class whose methods raise.
    """
    obj, reason = message.decoded()
    if obj is None:
        return None, _UNDECODABLE, reason or "unknown reason"
    if not isinstance(obj, EmailMessage):
        return None, _UNSENDABLE, f"the stored object is a {type(obj).__name__}, not an email message"
    try:
        if obj.recipients():
            ensure_message_id(obj, message)
    except Exception as exc:
        return None, _UNSENDABLE, f"the stored message is broken: {_error_text(exc)}"
    try:
        # Attachments kept in MAILER_ATTACHMENT_STORAGE are checked, and read
        # back unless they can be streamed when sent (mailer.smtpstream).
        obj = attachments.load(obj, keep=smtpstream.streamable)
    except attachments.AttachmentUnavailable as exc:
        return None, _UNAVAILABLE, str(exc)
    return obj, "", ""


def _is_timeout(exc: BaseException | None) -> bool:
    """Did the server stop answering? (smtplib wraps the socket timeout.)"""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _refusal_note(refused: dict[str, Any]) -> str:
    parts = []
    for address, reply in refused.items():
        code, text = reply if isinstance(reply, tuple) and len(reply) == 2 else (None, reply)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        parts.append(f"{address} ({code} {text})" if code else f"{address} ({text})")
    return "Refused by the server for some recipients: " + "; ".join(parts)


def _deliver_one(
    message: Message,
    queries: _PassQueries,
    sender: _Sender,
    error_handler: Callable[..., tuple[Any, str]],
    result: PassResult,
) -> BaseException | None:
    """Send one claimed message and record the outcome; never stop the pass.

    Returns an unexpected exception (the error handler raised) for the
    caller to re-raise once the pass is over.
    """
    email, problem, reason = _prepare(message)
    if email is None:
        if problem == _UNAVAILABLE:
            _record_unavailable(message, result, reason)
        else:
            _record_unusable(message, queries, result, problem, reason)
        return None
    # Read (or refreshed) here, outside the guard below: a database error
    # ends the pass like any other, it is not this message's fault.
    queries.dont_send.current()
    try:
        suppressed = queries.dont_send.apply(email)
    except Exception as exc:  # a project's subclass with odd address fields
        _record_unusable(message, queries, result, _UNSENDABLE, _error_text(exc))
        return None
    if suppressed:
        logger.info(
            "Not sending message %s to %s: on the don't-send list",
            message.pk,
            ", ".join(suppressed),
        )
    if not email.recipients():
        _record_dont_send(message, email, queries, suppressed)
        result.dont_send += 1
        return None
    try:
        _send(message, email, sender)
    except attachments.AttachmentUnavailable as exc:
        # A stored file changed or vanished while it was being streamed: the
        # connection was closed mid-message, nothing was accepted.
        sender.close()
        _record_unavailable(message, result, str(exc))
        return None
    except Exception as exc:
        result.timed_out = _is_timeout(exc)
        try:
            with transaction.atomic(using=message._state.db):
                new_connection, action = error_handler(sender.backend, message, exc)
        except Exception as handler_exc:
            sender.close()
            _record_unhandled(message, handler_exc, email)
            result.failed += 1
            return handler_exc
        _signal_handled(action, message, email, exc, sender.backend)
        sender.replace(new_connection)
        if action == "sent":
            result.sent += 1
        else:
            result.deferred += 1
        return None
    note = ""
    if sender.refused:
        note = _refusal_note(sender.refused)
        logger.warning("Message %s sent, but: %s", message.pk, note)
    _record_success(message, email, queries, RESULT_SUCCESS, note)
    logger.debug("Sent message %s %s", message.pk, get_message_id(email))
    result.sent += 1
    return None


def _hand_over(backend: Any, email: EmailMessage, sender: _Sender) -> None:
    """``backend.send_messages([email])``, stored attachments that ``email``
    still refers to streamed from the storage when the backend is Django's
    SMTP backend (else read back first)."""
    if not attachments.references(email):
        backend.send_messages([email])
        return
    planned = smtpstream.plan_for(backend, email)
    if planned is not None:
        # Open now, so that the connection the message goes out on is the
        # one whose sendmail streams: never the stand-in's sample bytes.
        backend.open()
        sender.watch_refusals()
        if sender.watched(backend):
            stand_in, sender.plan = planned
            try:
                backend.send_messages([stand_in])
                return
            except smtpstream.PlanMismatch as exc:
                logger.warning(
                    "Can't stream the stored attachments of %s (%s); reading them into memory.",
                    get_message_id(email),
                    exc,
                )
            finally:
                sender.plan = None
    backend.send_messages([attachments.load(email)])


def _send(message: Message, email: EmailMessage, sender: _Sender) -> None:
    """Hand ``email`` to the backend; once more on a new connection when the
    server had closed the kept one."""
    backend = sender.get()
    sender.refused.clear()
    try:
        _hand_over(backend, email, sender)
    except Exception as exc:
        if not sender.may_resend(exc):
            raise
        logger.info(
            "The email server had closed the connection (%s); sending message %s on a new one.",
            _error_text(exc),
            message.pk,
        )
        sender.close()
        backend = sender.get()
        sender.refused.clear()
        _hand_over(backend, email, sender)


def _limits_reached(result: PassResult, in_flight: int = 0) -> bool:
    """``MAILER_EMAIL_MAX_BATCH``/``MAX_DEFERRED`` reached, counting the
    messages other lanes have in flight as sent (so the batch is never
    exceeded)."""
    # 2.3.2's levels and words, which operators' log alerts match.
    max_batch = conf.EMAIL_MAX_BATCH
    if max_batch is not None and result.sent + in_flight >= max_batch:
        logger.info("EMAIL_MAX_BATCH (%s) reached, stopping for this round", max_batch)
        return True
    max_deferred = conf.EMAIL_MAX_DEFERRED
    if max_deferred is not None and result.deferred >= max_deferred:
        logger.warning("EMAIL_MAX_DEFERRED (%s) reached, stopping for this round", max_deferred)
        return True
    return False


def send_all(
    queryset: MessageQuerySet | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Any] | None = None,
    concurrency: int | None = None,
    session: Session | None = None,
) -> PassResult:
    """One pass over the queue (or over ``queryset``); see the module doc.

    The lock is taken with ``acquire_lock()`` and the messages are those of
    ``prioritize(queryset)``, both looked up here at each call, as in 2.3.2.
    ``should_stop`` is asked between messages (a worker's shutdown flag);
    ``sleep`` is used for ``MAILER_EMAIL_THROTTLE`` (default ``time.sleep``).
    ``concurrency``: SMTP connections kept busy at once (default
    ``MAILER_CONCURRENCY``); see :mod:`mailer.pool`. ``session``: what a
    worker keeps between passes (SMTP connections, compiled statements);
    without one, everything is opened for this pass and closed after it.
    """
    require_no_backend_loop()
    conf.require_booleans()  # before anything is sent
    error_handler = import_string(conf.ERROR_HANDLER)
    lanes = conf.CONCURRENCY if concurrency is None else concurrency
    if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
        raise ValueError(f"concurrency must be a whole number >= 1, not {lanes!r}")
    result = PassResult()
    lock = None
    if conf.USE_FILE_LOCK:
        acquired, lock = acquire_lock()
        if not acquired:
            result.locked_out = True
            return result
    start = time.monotonic()
    state = PassState(result, should_stop=should_stop, limits_reached=_limits_reached)
    # The statements compiled by an earlier pass hold only for the default
    # queue (prioritize() may be patched, or a queryset given).
    default_queue = queryset is None and prioritize is _PRIORITIZE
    try:
        queryset = _as_queryset(prioritize(queryset))
        # _db: the alias given to .using(), if any (private; not in django-stubs).
        db = queryset.db if queryset._db else router.db_for_write(Message)  # type: ignore[attr-defined]
        lock_rows = _claims_with_row_locks(db)
        if conf.AUTO_RETRY:
            _release_due_retries(db)
        # Without row locks (SQLite) the lanes share one claim position.
        shared = SharedCursor(_first_key(db)) if lanes > 1 and not lock_rows else None
        lane = _Lane(queryset, db, lock_rows, error_handler, state, shared, sleep, lanes)
        lane.session = session
        lane.reuse_queries = session is not None and default_queue and lanes == 1
        run_lanes(lanes, lane.run, state)
    finally:
        if lock is not None:
            release_lock(lock)
        result.seconds = time.monotonic() - start
    if result.timed_out:
        logger.warning(
            "The email server did not answer in time; stopped this pass "
            "(the remaining messages stay queued)."
        )
    logger.info("Pass done: %s", result)
    if state.pending is not None:
        raise state.pending
    return result


def _first_key(db: str) -> tuple[Any, ...]:
    """The claim key before every row (see ``_PassQueries``)."""
    return (0, connections[db].ops.adapt_datetimefield_value(timezone.now()), 0)


class _Lane:
    """One SMTP connection's share of a pass: claim, send, record, repeat.

    Each lane (a thread when there are several) has its own sending backend
    and, through Django's per-thread connections, its own database
    connection, closed when a pool lane ends.
    """

    def __init__(
        self,
        queryset: MessageQuerySet,
        db: str,
        lock_rows: bool,
        error_handler: Callable[..., tuple[Any, str]],
        state: PassState,
        shared: SharedCursor | None,
        sleep: Callable[[float], Any] | None,
        lanes: int,
    ) -> None:
        self.queryset = queryset
        self.db = db
        self.lock_rows = lock_rows
        self.error_handler = error_handler
        self.state = state
        self.shared = shared
        self.sleep = sleep or time.sleep
        self.pooled = lanes > 1
        self.session: Session | None = None
        self.reuse_queries = False

    def run(self) -> None:
        session = self.session
        sender = session.sender() if session is not None else _Sender()
        if self.reuse_queries and session is not None:
            queries = session.queries(self.queryset, self.db, self.lock_rows)
        else:
            queries = _PassQueries(self.queryset, self.db, self.lock_rows)
        after = queries.first_key()
        state = self.state
        done = False
        try:
            while state.reserve():
                outcome: PassResult | None = None
                unexpected: BaseException | None = None
                try:
                    throttle = conf.EMAIL_THROTTLE
                    if throttle and self.pooled:
                        state.pace(throttle, self.sleep)
                    # Row-locking databases: claim, send and record in one
                    # transaction. SQLite: no transaction around the SMTP talk.
                    atomic = transaction.atomic(using=self.db) if self.lock_rows else None
                    with atomic or contextlib.nullcontext():
                        if self.shared is not None:
                            message = self.shared.claim(queries.claim)
                        else:
                            message, after = queries.claim(after)
                        if message is None:
                            state.result.drained = True
                            state.finish()
                            break
                        outcome = PassResult()
                        unexpected = _deliver_one(
                            message, queries, sender, self.error_handler, outcome
                        )
                finally:
                    state.settle(outcome, unexpected)
                if throttle and not self.pooled and outcome is not None and outcome.sent:
                    self.sleep(throttle)  # 2.3.2: a nap after each sent message
            done = True
        finally:
            if done and session is not None:
                session.keep(sender)
                if self.reuse_queries:
                    session.keep_queries(queries)
            else:
                sender.close()
            if self.pooled:
                connections.close_all()  # this thread's own connections


def _as_queryset(messages: Any) -> MessageQuerySet:
    """``prioritize()``'s result as a queryset (a test may patch it to a list)."""
    if isinstance(messages, MessageQuerySet):
        return messages
    if isinstance(messages, models.QuerySet):
        messages = messages.values_list("pk", flat=True)
    else:
        messages = [m.pk for m in messages]
    return Message.objects.filter(pk__in=messages)


_PRIORITIZE = prioritize


def _release_due_retries(db: str) -> None:
    released = Message.objects.using(db).release_due_retries()
    if released:
        logger.info("%s deferred message(s) due for an automatic retry back on the queue", released)


def has_sendable(queryset: MessageQuerySet | None = None) -> bool:
    """Is a message due now (or, with ``MAILER_AUTO_RETRY``, a retry)?"""
    messages = prioritize(queryset)
    if not isinstance(messages, models.QuerySet):
        return bool(messages)
    now = timezone.now()
    if messages.filter(due_q(now)).exists():
        return True
    return conf.AUTO_RETRY and Message.objects.retrying().filter(not_before__lte=now).exists()


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


def send_loop() -> None:
    """Forever: while nothing is sendable, sleep ``EMPTY_QUEUE_SLEEP``
    seconds; then ``send_all()``.

    2.3.2's plain loop, with its patch points (``time.sleep``,
    ``mailer.engine.send_all``, ``EMPTY_QUEUE_SLEEP``). ``runmailer`` uses
    :class:`mailer.worker.Worker` instead, which also stops cleanly on
    SIGTERM, honours ``MAILER_PAUSE_SEND`` and survives database outages.
    """
    while True:
        while not has_sendable():
            seconds = idle_wait(_setting("EMPTY_QUEUE_SLEEP"), seconds_until_due())
            logger.debug("sleeping for %s seconds before checking queue again", seconds)
            time.sleep(seconds)
        send_all()
