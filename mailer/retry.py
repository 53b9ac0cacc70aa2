"""When a message is (next) due: the automatic retry policy and ``send_at``.

The policy (``MAILER_AUTO_RETRY``, docs/delivery.rst has the schedule):

* :func:`classify`: a failure is *transient* (4xx replies, connection
  errors, timeouts, a refused login) or *permanent* (a 5xx reply; for
  refused recipients, 5xx for every one of them);
* :func:`next_delay`: the wait after the n-th failed attempt,
  ``MAILER_RETRY_DELAY`` doubled per attempt, capped at
  ``MAILER_RETRY_DELAY_MAX``, less up to 10% random jitter (so messages that
  failed together don't come back together, and the cap is a real cap);
* :func:`decide`: retry at a time, permanent (deferred once, not retried),
  or given up (``MAILER_EMAIL_MAX_RETRIES`` used, or older than
  ``MAILER_RETRY_GIVE_UP_AFTER``): the last two wait for an operator.

A retry time is the deferred row's ``not_before``; the worker puts due
retries back on the queue at the start of each pass
(``MessageQuerySet.release_due_retries``).
"""

from __future__ import annotations

import datetime as dt
import random
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils import timezone

from mailer.conf import conf

TRANSIENT = "transient"
PERMANENT = "permanent"

#: Random part of a retry delay: up to this fraction is taken off.
JITTER = 0.1


def _reply_code(code: Any) -> int | None:
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def classify(exc: BaseException) -> str:
    """``TRANSIENT`` or ``PERMANENT`` for a delivery error.

    Permanent: the server answered 5xx (for refused recipients: 5xx for
    every one of them). A refused login (``SMTPAuthenticationError``) is
    transient whatever its code, as Postfix treats it
    (``smtp_sasl_auth_soft_bounce``): the fix is the site's credentials,
    and the mail should flow again once they are right. Everything else
    (4xx replies, dropped connections, timeouts, refused connections) is
    transient.
    """
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return TRANSIENT
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [
            _reply_code(reply[0] if isinstance(reply, tuple) and reply else None)
            for reply in (exc.recipients or {}).values()
        ]
        if codes and all(code is not None and 500 <= code < 600 for code in codes):
            return PERMANENT
        return TRANSIENT
    if isinstance(exc, smtplib.SMTPResponseException):
        code = _reply_code(exc.smtp_code)
        if code is not None and 500 <= code < 600:
            return PERMANENT
    return TRANSIENT


def next_delay(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``attempts`` failed attempts (1 for the first).

    ``min(MAILER_RETRY_DELAY * 2 ** (attempts - 1), MAILER_RETRY_DELAY_MAX)``
    less up to ``JITTER`` of it.
    """
    base = float(conf.RETRY_DELAY)
    cap = float(conf.RETRY_DELAY_MAX)
    exponent = min(max(attempts, 1) - 1, 64)  # 2**64 * any delay is past any cap
    delay = min(base * 2.0**exponent, cap)
    return delay * (1.0 - JITTER * rand())


RETRY = "retry"
GAVE_UP = "gave up"


@dataclass(frozen=True)
class Decision:
    """What becomes of a message whose attempt failed."""

    action: str  # RETRY, PERMANENT or GAVE_UP
    note: str  # for the log entry: "retry at ...", "permanent: not retried", ...
    retry_at: dt.datetime | None = None


def _age_text(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def decide(message: Any, exc: BaseException, now: dt.datetime | None = None) -> Decision:
    """The policy's answer for ``message`` (a claimed ``Message``) failing with ``exc``.

    ``message.retry_count`` retries were made before this attempt, so this
    was attempt ``retry_count + 1``.
    """
    now = timezone.now() if now is None else now
    attempts = (message.retry_count or 0) + 1
    if classify(exc) == PERMANENT:
        return Decision(PERMANENT, "permanent: not retried")
    max_retries = conf.EMAIL_MAX_RETRIES
    if max_retries is not None and attempts > max_retries:
        return Decision(
            GAVE_UP, f"gave up after {attempts} attempts (MAILER_EMAIL_MAX_RETRIES={max_retries})"
        )
    give_up_after = conf.RETRY_GIVE_UP_AFTER
    if give_up_after is not None and message.when_added is not None:
        age = (now - message.when_added).total_seconds()
        if age >= give_up_after:
            return Decision(
                GAVE_UP,
                f"gave up after {attempts} attempts / {_age_text(age)} "
                f"(MAILER_RETRY_GIVE_UP_AFTER={give_up_after})",
            )
    retry_at = now + dt.timedelta(seconds=next_delay(attempts))
    local = timezone.localtime(retry_at) if timezone.is_aware(retry_at) else retry_at
    shown = local.isoformat(sep=" ", timespec="seconds")
    return Decision(RETRY, f"transient: retry at {shown} (attempt {attempts})", retry_at)


# --- send_at ---------------------------------------------------------------------


def _is_unset(value: Any) -> bool:
    # django-anymail's AnymailMessage sets send_at = anymail.utils.UNSET.
    return value is None or getattr(value, "__name__", None) == "UNSET"


def _as_datetime(send_at: Any) -> dt.datetime:
    if isinstance(send_at, dt.datetime):
        return send_at
    if isinstance(send_at, dt.date):
        return dt.datetime.combine(send_at, dt.time())
    if isinstance(send_at, (int, float)) and not isinstance(send_at, bool):
        return dt.datetime.fromtimestamp(send_at, tz=dt.timezone.utc)
    raise TypeError(f"send_at must be a datetime, a date or a POSIX timestamp; it is {send_at!r}.")


def not_before_from(send_at: Any, now: dt.datetime | None = None) -> dt.datetime | None:
    """The ``not_before`` time for a ``send_at`` value (None: at once).

    Takes what django-anymail takes: an aware ``datetime``; a naive one (in
    the current time zone); a ``date`` (its midnight there); a number (a
    POSIX timestamp). A time in the past means now (``None``). Anything else
    is a ``TypeError`` naming ``send_at``; a time that can't be converted to
    the stored time zone (year 9999 moved past the end of the calendar) a
    ``ValueError`` naming it.
    """
    if _is_unset(send_at):
        return None
    try:
        when = _as_datetime(send_at)
        if settings.USE_TZ and timezone.is_naive(when):
            when = timezone.make_aware(when, timezone.get_current_timezone())
        elif not settings.USE_TZ and timezone.is_aware(when):
            when = timezone.make_naive(when)  # stored naive, in the current time zone
        if timezone.is_aware(when):
            when.astimezone(dt.timezone.utc)  # what the database stores must exist too
    except (OverflowError, OSError, ValueError) as err:
        # A time at the edge of the calendar (year 1 or 9999) moved into
        # another zone, a timestamp too large for a date.
        raise ValueError(
            f"send_at {send_at!r} can't be used: it is outside the dates Python can "
            f"represent once converted to the time zone it is stored in ({err})."
        ) from err
    now = timezone.now() if now is None else now
    return when if when > now else None
