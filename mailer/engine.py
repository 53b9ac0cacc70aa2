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

The claim queries are in :mod:`mailer.claims`, the SMTP connection and the
kept session in :mod:`mailer.connection`, the recording of each outcome in
:mod:`mailer.outcomes`; 2.3.2's names and patch points stay here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import smtplib
import socket
import time
from collections.abc import Callable
from email.utils import make_msgid
from typing import Any

import lockfile  # noqa: F401  - sites patch mailer.engine.lockfile.FileLock
from django.core.mail import EmailMessage
from django.core.mail.utils import DNS_NAME
from django.db import connections, models, router, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from mailer import attachments, locking, pushback, quotas, retry, routelanes, smtpstream
from mailer.claims import (  # idle_wait, MIN_DUE_WAIT, seconds_until_due: re-exported
    MIN_DUE_WAIT,
    _claims_with_row_locks,
    _first_key,
    _PassQueries,
    _release_due_retries,
    idle_wait,
    seconds_until_due,
)
from mailer.compat import require_no_backend_loop
from mailer.conf import conf
from mailer.connection import (
    KEEP_CONNECTION_SECONDS,  # noqa: F401  - re-exported (the worker's doc names it)
    Session,
    _is_timeout,
    _refusal_note,
    _send,
    _Sender,
)
from mailer.dontsend import DONT_SEND_REFRESH_SECONDS, DontSendSnapshot
from mailer.errors import _error_text, _is_connection_failure, describe_delivery_error
from mailer.models import (
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,  # noqa: F401  - 2.3.2 imported it here
    Message,
    MessageLog,
    MessageQuerySet,
    due_q,
    get_message_id,
)
from mailer.outcomes import (
    _UNAVAILABLE,
    _UNDECODABLE,
    _UNSENDABLE,
    _record_dont_send,
    _record_success,
    _record_unavailable,
    _record_unhandled,
    _record_unusable,
    _signal_handled,
)
from mailer.pool import Claims, PassResult, PassState, SecondThread, SharedCursor, run_lanes

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
    "MIN_DUE_WAIT",
    "PassResult",
    "Session",
    "acquire_lock",
    "ensure_message_id",
    "handle_delivery_exception",
    "has_sendable",
    "idle_wait",
    "prioritize",
    "release_lock",
    "send_all",
    "send_loop",
    "seconds_until_due",
]

DEFERRABLE_ERRORS = (
    smtplib.SMTPAuthenticationError,
    smtplib.SMTPDataError,
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPSenderRefused,
    socket.error,
)


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
        # 2.3.2's words (operators' alerts match them), then which message.
        logger.info(
            "message deferred due to failure: %s (message %s %s)",
            text,
            message.pk,
            message.message_id or "without a Message-ID",
        )
        message.defer(retry_at)
        MessageLog.objects.log(message, RESULT_FAILURE, log_message=text)
        return None, "deferred"
    raise exc


# --- the pass ------------------------------------------------------------------


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


def _deliver_one(
    message: Message,
    queries: _PassQueries,
    dont_send: DontSendSnapshot,
    sender: _Sender,
    error_handler: Callable[..., tuple[Any, str]],
    result: PassResult,
    gate: quotas.Gate | None = None,
) -> BaseException | None:
    """Send one claimed message and record the outcome; never stop the pass.

    Returns an unexpected exception (the error handler raised) for the
    caller to re-raise once the pass is over.
    """
    if message.route is not None and routelanes.defer_unroutable(message, result):
        return None
    email, problem, reason = _prepare(message)
    if email is None:
        if problem == _UNAVAILABLE:
            _record_unavailable(message, result, reason)
        else:
            _record_unusable(message, queries, result, problem, reason)
        return None
    # Read (or refreshed) here, outside the guard below: a database error
    # ends the pass like any other, it is not this message's fault.
    dont_send.current()
    try:
        suppressed = dont_send.apply(email)
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
        sender.discard(sender.used)
        _record_unavailable(message, result, str(exc))
        return None
    except Exception as exc:
        push = pushback.classify(exc) if gate is not None else None
        if push is not None and gate is not None:
            # "Slow down": the route pauses, the message stays queued as it
            # was (no attempt counted) and goes out after the pause.
            sender.discard(sender.used)
            gate.pause(push, message.route or routelanes.unrouted_name())
            result.held += 1
            return None
        result.timed_out = _is_timeout(exc)
        try:
            with transaction.atomic(using=message._state.db):
                new_connection, action = error_handler(sender.used, message, exc)
        except Exception as handler_exc:
            sender.discard(sender.used)
            _record_unhandled(message, handler_exc, email)
            result.failed += 1
            return handler_exc
        _signal_handled(action, message, email, exc, sender.used)
        if action == "sent":
            result.sent += 1
        else:
            result.deferred += 1
            if _is_connection_failure(exc):
                result.unreachable += 1
                result.unreachable_error = describe_delivery_error(exc, sender.used)
        sender.replace(new_connection)
        return None
    note = ""
    if sender.refused:
        note = _refusal_note(sender.refused)
        logger.warning("Message %s sent, but: %s", message.pk, note)
    _record_success(message, email, queries, RESULT_SUCCESS, note)
    logger.debug("Sent message %s %s", message.pk, get_message_id(email))
    result.sent += 1
    return None


def _limits_reached(result: PassResult, in_flight: int = 0) -> bool:
    """``MAILER_EMAIL_MAX_BATCH``/``MAX_DEFERRED`` reached, counting the
    messages other lanes have in flight as sent (so the batch is never
    exceeded)."""
    # 2.3.2's levels and words, which operators' log alerts match.
    max_batch = conf.EMAIL_MAX_BATCH
    if max_batch is not None and result.sent + in_flight >= max_batch:
        logger.info("EMAIL_MAX_BATCH (%s) reached, stopping for this round", max_batch)
        result.limited = True
        return True
    max_deferred = conf.EMAIL_MAX_DEFERRED
    if max_deferred is not None and result.deferred >= max_deferred:
        logger.warning("EMAIL_MAX_DEFERRED (%s) reached, stopping for this round", max_deferred)
        result.limited = True
        return True
    return False


def send_all(
    queryset: MessageQuerySet | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Any] | None = None,
    concurrency: int | None = None,
    session: Session | None = None,
    routes: list[str] | None = None,
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
    ``routes``: serve only these routes (None: all; see :mod:`mailer.routelanes`).
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
        # A second thread sees only what is committed: not a pass called
        # inside a transaction (an atomic block, a TestCase); no pipelining
        # partner then, and route groups run one after another.
        pairable = not connections[db].in_atomic_block
        groups = routelanes.plan(queryset, routes, concurrency)
        paused = quotas.paused_routes(db, session.pauses if session is not None else None)
        if groups is None:
            # Without row locks (SQLite) the lanes share one claim position.
            shared = SharedCursor(_first_key(db)) if lanes > 1 and not lock_rows else None
            lane = _Lane(queryset, db, lock_rows, error_handler, state, shared, sleep, lanes)
            lane.session = session
            lane.reuse_queries = session is not None and default_queue and lanes == 1
            lane.pairable = pairable
            lane.gate = quotas.gate(routelanes.unrouted_name(), db, paused)
            run_lanes(lanes, lane.run, state)
        else:

            def lane_for(g: routelanes.RouteGroup, own: PassState, threaded: bool) -> Any:
                shared = SharedCursor(_first_key(db)) if not lock_rows else None
                lane = _Lane(g.queryset, db, lock_rows, error_handler, own, shared, sleep, g.lanes)
                lane.session = session
                lane.pairable = pairable
                lane.gate = quotas.gate(g.route or routelanes.unrouted_name(), db, paused)
                lane.route = g.route
                lane.others_running = g.others_running if threaded else None
                return routelanes.route_lane(lane, g, threaded)

            # MAILER_EMAIL_THROTTLE is the process's rate: every route's lanes
            # take their slots from the pass's state.
            own = functools.partial(
                PassState, should_stop=should_stop, limits_reached=_limits_reached, pacer=state
            )
            routelanes.run_route_groups(
                groups, lane_for, state, lambda: own(PassResult()), threads=pairable
            )
    finally:
        if lock is not None:
            release_lock(lock)
        result.seconds = time.monotonic() - start
        if result.held and session is not None:
            session.pauses.clear()  # a route paused: the next pass reads them
    if result.timed_out:
        logger.warning(
            "The email server did not answer in time; stopped this pass "
            "(the remaining messages stay queued)."
        )
    if result.unreachable and not result.sent:
        # Each deferral is an INFO line (2.3.2's); an outage must be heard at
        # -v 0 (cron) too: once per pass, naming the server.
        logger.warning(
            "No mail went out: %s message(s) deferred because the mail server could not "
            "be reached (%s).",
            result.unreachable,
            result.unreachable_error,
        )
    logger.info("Pass done: %s", result)
    if state.pending is not None:
        raise state.pending
    return result


class _Lane:
    """One SMTP connection's share of a pass: claim, send, record, repeat.

    Each lane (a thread when there are several) has its own sending backend
    and, through Django's per-thread connections, its own database
    connection, closed when a pool lane ends.

    When its connection pipelines (``mailer.pipelining``), a second thread
    with its own database connection joins the lane: it claims the next
    message and writes its envelope while the first waits for its reply.
    """

    #: Messages the first thread sends before a second one joins it.
    PAIR_AFTER = 2

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
        self.pairable = True
        self.index_hint: str | None = None  # see _PassQueries.index_hint
        self.recheck: routelanes.Recheck | None = None
        self.gate: quotas.Gate | None = None  # the route's quota and pause
        self.route: str | None = None  # the route group's (None: unrouted mail)
        # Are other route groups' lanes still running? (None: no other groups.)
        self.others_running: Callable[[], bool] | None = None

    def run(self) -> None:
        session = self.session
        senders = routelanes.LaneSenders(session)
        if self.reuse_queries and session is not None:
            queries = session.queries(self.queryset, self.db, self.lock_rows)
        else:
            queries = _PassQueries(self.queryset, self.db, self.lock_rows)
            queries.index_hint = self.index_hint
        claims = Claims(queries.first_key(), self.shared)
        partner = SecondThread(
            self.state,
            after=self.PAIR_AFTER,
            due=lambda: self.pairable and senders.may_pair(),
            prepare=lambda: self._partner(senders, claims.pair(self.lock_rows)),
        )
        done = False
        try:
            self._loop(senders, queries, claims, partner.start_if_due)
            done = True
        finally:
            if not done:
                self.state.finish()
            partner.join()  # it finishes and records what it has in flight
            if done and session is not None:
                senders.keep()
                if self.reuse_queries:
                    session.keep_queries(queries)
            else:
                senders.close()
            if self.pooled:
                connections.close_all()  # this thread's own connections
            if self.gate is not None and self.gate.held_for is not None:
                self.state.hold(self.gate.held_for)
        if partner.error is not None:
            raise partner.error

    def _partner(self, senders: routelanes.LaneSenders, claims: Claims) -> Callable[[], None]:
        """The second thread's loop: these connections, its own database one."""

        senders.paired = True

        def run() -> None:
            try:
                queries = _PassQueries(self.queryset, self.db, self.lock_rows)
                queries.index_hint = self.index_hint
                self._loop(senders, queries, claims)
            finally:
                connections.close_all()  # this thread's own connections

        return run

    def _loop(
        self,
        senders: routelanes.LaneSenders,
        queries: _PassQueries,
        claims: Claims,
        after_message: Callable[[], None] | None = None,
    ) -> None:
        # read again by every pass (mailer.engine.DONT_SEND_REFRESH_SECONDS: a patch point)
        dont_send = DontSendSnapshot(DONT_SEND_REFRESH_SECONDS)
        state = self.state
        look_again = False
        gate = self.gate
        warmed = [False]  # the lane's connection opened before its first slot is used
        while state.reserve():
            outcome: PassResult | None = None
            unexpected: BaseException | None = None
            slot: quotas.Slot | None = None
            if look_again and self.recheck is not None:
                time.sleep(self.recheck.wait)  # outside the transaction
            look_again = False
            try:
                throttle = conf.EMAIL_THROTTLE
                if throttle and self.pooled:
                    state.pace(throttle, self.sleep)
                if gate is not None:
                    # A slot of the route's quota, outside the claim's
                    # transaction: the route's row is locked for one statement.
                    slot = routelanes.take_slot(gate, senders, self.route, self.sleep, state, warmed)
                    if slot is None:
                        if routelanes.wait_out_hold(gate, state, self.sleep, self.others_running):
                            continue  # free again: look again
                        state.finish()  # held: its mail waits for the next pass
                        break
                # Row-locking databases: claim, send and record in one
                # transaction. SQLite: no transaction around the SMTP talk.
                atomic = transaction.atomic(using=self.db) if self.lock_rows else None
                with atomic or contextlib.nullcontext():
                    message = claims.next(queries)
                    if message is None:
                        if self.recheck is not None and self.recheck():
                            claims.after = queries.first_key()  # skipped, not gone
                            look_again = True
                            continue
                        state.result.drained = True
                        state.finish()
                        break
                    outcome = PassResult()
                    # One connection per route the lane meets.
                    sender = senders.get(message.route)
                    with senders.turn(sender):
                        unexpected = _deliver_one(
                            message, queries, dont_send, sender, self.error_handler, outcome, gate
                        )
            finally:
                state.settle(outcome, unexpected)
                if slot is not None and gate is not None and not PassResult.handed(outcome):
                    gate.give_back(slot)
            if outcome is not None and outcome.held:
                state.finish()  # the route is paused: the others stop too
            if throttle and not self.pooled and outcome is not None and outcome.sent:
                self.sleep(throttle)  # 2.3.2: a nap after each sent message
            if after_message is not None:
                after_message()


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


def has_sendable(queryset: MessageQuerySet | None = None) -> bool:
    """Is a message due now (or, with ``MAILER_AUTO_RETRY``, a retry)?"""
    messages = prioritize(queryset)
    if not isinstance(messages, models.QuerySet):
        return bool(messages)
    now = timezone.now()
    if messages.filter(due_q(now)).exists():
        return True
    return conf.AUTO_RETRY and Message.objects.retrying().filter(not_before__lte=now).exists()


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
        result = send_all()
        if not result.attempted and result.held_for is not None:
            # Sendable, but held by its route's quota or provider's pause.
            time.sleep(idle_wait(_setting("EMPTY_QUEUE_SLEEP"), result.held_for))
