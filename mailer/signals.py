"""Signals about what happened to a queued message.

Each is sent with ``sender=Message`` and the keyword arguments
``message_id`` (the Message-ID header, as the recipient sees it), ``route``
(the alias it is delivered through, ``None`` for the default delivery; see
:mod:`mailer.routes`), ``email``
(the ``EmailMessage``, or ``None`` when the stored data can't be decoded;
attachments kept in ``MAILER_ATTACHMENT_STORAGE`` appear in it as
``mailer.attachments.StoredAttachment`` references) and,
for ``message_deferred`` and ``message_failed``, ``error`` (text: what the log
entry says).

They are sent *after* the transaction that records the outcome has committed
(``transaction.on_commit``), so a receiver that reads the database sees the
outcome, and a receiver can never undo it. They run in the thread that
delivered the message (a worker's, or the request's for the admin's "Send
now"), one receiver after another: a slow receiver delays the next message
that thread sends (with ``MAILER_CONCURRENCY`` > 1, one of the connections).
A receiver that raises is logged (by Django: logger ``django.dispatch``,
ERROR) and skipped: mail goes on.

With no receivers connected nothing is built or scheduled (one list check).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.dispatch import Signal

#: The server accepted the message (its outcome was logged as a success).
message_sent = Signal()
#: Not sent this time; it stays on the queue, deferred. ``error`` says why.
message_deferred = Signal()
#: Never going to be sent: off the queue with a failure logged (undecodable
#: or unsendable data, or an error handler that gave up). ``error`` says why.
message_failed = Signal()

__all__ = ["message_deferred", "message_failed", "message_sent", "send_outcome"]


def send_outcome(
    signal: Signal,
    message: Any,
    email: Any = None,
    error: str | None = None,
    *,
    message_id: str | None = None,
) -> None:
    """Send ``signal`` about ``message`` once the current transaction commits.

    ``email``: the decoded ``EmailMessage`` (``None``: undecodable).
    Costs one list check when nobody listens.
    """
    if not signal.receivers:
        return
    from mailer.attachments import for_log
    from mailer.models import Message, get_message_id

    if email is not None:
        # Attachments kept in MAILER_ATTACHMENT_STORAGE as references, not
        # content: they may never have been in memory whole (smtpstream).
        email = for_log(email)
    if message_id is None:
        message_id = get_message_id(email) or message.message_id
    kwargs: dict[str, Any] = {
        "message_id": message_id,
        "email": email,
        "route": getattr(message, "route", None),
    }
    if signal is not message_sent:
        kwargs["error"] = error or ""

    def send() -> None:
        # Robust: a receiver's exception is logged by Django ("django.dispatch",
        # ERROR, with the traceback) and the other receivers still run.
        signal.send_robust(sender=Message, **kwargs)

    transaction.on_commit(send, using=message._state.db)
