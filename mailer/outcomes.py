"""Recording what became of a claimed message: its log entry, its removal from
the queue or deferral, and the signals that say so."""

from __future__ import annotations

import logging
from typing import Any

from django.core.mail import EmailMessage
from django.db import transaction

from mailer.claims import _PassQueries
from mailer.errors import _error_text, describe_delivery_error
from mailer.models import RESULT_DONT_SEND, RESULT_FAILURE, Message, MessageLog
from mailer.pool import Outcome
from mailer.signals import message_deferred, message_failed, message_sent, send_outcome

# 2.3.2's logger, which operators' logging configuration and alerts name.
logger = logging.getLogger("mailer.engine")


def _record_unusable(
    message: Message, queries: _PassQueries, result: Outcome, problem: str, reason: str
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


def _record_unavailable(message: Message, result: Outcome, reason: str) -> None:
    """A stored attachment can't be read: defer, never send without it."""
    logger.error("Message %s deferred: %s", message.pk, reason)
    with transaction.atomic(using=message._state.db):
        message.defer()
        MessageLog.objects.log(message, RESULT_FAILURE, f"Not sent: {reason}")
    result.deferred += 1
    send_outcome(message_deferred, message, message.email, f"Not sent: {reason}")
