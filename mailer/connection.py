"""The SMTP side of delivery: the connection a lane keeps (opening it, watching
for refused recipients, keeping it between passes) and handing one message over
to the backend, with stored attachments streamed through ``mailer.smtpstream``."""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from typing import Any

from django.core.mail import EmailMessage

from mailer import attachments, pipelining, routes, smtpdeadline, smtpstream
from mailer.claims import _PassQueries
from mailer.conf import conf
from mailer.errors import _error_text
from mailer.models import Message, MessageQuerySet, get_message_id

# 2.3.2's logger, which operators' logging configuration and alerts name.
logger = logging.getLogger("mailer.engine")


class _Sender:
    """The sending backend for one pass, opened lazily and reused.

    Django's SMTP backend drops what ``smtplib`` says about recipients the
    server refused while accepting the others; ``refused`` collects it
    (address -> (code, reply)) for the message being sent. ``route``: the
    route it delivers (see :mod:`mailer.routes`; None: as before).

    With RFC 2920 pipelining (:mod:`mailer.pipelining`) two threads of a
    lane share one sender: the connection is theirs, and what concerns the
    message being sent (``refused``, ``reused``, ``plan``, ``pending``) is
    each thread's own.
    """

    def __init__(self, route: str | None = None) -> None:
        self.route = route
        self.backend: Any = None
        # kept: the connection was kept open after a pass (set by Session).
        self.kept = False
        # The last message went out through a pipeline (mailer.pipelining).
        self.pipelining = False
        self._lock = threading.RLock()
        # Taken by each thread of a paired lane around a message when this
        # connection doesn't pipeline (routelanes.LaneSenders.turn).
        self.serial = threading.Lock()
        self._local = threading.local()

    # What concerns this thread's message ------------------------------------------

    @property
    def refused(self) -> dict[str, Any]:
        try:
            return self._local.refused
        except AttributeError:
            self._local.refused = {}
            return self._local.refused

    @property
    def reused(self) -> bool:
        """The message being sent is the first on a connection kept since
        the last pass, which the server may have closed meanwhile."""
        return getattr(self._local, "reused", False)

    @reused.setter
    def reused(self, value: bool) -> None:
        self._local.reused = value

    @property
    def plan(self) -> smtpstream.Plan | None:
        """Stored attachments to stream into the next sendmail (smtpstream)."""
        return getattr(self._local, "plan", None)

    @plan.setter
    def plan(self, value: smtpstream.Plan | None) -> None:
        self._local.plan = value

    @property
    def used(self) -> Any:
        """The backend this thread's last message was handed to."""
        return getattr(self._local, "used", None)

    @used.setter
    def used(self, value: Any) -> None:
        self._local.used = value

    @property
    def pending(self) -> pipelining.Pending | None:
        """The message whose end-of-data reply is still to be read."""
        return getattr(self._local, "pending", None)

    @pending.setter
    def pending(self, value: pipelining.Pending | None) -> None:
        self._local.pending = value

    # The connection --------------------------------------------------------------

    def get(self) -> Any:
        with self._lock:
            self.reused, self.kept = self.kept and self.backend is not None, False
            if self.backend is None:
                backend = self.used = routes.new_backend(self.route)
                smtpdeadline.open_backend(backend)
                # Kept only once open: a failed open leaves nothing for the
                # lane's other thread to pick up half made.
                self.backend = backend
            self.watch_refusals()
            self.used = self.backend
            return self.backend

    def may_resend(self, exc: BaseException) -> bool:
        """May the message ``exc`` stopped go out on a new connection at once?

        Yes when the server had closed a connection we kept between passes
        (the message was not accepted on it), or when the connection was
        lost before the message's data went out (``NotSent``); not when the
        server is there but silent (a timeout).
        """
        if _is_timeout(exc):
            return False
        if isinstance(exc, pipelining.NotSent):
            return True
        return self.reused and isinstance(exc, (smtplib.SMTPServerDisconnected, ConnectionError))

    def may_pair(self) -> bool:
        """May a second thread join the lane on this connection? (It
        pipelines, and no throttle paces the lane.)"""
        return self.pipelining and conf.SMTP_PIPELINING and not conf.EMAIL_THROTTLE

    def finish(self) -> None:
        """Read the end-of-data reply of the message this thread sent
        through a pipeline (raises as ``smtplib`` would)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            answer = pending.finish()
            if answer:
                self.refused.update(answer)

    def watch_refusals(self) -> None:
        backend = self.backend
        smtp: Any = getattr(backend, "connection", None)
        sendmail = getattr(smtp, "sendmail", None)
        if sendmail is None or getattr(sendmail, "mailer_watched", False):
            return
        # Django's own sending, so the connection is used as smtplib's only.
        ours = smtpstream._django_backend(backend)

        def watched_sendmail(
            from_addr: str,
            to_addrs: Any,
            msg: Any,
            mail_options: Any = (),
            rcpt_options: Any = (),
        ) -> Any:
            plan = self.plan
            if ours and conf.SMTP_PIPELINING and pipelining.offered(smtp):
                if plan is not None:
                    size, write_body = smtpstream.data_writer(plan, smtp, msg)
                else:
                    size, write_body = pipelining.data_writer(smtp, msg)
                # The end-of-data reply is read by finish(), outside the
                # backend's lock: the lane's other thread may meanwhile
                # write the next message's envelope behind it.
                self.pending = pipelining.Pipeline.of(smtp).send(
                    from_addr,
                    to_addrs,
                    size=size,
                    write_body=write_body,
                    mail_options=mail_options,
                    rcpt_options=rcpt_options,
                )
                self.pipelining = True
                return {}
            self.pipelining = False
            if plan is not None:
                answer = smtpstream.sendmail(
                    plan, smtp, from_addr, to_addrs, msg, mail_options, rcpt_options
                )
            else:
                answer = sendmail(from_addr, to_addrs, msg, mail_options, rcpt_options)
            if answer:
                self.refused.update(answer)
            return answer

        watched_sendmail.mailer_watched = True  # type: ignore[attr-defined]
        smtp.sendmail = watched_sendmail

    def watched(self, backend: Any) -> bool:
        """Is ``backend``'s open connection one whose ``sendmail`` we watch?"""
        sendmail = getattr(getattr(backend, "connection", None), "sendmail", None)
        return bool(getattr(sendmail, "mailer_watched", False))

    def replace(self, backend: Any) -> None:
        """The error handler's answer for this thread's message: ``backend``
        instead of the one the message was handed to (closed)."""
        used = self.used
        if backend is used:
            return
        with self._lock:
            if used is self.backend:
                self.backend = backend
                backend = None  # now the sender's
        _close_backend(used)
        _close_backend(backend)  # another thread replaced it meanwhile

    def discard(self, backend: Any) -> None:
        """Close ``backend`` if it is still this sender's (the other thread
        of the lane may have replaced it already)."""
        with self._lock:
            if backend is not self.backend:
                return
            self.backend = None
        _close_backend(backend)

    def close(self) -> None:
        with self._lock:
            old, self.backend = self.backend, None
        _close_backend(old)


def _close_backend(backend: Any) -> None:
    """Close ``backend`` once the messages in flight on it are done."""
    if backend is None:
        return
    pipeline = getattr(getattr(backend, "connection", None), "_mailer_pipeline", None)
    if pipeline is not None:
        pipeline.retire()
    try:
        backend.close()
    except Exception:
        logger.debug("Closing the email backend failed", exc_info=True)


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
    * The routes paused by their providers, read at most every
      ``mailer.quotas.PAUSE_LOOK_SECONDS`` (and again after a pass that
      paused one).

    Lanes of one pass may run in threads: every method is thread-safe.
    """

    def __init__(self, keep_seconds: float = KEEP_CONNECTION_SECONDS) -> None:
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._senders: list[tuple[float, _Sender]] = []
        self._queries: dict[tuple[str, bool], _PassQueries] = {}
        # The routes paused by their providers, as last read (mailer.quotas).
        self.pauses: dict[str, Any] = {}

    def sender(self, route: str | None = None) -> _Sender:
        """A kept sender of ``route`` still within its time, else a new one."""
        self.close_expired()
        with self._lock:
            for index in range(len(self._senders) - 1, -1, -1):
                if self._senders[index][1].route == route:
                    return self._senders.pop(index)[1]
        return _Sender(route)

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
        smtpdeadline.open_backend(backend)
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
    """Hand ``email`` to the backend and, when it went through a pipeline,
    read its end-of-data reply; once more on a new connection when the
    server had closed the kept one, or the connection was lost before the
    message's data went out."""
    backend = sender.get()
    sender.refused.clear()
    try:
        _hand_over(backend, email, sender)
        sender.finish()
    except Exception as exc:
        sender.pending = None
        if not sender.may_resend(exc):
            raise
        logger.info(
            "The email server had closed the connection (%s); sending message %s on a new one.",
            _error_text(exc),
            message.pk,
        )
        sender.discard(backend)
        backend = sender.get()
        sender.refused.clear()
        _hand_over(backend, email, sender)
        sender.finish()
