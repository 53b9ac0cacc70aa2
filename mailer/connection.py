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

from mailer import attachments, routes, smtpstream
from mailer.claims import _PassQueries
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
    """

    def __init__(self, route: str | None = None) -> None:
        self.route = route
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
            self.backend = routes.new_backend(self.route)
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
