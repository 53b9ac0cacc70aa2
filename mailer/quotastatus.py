"""How each route's quota and pause look from outside: for ``mailer_status``,
the admin overview and ``mailer.status()``."""

from __future__ import annotations

import math
from typing import Any

from mailer.quotas import HORIZON, UNIT_NAMES, US, Limit, now_us, route_limits, window_of
from mailer.routequota import RouteQuota


def _used(limit: Limit, row: RouteQuota | None, now: int) -> tuple[int, float]:
    """(used in the current window, seconds until it resets) of ``limit``."""
    if row is None:
        return 0, 0.0
    if limit.unit == "s":
        # Slots are handed out 1/N s apart up to slot_at: those in the last second.
        step = US / limit.count
        used = math.ceil((row.slot_at - (now - US)) / step) if row.slot_at > now - US else 0
        return min(max(used, 0), limit.count), max(row.slot_at - now, 0) / US
    number = window_of(limit, now)
    used = getattr(row, f"{limit.unit}_count") if getattr(row, f"{limit.unit}_window") == number else 0
    return used, ((number + 1) * limit.seconds * US - now) / US


def quota_state(key: str, row: RouteQuota | None, now: int | None = None) -> dict[str, Any]:
    """The route ``key``'s limits, their use now, and its pause (JSON-ready)."""
    now = now_us() if now is None else now
    limits = []
    for limit in route_limits(key):
        used, resets = _used(limit, row, now)
        limits.append(
            {
                "rate": str(limit),
                "per": UNIT_NAMES[limit.unit],
                "used": used,
                "resets_in_seconds": round(resets, 3),
            }
        )
    paused_for = max(row.paused_until - now, 0) / US if row is not None else 0.0
    return {
        "limits": limits,
        "paused": paused_for > 0,
        "paused_for_seconds": round(paused_for, 3) if paused_for else None,
        "pause_reason": (row.pause_reason or None) if row is not None and paused_for else None,
        "waiting_for": waiting_for(key, row, now),
    }


def waiting_for(key: str, row: RouteQuota | None, now: int | None = None) -> str | None:
    """``"provider pause"``, ``"rate limit"`` (its quota is used up beyond a
    lane's wait), or None: what holds the route ``key``'s mail now."""
    if row is None:
        return None
    now = now_us() if now is None else now
    if row.paused_until > now:
        return "provider pause"
    for limit in route_limits(key):
        if limit.unit == "s":
            if row.slot_at > now + HORIZON * US:
                return "rate limit"
        elif getattr(row, f"{limit.unit}_window") >= window_of(limit, now):
            if getattr(row, f"{limit.unit}_count") >= limit.count:
                return "rate limit"
    return None


def rows(db: str | None = None) -> dict[str, RouteQuota]:
    """Every route's row, by route name (one query)."""
    queryset = RouteQuota.objects.all() if db is None else RouteQuota.objects.using(db)
    return {row.route: row for row in queryset}


def quota_line(name: str, state: dict[str, Any]) -> str:
    """``mailer_status``'s words for one route's quota ('' when it has none)."""
    parts = []
    if state["limits"]:
        parts.append(
            "limits "
            + ", ".join(f"{lim['rate']} ({lim['used']} used this {lim['per']})" for lim in state["limits"])
        )
    if state["paused"]:
        parts.append(
            f"PAUSED for {state['paused_for_seconds']:.0f}s more at its provider's request "
            f"({state['pause_reason'] or 'pushback'})"
        )
    elif state["waiting_for"] == "rate limit":
        parts.append("its quota is used up: its mail waits")
    return "; ".join(parts)
