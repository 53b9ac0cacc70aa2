"""What happened to a message, and how the queue is doing.

* :func:`message_status` (public as ``mailer.status``): the state of one
  message by its Message-ID, in at most two indexed queries.
* :func:`queue_summary`: counts by state and priority, the age of the oldest
  message that should have gone out by now, the last success and recent
  outcomes (``mailer_status``).
* :func:`hourly_outcomes`: sent / deferred / failed per hour, in one
  aggregate query over the ``mailer_log_outcomes`` index (the admin's chart).

A failure log entry written while the message was deferred carries
``PRIORITY_DEFERRED`` (the message is deferred before it is logged), so the
log alone tells a deferral (the message stays queued) from a failure (it left
the queue): no join, no per-message query.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from django.db.models import Count, Max, Min, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce, TruncHour
from django.utils import timezone

from mailer.models import (
    PRIORITIES,
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    due_q,
)

#: Message states, as ``MessageStatus.state`` names them.
QUEUED = "queued"
SCHEDULED = "scheduled"
DEFERRED = "deferred"
SENT = "sent"
FAILED = "failed"
DONT_SEND = "dont_send"
STATES = (QUEUED, SCHEDULED, DEFERRED, SENT, FAILED, DONT_SEND)

#: How a success log entry names the recipients the server refused
#: (``mailer.engine``'s note).
REFUSAL_PREFIX = "Refused by the server for some recipients: "

#: Outcomes as the log records them: (result, logged while deferred?) -> name.
OUTCOMES = ("sent", "deferred", "failed", "dont_send")


def outcome_of(result: str, priority: int) -> str:
    """``"sent"``, ``"deferred"``, ``"failed"`` or ``"dont_send"`` for a log entry."""
    if result == RESULT_SUCCESS:
        return "sent"
    if result == RESULT_DONT_SEND:
        return "dont_send"
    return "deferred" if priority == PRIORITY_DEFERRED else "failed"


# --- one message ---------------------------------------------------------------------


@dataclass(frozen=True)
class MessageStatus:
    """What happened to one message (see ``mailer.status``)."""

    message_id: str
    #: "queued", "scheduled", "deferred", "sent", "failed" or "dont_send".
    state: str
    #: Delivery attempts logged for this Message-ID.
    attempts: int = 0
    last_attempt: dt.datetime | None = None
    #: When a worker may next try it (scheduled, or an automatic retry);
    #: None when that is "as soon as a worker gets to it" or never.
    next_attempt: dt.datetime | None = None
    #: The last failure's log text, unless a later attempt succeeded.
    error: str | None = None
    #: The queue priority (None once it left the queue).
    priority: int | None = None
    #: Sent, but the server refused some recipients: who, and its reply
    #: ("Refused by the server for some recipients: a@example.com (550 ...)").
    refused: str | None = None
    #: Its route: the alias it is delivered through (None: the default delivery).
    route: str | None = None
    #: Queued, but held: ``"rate limit"`` (its route's quota is used up) or
    #: ``"provider pause"`` (the provider asked to slow down); else None.
    waiting_for: str | None = None

    @property
    def done(self) -> bool:
        """Has it left the queue for good (sent, failed, don't send)?"""
        return self.state in (SENT, FAILED, DONT_SEND)


def _storable(message_id: str) -> bool:
    """Could a row hold this Message-ID? Not an empty one, nor one with a NUL
    (PostgreSQL can't even compare one) or a lone surrogate (no database
    driver encodes one): such a string matches nothing."""
    if not message_id or not isinstance(message_id, str) or "\x00" in message_id:
        return False
    try:
        message_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def message_status(message_id: str, *, using: str | None = None) -> MessageStatus | None:
    """The state of the message with this Message-ID; None if never queued.

    ``message_id`` as in the header, with its angle brackets. Two queries,
    each over a Message-ID index: the queue row (the newest, if it was
    requeued, with its route's quota row for ``waiting_for``), then its log
    entries.
    """
    if not _storable(message_id):
        return None
    queue = Message.objects.all() if using is None else Message.objects.using(using)
    quota = _quota_columns()
    row = (
        queue.filter(message_id=message_id)
        .order_by("-id")
        .annotate(**quota)
        .values_list("priority", "not_before", "route", *quota)
        .first()
    )
    log = MessageLog.objects.all() if using is None else MessageLog.objects.using(using)
    entries = list(
        log.filter(message_id=message_id)
        .order_by("-id")
        .values_list("result", "priority", "when_attempted", "log_message", "route")
    )
    if row is None and not entries:
        return None
    attempts = sum(1 for result, *_ in entries if result != RESULT_DONT_SEND)
    last_attempt = entries[0][2] if entries else None
    error = refused = None
    for result, _priority, _when, text, _route in entries:
        if result == RESULT_FAILURE:
            error = text or None
            break
        if result == RESULT_SUCCESS and text.startswith(REFUSAL_PREFIX):
            refused = text
        if result in (RESULT_SUCCESS, RESULT_DONT_SEND):
            break
    if row is not None:
        priority, next_attempt, route, *quota_values = row
        now = timezone.now()
        if priority == PRIORITY_DEFERRED:
            state = DEFERRED
        elif next_attempt is not None and next_attempt > now:
            state = SCHEDULED
        else:
            state = QUEUED
            next_attempt = None
        held = _held_by(route, quota_values) if state == QUEUED else None
        return MessageStatus(
            message_id,
            state,
            attempts,
            last_attempt,
            next_attempt,
            error,
            priority,
            route=route,
            waiting_for=held,
        )
    result, priority, _when, text, route = entries[0]
    state = {"sent": SENT, "dont_send": DONT_SEND}.get(outcome_of(result, priority), FAILED)
    if state != FAILED:
        error = None
    return MessageStatus(
        message_id, state, attempts, last_attempt, None, error, refused=refused, route=route
    )


#: The columns of a route's quota row that say what holds its mail.
_QUOTA_FIELDS = (
    "slot_at", "m_window", "m_count", "h_window", "h_count", "d_window", "d_count", "paused_until"
)


def _quota_columns() -> dict[str, Any]:
    """The queue row's route's quota row, as columns of the same query (so
    that ``status`` stays at two queries)."""
    from mailer.routelanes import unrouted_name
    from mailer.routequota import RouteQuota

    own = RouteQuota.objects.filter(route=Coalesce(OuterRef("route"), Value(unrouted_name())))
    return {f"quota_{name}": Subquery(own.values(name)[:1]) for name in _QUOTA_FIELDS}


def _held_by(route: str | None, values: list[Any]) -> str | None:
    """What holds the queued mail of ``route`` now (its quota, a pause), if anything."""
    from mailer.quotastatus import waiting_for
    from mailer.routelanes import unrouted_name
    from mailer.routequota import RouteQuota

    if not values or values[0] is None:
        return None  # no row: never limited nor paused
    key = unrouted_name() if route is None else route
    row = RouteQuota(route=key, **dict(zip(_QUOTA_FIELDS, values, strict=True)))
    return waiting_for(key, row)


# --- the queue -------------------------------------------------------------------------


@dataclass
class QueueSummary:
    """The queue and recent outcomes at ``now`` (see ``mailer_status``)."""

    now: dt.datetime
    queued: int = 0
    scheduled: int = 0
    deferred: int = 0
    #: Deferred messages no automatic retry will pick up (retry_deferred,
    #: the admin, or an operator must).
    deferred_waiting: int = 0
    by_priority: dict[str, int] = field(default_factory=dict)
    #: Since when the oldest sendable message could be sent.
    oldest_queued: dt.datetime | None = None
    #: When the oldest deferred message was queued.
    oldest_deferred: dt.datetime | None = None
    last_success: dt.datetime | None = None
    last_hour: dict[str, int] = field(default_factory=dict)
    last_day: dict[str, int] = field(default_factory=dict)

    def _age(self, value: dt.datetime | None) -> int | None:
        return None if value is None else max(0, int((self.now - value).total_seconds()))

    @property
    def oldest_queued_seconds(self) -> int | None:
        """Age of the oldest sendable message (since it became due)."""
        return self._age(self.oldest_queued)

    @property
    def oldest_deferred_seconds(self) -> int | None:
        return self._age(self.oldest_deferred)

    @property
    def waiting(self) -> int:
        """Messages that should have gone out by now: queued and deferred
        (waiting for a retry or for an operator), not scheduled for later."""
        return self.queued + self.deferred

    @property
    def oldest_waiting(self) -> dt.datetime | None:
        """Since when the oldest of them should have gone out (a deferred
        message: since it was queued)."""
        times = [t for t in (self.oldest_queued, self.oldest_deferred) if t is not None]
        return min(times) if times else None

    @property
    def oldest_waiting_seconds(self) -> int | None:
        return self._age(self.oldest_waiting)

    @property
    def silent_seconds(self) -> int | None:
        """How long mail has waited with nothing sent: since the last success
        or since the oldest waiting message became due, whichever is later;
        None when nothing waits (an idle queue is never silent)."""
        oldest = self.oldest_waiting
        if not self.waiting or oldest is None:
            return None
        since = oldest if self.last_success is None else max(oldest, self.last_success)
        return self._age(since)

    @property
    def last_success_seconds(self) -> int | None:
        return self._age(self.last_success)

    def as_dict(self) -> dict[str, Any]:
        def iso(value: dt.datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "queued": self.queued,
            "scheduled": self.scheduled,
            "deferred": self.deferred,
            "deferred_waiting": self.deferred_waiting,
            "by_priority": self.by_priority,
            "oldest_queued_seconds": self.oldest_queued_seconds,
            "oldest_deferred_seconds": self.oldest_deferred_seconds,
            "waiting": self.waiting,
            "oldest_waiting_seconds": self.oldest_waiting_seconds,
            "silent_seconds": self.silent_seconds,
            "last_success": iso(self.last_success),
            "last_success_seconds": self.last_success_seconds,
            "last_hour": self.last_hour,
            "last_day": self.last_day,
            "now": iso(self.now),
        }


def queue_counts(now: dt.datetime, using: str | None = None) -> QueueSummary:
    """Counts by state and priority and the oldest messages: one query."""
    summary = QueueSummary(now=now)
    queue = Message.objects.all() if using is None else Message.objects.using(using)
    due_now = due_q(now)
    rows = (
        queue.order_by()
        .values("priority")
        .annotate(
            total=Count("id"),
            later=Count("id", filter=~due_now),
            # Deferred with no automatic retry planned: waiting for an operator.
            waiting=Count("id", filter=Q(not_before__isnull=True)),
            # Since it became due (a scheduled message is not late before its time).
            oldest=Min(Coalesce("not_before", "when_added"), filter=due_now),
            oldest_added=Min("when_added"),
        )
    )
    names = dict(PRIORITIES)
    summary.by_priority = {label: 0 for _number, label in PRIORITIES}
    for row in rows:
        priority = row["priority"]
        summary.by_priority[names.get(priority, str(priority))] = row["total"]
        if priority == PRIORITY_DEFERRED:
            summary.deferred += row["total"]
            summary.deferred_waiting += row["waiting"]
            summary.oldest_deferred = row["oldest_added"]
            continue
        summary.scheduled += row["later"]
        summary.queued += row["total"] - row["later"]
        oldest = row["oldest"]
        if oldest is not None and (summary.oldest_queued is None or oldest < summary.oldest_queued):
            summary.oldest_queued = oldest
    return summary


def capped_state_counts(
    now: dt.datetime, cap: int, using: str | None = None
) -> dict[str, int]:
    """``queued``, ``scheduled``, ``deferred`` and ``deferred_waiting``, each
    counted up to ``cap + 1`` rows (more than ``cap`` means "more than"), in
    one statement: cheap however large the queue (for the admin's page).
    """
    queue = Message.objects.all() if using is None else Message.objects.using(using)
    alias = queue.db
    sendable = queue.exclude(priority=PRIORITY_DEFERRED)
    subsets = {
        "queued": sendable.filter(due_q(now)),
        "scheduled": sendable.exclude(due_q(now)),
        "deferred": queue.deferred(),
        "deferred_waiting": queue.waiting_for_operator(),
    }
    parts, params = [], []
    for name, qs in subsets.items():
        sql, sub_params = qs.order_by().values("pk")[: cap + 1].query.get_compiler(alias).as_sql()
        parts.append(f"(SELECT COUNT(*) FROM ({sql}) mailer_{name})")
        params.extend(sub_params)
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(parts), params)
        row = cursor.fetchone()
    return {name: int(n) for name, n in zip(subsets, row, strict=True)}


def _outcome_filters() -> dict[str, Q]:
    return {
        "sent": Q(result=RESULT_SUCCESS),
        "deferred": Q(result=RESULT_FAILURE, priority=PRIORITY_DEFERRED),
        "failed": Q(result=RESULT_FAILURE) & ~Q(priority=PRIORITY_DEFERRED),
        "dont_send": Q(result=RESULT_DONT_SEND),
    }


def queue_summary(now: dt.datetime | None = None, using: str | None = None) -> QueueSummary:
    """Everything ``mailer_status`` reports, in three queries."""
    now = now or timezone.now()
    summary = queue_counts(now, using)
    log = MessageLog.objects.all() if using is None else MessageLog.objects.using(using)
    hour_ago = now - dt.timedelta(hours=1)
    day_ago = now - dt.timedelta(days=1)
    filters = _outcome_filters()
    counts = log.filter(when_attempted__gte=day_ago, when_attempted__lte=now).aggregate(
        **{f"day_{name}": Count("id", filter=q) for name, q in filters.items()},
        **{
            f"hour_{name}": Count("id", filter=q & Q(when_attempted__gte=hour_ago))
            for name, q in filters.items()
        },
    )
    summary.last_day = {name: counts[f"day_{name}"] for name in OUTCOMES}
    summary.last_hour = {name: counts[f"hour_{name}"] for name in OUTCOMES}
    summary.last_success = log.filter(result=RESULT_SUCCESS).aggregate(last=Max("when_attempted"))[
        "last"
    ]
    return summary


def hourly_outcomes(
    hours: int = 48, now: dt.datetime | None = None, using: str | None = None
) -> list[tuple[dt.datetime, dict[str, int]]]:
    """``(hour start (UTC), {"sent": n, "deferred": n, "failed": n, "dont_send": n})``
    for each of the last ``hours`` hours, oldest first, the current hour last.

    One aggregate query over a range of the ``mailer_log_outcomes`` index
    (``when_attempted, result, priority``).
    """
    now = now or timezone.now()
    current = now.astimezone(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = current - dt.timedelta(hours=hours - 1)
    log = MessageLog.objects.all() if using is None else MessageLog.objects.using(using)
    rows = (
        log.filter(when_attempted__gte=start)
        .annotate(hour=TruncHour("when_attempted", tzinfo=dt.timezone.utc))
        .order_by()
        .values_list("hour", "result", "priority")
        .annotate(n=Count("id"))
    )
    buckets = {start + dt.timedelta(hours=i): dict.fromkeys(OUTCOMES, 0) for i in range(hours)}
    for hour, result, priority, n in rows:
        if hour is None:
            continue
        if timezone.is_naive(hour):
            hour = hour.replace(tzinfo=dt.timezone.utc)
        bucket = buckets.get(hour.astimezone(dt.timezone.utc))
        if bucket is not None:  # attempts stamped in the future are left out
            bucket[outcome_of(result, priority)] += n
    return sorted(buckets.items())


# --- words for people and monitors ---------------------------------------------------------


def duration(seconds: int | None) -> str:
    """``"2d 3h"``, ``"5m 12s"``, ``"40s"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def summary_problems(
    summary: QueueSummary,
    *,
    max_age: int | None = None,
    max_deferred: int | None = None,
    max_silence: int | None = None,
) -> list[str]:
    """What exceeds the thresholds (empty: healthy).

    ``max_age`` and ``max_silence`` look at every message that should have
    gone out by now: queued, deferred for a retry (automatic or not); not
    one scheduled for later. ``max_deferred`` counts every deferred message.
    """
    problems = []
    age = summary.oldest_waiting_seconds
    if max_age is not None and age is not None and age > max_age:
        problems.append(
            f"{summary.waiting} message(s) waiting to go out ({summary.deferred} deferred), "
            f"the oldest for {age} s ({duration(age)}), more than --max-age {max_age}"
        )
    if max_deferred is not None and summary.deferred > max_deferred:
        problems.append(
            f"{summary.deferred} deferred message(s) ({summary.deferred_waiting} waiting for "
            f"an operator), more than --max-deferred {max_deferred}"
        )
    silent = summary.silent_seconds
    if max_silence is not None and silent is not None and silent > max_silence:
        problems.append(
            f"{summary.waiting} message(s) waiting and nothing sent for {silent} s "
            f"({duration(silent)}), more than --max-silence {max_silence}"
        )
    return problems


def _outcome_line(counts: dict[str, int]) -> str:
    return (
        f"{counts['sent']} sent, {counts['deferred']} deferred, {counts['failed']} failed, "
        f"{counts['dont_send']} don't send"
    )


def summary_text(summary: QueueSummary, problems: list[str] | None = None) -> str:
    """The summary for people; the first line is the verdict (for Nagios-style checks)."""
    verdict = "PROBLEM: " + "; ".join(problems) if problems else "OK"
    priorities = ", ".join(f"{label} {n}" for label, n in summary.by_priority.items())
    if summary.last_success is None:
        last = "never (or purged from the log)"
    else:
        last = f"{summary.last_success.isoformat()} ({duration(summary.last_success_seconds)} ago)"
    lines = [
        f"mailer_status: {verdict}",
        f"Queue: {summary.queued} queued, {summary.scheduled} scheduled, "
        f"{summary.deferred} deferred ({summary.deferred_waiting} waiting for an operator)",
        f"By priority: {priorities}",
        f"Waiting to go out: {summary.waiting}"
        + (
            ""
            if summary.oldest_waiting is None
            else f", the oldest for {duration(summary.oldest_waiting_seconds)}"
        )
        + (
            ""
            if summary.silent_seconds is None
            else f"; nothing sent for {duration(summary.silent_seconds)}"
        ),
        "Oldest sendable message: "
        + (
            "none"
            if summary.oldest_queued is None
            else f"waiting {duration(summary.oldest_queued_seconds)}"
        ),
        "Oldest deferred message: "
        + (
            "none"
            if summary.oldest_deferred is None
            else f"waiting {duration(summary.oldest_deferred_seconds)}"
        ),
        f"Last success: {last}",
        f"Last hour: {_outcome_line(summary.last_hour)}",
        f"Last 24 hours: {_outcome_line(summary.last_day)}",
    ]
    return "\n".join(lines)
