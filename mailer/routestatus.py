"""The queue per route, for ``mailer_status`` (counts and the oldest ages)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce

from mailer import quotas, quotastatus, routes
from mailer.models import PRIORITY_DEFERRED, Message, due_q
from mailer.monitoring import duration
from mailer.routelanes import unrouted_name


def _age(now: dt.datetime, value: dt.datetime | None) -> int | None:
    return None if value is None else max(0, int((now - value).total_seconds()))


def route_summary(now: dt.datetime, using: str | None = None) -> dict[str, dict[str, Any]]:
    """Per route name (unrouted mail under :func:`~mailer.routelanes.unrouted_name`,
    the ``--route`` name that serves it): ``queued``, ``scheduled``,
    ``deferred``, ``oldest_queued_seconds``, ``oldest_deferred_seconds`` and
    ``configured`` (False: mail waits for a route no longer in the settings),
    and its quota: ``limits`` (each with its use in the current window),
    ``paused``, ``paused_for_seconds``, ``pause_reason``, ``waiting_for``
    (see :mod:`mailer.quotastatus`). Two queries; every configured route is
    listed, with or without mail.
    """
    queue = Message.objects.all() if using is None else Message.objects.using(using)
    deferred = Q(priority=PRIORITY_DEFERRED)
    due_now = due_q(now)
    rows = (
        queue.order_by()
        .values("route")
        .annotate(
            deferred=Count("id", filter=deferred),
            scheduled=Count("id", filter=~deferred & ~due_now),
            queued=Count("id", filter=~deferred & due_now),
            oldest=Min(Coalesce("not_before", "when_added"), filter=~deferred & due_now),
            oldest_deferred=Min("when_added", filter=deferred),
        )
    )
    unrouted = unrouted_name()
    summary: dict[str, dict[str, Any]] = {}
    oldest: dict[str, tuple[dt.datetime | None, dt.datetime | None]] = {}

    def entry(name: str) -> dict[str, Any]:
        if name not in summary:
            summary[name] = {
                "queued": 0,
                "scheduled": 0,
                "deferred": 0,
                "oldest_queued_seconds": None,
                "oldest_deferred_seconds": None,
                "configured": name == unrouted or routes.is_route(name),
            }
            oldest[name] = (None, None)
        return summary[name]

    for name in routes.route_names():
        entry(name)
    entry(unrouted)
    for row in rows:
        name = unrouted if row["route"] is None else row["route"]
        counts = entry(name)
        for key in ("queued", "scheduled", "deferred"):
            counts[key] += row[key]
        first, first_deferred = oldest[name]
        oldest[name] = (_earliest(first, row["oldest"]), _earliest(first_deferred, row["oldest_deferred"]))
    for name, (first, first_deferred) in oldest.items():
        summary[name]["oldest_queued_seconds"] = _age(now, first)
        summary[name]["oldest_deferred_seconds"] = _age(now, first_deferred)
    quota_rows = quotastatus.rows(using)
    for name in quota_rows:
        if name in summary or routes.is_route(name):
            entry(name)
    at = int(now.timestamp() * quotas.US)
    for name, counts in summary.items():
        counts.update(quotastatus.quota_state(name, quota_rows.get(name), at))
    return dict(sorted(summary.items()))


def _earliest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None:
        return b
    return a if b is None or a <= b else b


def route_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """``mailer_status``'s text lines, one per route (none when the site has
    no route but the default delivery)."""
    shown = len(summary) > 1 or any(c["limits"] or c["paused"] for c in summary.values())
    if not shown:
        return []
    lines = []
    for name, counts in summary.items():
        age = counts["oldest_queued_seconds"]
        text = (
            f"Route {name}: {counts['queued']} queued, {counts['scheduled']} scheduled, "
            f"{counts['deferred']} deferred; oldest sendable "
            + ("none" if age is None else f"waiting {duration(age)}")
        )
        if not counts["configured"]:
            text += " (NOT CONFIGURED: this mail waits until the route is added back)"
        quota = quotastatus.quota_line(name, counts)
        if quota:
            text += f"; {quota}"
        lines.append(text)
    return lines
