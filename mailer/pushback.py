"""Which delivery errors mean "slow down" (a provider's pushback), not "this
message failed".

* SMTP ``421`` (the service is closing the channel: too many connections,
  too fast), at any step;
* SMTP ``450``, ``451`` or ``452`` whose text speaks of a rate (``rate``,
  ``throttl``, ``too many``, ``try later``) to the sender or the data (a
  ``45x`` to a recipient is about that mailbox: the message is deferred as
  any other);
* an HTTP ``429`` from an API backend (django-anymail's ``AnymailAPIError``
  and any error with ``status_code`` 429), with its ``Retry-After``.

A permanent ``5xx`` stays a failure of its message.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import time
from dataclasses import dataclass
from typing import Any

_SLOW_DOWN = re.compile(r"\brate|throttl|too many|try later", re.IGNORECASE)


@dataclass(frozen=True)
class Pushback:
    """A provider's "slow down": what it said, and how long it asked for."""

    reason: str
    retry_after: float | None = None


def classify(exc: BaseException) -> Pushback | None:
    """The pushback ``exc`` is, or None (a failure of the message)."""
    status = getattr(exc, "status_code", None)
    if status == 429:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        return Pushback(
            f"HTTP 429 {_first_line(exc)}".strip(), retry_after(headers.get("Retry-After"))
        )
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # Only a 421 speaks for the server: a 45x to RCPT, "rate" or not, is
        # about that recipient (a mailbox receiving too fast), not the route.
        for code, text in exc.recipients.values():
            if code == 421:
                return Pushback(_reply(code, text))
        return None
    if isinstance(exc, smtplib.SMTPResponseException):
        if _slow_down(exc.smtp_code, exc.smtp_error):
            return Pushback(_reply(exc.smtp_code, exc.smtp_error))
    return None


def _slow_down(code: Any, text: Any) -> bool:
    if code == 421:
        return True
    if code in (450, 451, 452):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return bool(_SLOW_DOWN.search(str(text)))
    return False


def _reply(code: Any, text: Any) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(str(text).split())}"[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def retry_after(value: Any) -> float | None:
    """A ``Retry-After`` header's seconds (a number, or an HTTP date)."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)
