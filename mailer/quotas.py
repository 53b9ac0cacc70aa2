"""Provider quotas per route (``MAILER_ROUTES[name]["RATE"]``), held in the
database for every worker process together, and the pauses a provider asks for.

A route's state is one :class:`~mailer.routequota.RouteQuota` row. A lane
*reserves* a slot before it claims a message: one ``UPDATE`` that counts the
message in every window and moves the per-second limit's next slot on, only
if every limit allows it (and the route isn't paused). So the limits hold
for the sum of every worker on every machine, and a worker killed after
reserving has used its slot (never given to another twice); a slot not
used (nothing to claim, the message never reached the provider) is given
back. Limits:

* ``N/s``: one slot every ``1/N`` seconds, handed out in order (a generic
  cell rate algorithm whose slots a lane waits for): at most ``N`` in any
  second, plus one at its edges;
* ``N/m``, ``N/h``, ``N/d``: at most ``N`` in each minute, hour and day
  (UTC, from ``:00`` and midnight), the count reset when the next begins.

A route over its quota holds up only its own lanes: they wait for a slot
within :data:`HORIZON` seconds, else end their part of the pass and say
when the route is free again (``PassResult.held_for``). Time is the
worker's clock (keep machines' clocks synchronised).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, connections, transaction

from mailer.conf import conf
from mailer.pushback import Pushback
from mailer.routequota import RouteQuota

logger = logging.getLogger("mailer.engine")

US = 1_000_000
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
UNIT_NAMES = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smhd])\s*$")

#: A lane waits inside its pass for a slot at most this many seconds ahead;
#: a route free later than that ends its lanes' part of the pass.
HORIZON = 2.0

#: A provider's pause: the first lasts ``PAUSE_FIRST`` seconds, each one in a
#: row twice the last, at most ``PAUSE_MAX``, each scaled by a random factor
#: in ``PAUSE_JITTER`` (workers don't all come back at once). A pause that
#: starts more than ``PAUSE_RESET`` seconds after the last one ended is a
#: first one again. A ``Retry-After`` the provider gives is used as it is
#: (at most ``PAUSE_RETRY_AFTER_MAX``).
PAUSE_FIRST = 1.0
PAUSE_MAX = 300.0
PAUSE_JITTER = (0.8, 1.2)
PAUSE_RESET = 60.0
PAUSE_RETRY_AFTER_MAX = 3600.0
PAUSE_RETRY_AFTER_MIN = 0.25  # "Retry-After: 0" is no reason to spin


@dataclass(frozen=True)
class Limit:
    """``count`` messages per ``unit`` (``"s"``, ``"m"``, ``"h"``, ``"d"``)."""

    count: int
    unit: str

    @property
    def seconds(self) -> int:
        return UNITS[self.unit]

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"


def parse_rate(value: Any) -> list[Limit]:
    """``RATE`` (``"14/s"`` or a list of such) as limits; ``ValueError``
    saying what is wrong. One limit per unit; ``None`` is no limit."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(
            f"{value!r} is not a rate: give one like '14/s' (per s, m, h or d) or a list of them"
        )
    limits: dict[str, Limit] = {}
    for item in items:
        match = _RATE.match(item) if isinstance(item, str) else None
        if match is None or int(match.group(1)) < 1:
            raise ValueError(
                f"{item!r} is not a rate: a whole number ≥ 1, '/', then s, m, h or d "
                "(e.g. '14/s', '600/m', '5000/h', '50000/d')"
            )
        limit = Limit(int(match.group(1)), match.group(2))
        if limit.unit in limits:
            raise ValueError(
                f"two limits per {UNIT_NAMES[limit.unit]}: {limits[limit.unit]} and {limit}"
            )
        limits[limit.unit] = limit
    return sorted(limits.values(), key=lambda lim: lim.seconds)


def route_limits(key: str) -> list[Limit]:
    """The limits of the route ``key`` (a ``--route`` name); none when it has
    no ``RATE`` or an invalid one (the system check ``mailer.E034`` says so)."""
    routes = conf.ROUTES
    entry = routes.get(key) if isinstance(routes, dict) else None
    if not isinstance(entry, dict):
        return []
    try:
        return parse_rate(entry.get("RATE"))
    except ValueError:
        return []


def rated_routes() -> list[str]:
    """The routes with a ``RATE``."""
    routes = conf.ROUTES
    if not isinstance(routes, dict):
        return []
    return sorted(name for name in routes if route_limits(name))


def now_us() -> int:
    return int(time.time() * US)


def window_of(limit: Limit, at_us: int) -> int:
    """The number of ``limit``'s window (minute, hour, UTC day) holding ``at_us``."""
    return at_us // (limit.seconds * US)


@dataclass
class Slot:
    """A reserved slot: when it may be used, and what to undo to give it back."""

    at: float  # the worker's clock (time.time())
    slot_at: int | None = None  # the route's next slot after this one (µs)
    windows: dict[str, int] = field(default_factory=dict)


#: The pause of each route this process has logged (route -> paused until).
_TOLD: dict[str, int] = {}
_TOLD_LOCK = threading.Lock()


def _returning(connection: Any) -> bool:
    """Does this database's ``UPDATE`` take ``RETURNING``?"""
    if connection.vendor == "postgresql":
        return True
    if connection.vendor == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version_info >= (3, 35)
    return False


#: The slot of a route without limits (nothing reserved, nothing to give back).
FREE = Slot(at=0.0)


def ensure_row(db: str, key: str) -> None:
    """The route's row exists (made by the first worker that needs it)."""
    if RouteQuota.objects.using(db).filter(route=key).exists():
        return
    try:
        with transaction.atomic(using=db):
            RouteQuota.objects.using(db).create(route=key)
    except IntegrityError:
        pass  # another worker made it


class Gate:
    """One route's quota and pause as the lanes of one pass see it (shared
    by them; thread-safe)."""

    def __init__(
        self, key: str, db: str, limits: list[Limit], paused_until: int = 0, reason: str = ""
    ) -> None:
        self.key = key
        self.db = db
        self.limits = limits
        self.per_second = next((lim for lim in limits if lim.unit == "s"), None)
        self.windows = [lim for lim in limits if lim.unit != "s"]
        self.paused_until = paused_until  # µs; 0: not paused as far as we know
        self.reason = reason
        self.held_for: float | None = None  # seconds until free, when held
        self.lock = threading.Lock()
        self.turn = threading.Lock()  # one lane reserves (and waits) at a time
        self._said = False

    # -- reserving --------------------------------------------------------------

    def take(
        self, sleep: Callable[[float], Any], stopping: Callable[[], bool] = lambda: False
    ) -> Slot | None:
        """A slot for the next message, waiting for it when it is near; None
        when the route is held (paused, or its quota used for longer than
        :data:`HORIZON`; ``held_for`` says how long) or the worker is
        stopping (``stopping()``, asked when ``sleep`` returns early)."""
        if not self.limits:
            return None if self._paused() else FREE
        # The lanes of this process take their slots one at a time: at most
        # one reserved slot per process is not due yet, so a pause the
        # provider asks for stops every worker within a slot or two.
        with self.turn:
            for tries in range(1000):
                if self._paused():
                    return None
                slot = self._reserve()
                if slot is not None:
                    if not self._wait_until(slot.at, sleep, stopping) or self._paused():
                        self.give_back(slot)
                        return None
                    return slot
                wait, why = self._free_in()
                if wait > HORIZON or tries >= 20:
                    # (Refused 20 times in a row when it said "soon": the row
                    # says something this worker can't read; look later.)
                    self._held(max(wait, 1.0) if tries >= 20 else wait, why)
                    return None
                if not self._wait_until(time.time() + wait, sleep, stopping):
                    return None
            return None

    def renew(
        self, slot: Slot, sleep: Callable[[float], Any], stopping: Callable[[], bool]
    ) -> Slot | None:
        """``slot``, or a fresh one if it went by more than one per-second
        step ago (its window counts are given back; the per-second slot, in
        the past, is not handed to anyone again)."""
        if self.per_second is None or time.time() <= slot.at + 1 / self.per_second.count:
            return slot
        self.give_back(Slot(at=slot.at, slot_at=None, windows=slot.windows))
        return self.take(sleep, stopping)

    def _paused(self) -> bool:
        """Paused as far as this process knows (noted as held if so)?"""
        if self.paused_until and self.paused_until > now_us():
            self._held((self.paused_until - now_us()) / US, "provider pause")
            return True
        return False

    @staticmethod
    def _wait_until(
        when: float, sleep: Callable[[float], Any], stopping: Callable[[], bool]
    ) -> bool:
        """Sleep until ``when`` (the worker's clock); False if stopping first.
        (A worker's sleep also ends early when new mail is announced.)"""
        while True:
            left = when - time.time()
            if left <= 0.001:
                return True
            sleep(left)
            if time.time() < when - 0.001 and stopping():  # woken early
                return False

    def _held(self, seconds: float, why: str) -> None:
        """Note that the route is held ``seconds`` more (said once per pass)."""
        with self.lock:
            self.held_for = seconds if self.held_for is None else min(self.held_for, seconds)
            said, self._said = self._said, True
        if why == "provider pause":
            # Once per pause in a process (each pass has a new gate).
            with _TOLD_LOCK:
                said = said or _TOLD.get(self.key) == self.paused_until
                _TOLD[self.key] = self.paused_until
        if not said:
            if why == "provider pause":
                logger.info(
                    "Route %s is paused at its provider's request for %.1fs more (%s); "
                    "its mail waits on the queue.",
                    self.key,
                    seconds,
                    self.reason or "pushback",
                )
            else:
                logger.info(
                    "Route %s has used its quota (%s); its mail waits %.1fs on the queue.",
                    self.key,
                    why,
                    seconds,
                )
        return None

    def _sql(self) -> tuple[str, list[Any], dict[str, int], int]:
        """The reserving ``UPDATE`` for now: (sql, params, windows, now µs)."""
        connection = connections[self.db]
        quote = connection.ops.quote_name
        now = now_us()
        sets: list[str] = []
        set_params: list[Any] = []
        where = [f"{quote('route')} = %s", f"{quote('paused_until')} <= %s"]
        where_params: list[Any] = [self.key, now]
        windows: dict[str, int] = {}
        for limit in self.windows:
            number = window_of(limit, now)
            windows[limit.unit] = number
            win, count = quote(f"{limit.unit}_window"), quote(f"{limit.unit}_count")
            # MariaDB/MySQL assign left to right with the new values: the
            # count first, while the window column still holds the old one.
            # A window only moves forward: a worker whose clock is behind
            # counts in the window another has already begun.
            sets.append(f"{count} = CASE WHEN {win} >= %s THEN {count} + 1 ELSE 1 END")
            sets.append(f"{win} = CASE WHEN {win} > %s THEN {win} ELSE %s END")
            set_params += [number, number, number]
            where.append(f"({win} < %s OR {count} < %s)")
            where_params += [number, limit.count]
        if self.per_second is not None:
            step = US // self.per_second.count
            slot = quote("slot_at")
            later = f"CASE WHEN {slot} > %s THEN {slot} ELSE %s END + %s"
            if connection.vendor == "mysql":
                # The new value comes back as the statement's insert id (no
                # RETURNING on MariaDB's UPDATE): still one round trip.
                later = f"LAST_INSERT_ID({later})"
            sets.insert(0, f"{slot} = {later}")
            set_params[0:0] = [now, now, step]
            where.append(f"{slot} <= %s")
            where_params.append(now + int(HORIZON * US))
        table = quote(RouteQuota._meta.db_table)
        sql = f"UPDATE {table} SET {', '.join(sets)} WHERE {' AND '.join(where)}"
        if self.per_second is not None and _returning(connection):
            sql += f" RETURNING {quote('slot_at')}"
        return sql, set_params + where_params, windows, now

    def _reserve(self) -> Slot | None:
        sql, params, windows, now = self._sql()
        for _ in range(2):
            connection = connections[self.db]
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                got = cursor.rowcount
                slot_at = None
                if self.per_second is not None:
                    if connection.vendor == "mysql":
                        slot_at = int(cursor.lastrowid) if got else None
                    elif _returning(connection):
                        rows = cursor.fetchall()
                        got = len(rows)
                        slot_at = int(rows[0][0]) if rows else None
                    elif got:  # SQLite before 3.35: no RETURNING
                        table = connection.ops.quote_name(RouteQuota._meta.db_table)
                        cursor.execute(f"SELECT slot_at FROM {table} WHERE route = %s", [self.key])
                        slot_at = int(cursor.fetchone()[0])
            if got:
                at = now / US
                if slot_at is not None:
                    at = (slot_at - US // self.per_second.count) / US  # type: ignore[union-attr]
                return Slot(at=at, slot_at=slot_at, windows=windows)
            if RouteQuota.objects.using(self.db).filter(route=self.key).exists():
                return None
            ensure_row(self.db, self.key)
        return None

    def _free_in(self) -> tuple[float, str]:
        """Seconds until a slot may be free, and why it isn't now."""
        row = RouteQuota.objects.using(self.db).filter(route=self.key).first()
        now = now_us()
        if row is None:
            return 0.0, "rate limit"
        if row.paused_until > now:
            self.paused_until, self.reason = row.paused_until, row.pause_reason
            return (row.paused_until - now) / US, "provider pause"
        free, used_up = now, []
        if self.per_second is not None and row.slot_at - int(HORIZON * US) > now:
            free = row.slot_at - int(HORIZON * US)
            used_up.append(f"{self.per_second}: slots taken {HORIZON:.0f}s ahead")
        for limit in self.windows:
            number = max(window_of(limit, now), getattr(row, f"{limit.unit}_window"))
            used = getattr(row, f"{limit.unit}_count")
            if getattr(row, f"{limit.unit}_window") == number and used >= limit.count:
                free = max(free, (number + 1) * limit.seconds * US)
                used_up.append(f"{limit}: {used} sent this {UNIT_NAMES[limit.unit]}")
        return max(free - now, 0) / US + 0.01, "; ".join(used_up) or "rate limit"

    def give_back(self, slot: Slot) -> None:
        """``slot`` was not used: count it out again (a slot taken after it
        by another lane stays where it is)."""
        if slot is FREE or not self.limits:
            return
        connection = connections[self.db]
        quote = connection.ops.quote_name
        sets: list[str] = []
        params: list[Any] = []
        if slot.slot_at is not None and self.per_second is not None:
            col = quote("slot_at")
            sets.append(f"{col} = CASE WHEN {col} = %s THEN {col} - %s ELSE {col} END")
            params += [slot.slot_at, US // self.per_second.count]
        for unit, number in slot.windows.items():
            win, count = quote(f"{unit}_window"), quote(f"{unit}_count")
            sets.append(
                f"{count} = CASE WHEN {win} = %s AND {count} > 0 THEN {count} - 1 ELSE {count} END"
            )
            params.append(number)
        if not sets:
            return
        table = quote(RouteQuota._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET {', '.join(sets)} WHERE {quote('route')} = %s",
                [*params, self.key],
            )

    # -- pushback -----------------------------------------------------------------

    def pause(self, push: Pushback, key: str | None = None) -> float:
        """The provider asked to slow down: pause the route (``key``, default
        this gate's) for every worker (unless another already did) and log
        it once. Returns the seconds left of the pause."""
        if key is not None and key != self.key:
            # A message of another route (queued during a single-group pass).
            return Gate(key, self.db, route_limits(key)).pause(push)
        ensure_row(self.db, self.key)
        for _ in range(3):
            row = RouteQuota.objects.using(self.db).get(route=self.key)
            now = now_us()
            if row.paused_until > now:  # another lane or worker paused it
                self.paused_until, self.reason = row.paused_until, row.pause_reason
                return self._note_pause((row.paused_until - now) / US)
            in_a_row = row.pauses + 1 if now - row.paused_until < PAUSE_RESET * US else 1
            seconds = pause_seconds(in_a_row, push.retry_after)
            until = now + int(seconds * US)
            changed = (
                RouteQuota.objects.using(self.db)
                .filter(pk=row.pk, paused_until=row.paused_until, pauses=row.pauses)
                .update(paused_until=until, pauses=in_a_row, pause_reason=push.reason[:1000])
            )
            if changed:
                self.paused_until, self.reason = until, push.reason
                logger.warning(
                    "Route %s paused for %.1fs: its provider asked to slow down (%s). Its mail "
                    "waits on the queue, no attempt counted (pause %s in a row).",
                    self.key,
                    seconds,
                    push.reason,
                    in_a_row,
                )
                return self._note_pause(seconds)
        return 0.0

    def _note_pause(self, seconds: float) -> float:
        with _TOLD_LOCK:
            _TOLD[self.key] = self.paused_until
        with self.lock:
            self.held_for = seconds if self.held_for is None else min(self.held_for, seconds)
            self._said = True  # the pause is logged once, by whoever set it
        return seconds


def pause_seconds(in_a_row: int, retry_after: float | None) -> float:
    """How long the ``in_a_row``-th pause in a row lasts (``Retry-After``
    when the provider gave one)."""
    if retry_after is not None:
        return min(max(retry_after, PAUSE_RETRY_AFTER_MIN), PAUSE_RETRY_AFTER_MAX)
    base = min(PAUSE_MAX, PAUSE_FIRST * 2 ** min(in_a_row - 1, 30))
    return min(PAUSE_MAX, base * random.uniform(*PAUSE_JITTER))


#: A worker (``runmailer``, ``runmailer_pg``) reads the routes paused by
#: their providers at most this often; a pass without a worker's session
#: (cron's ``send_mail``, a task) reads them once.
PAUSE_LOOK_SECONDS = 5.0


def paused_routes(db: str, kept: dict[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """Routes paused now: key -> (paused until, µs; the reason). One query,
    or none when ``kept`` (a worker's session's) holds a recent read."""
    if kept is not None:
        seen = kept.get(db)
        if seen is not None and time.monotonic() - seen[0] < PAUSE_LOOK_SECONDS:
            return dict(seen[1])
    rows = RouteQuota.objects.using(db).filter(paused_until__gt=now_us())
    paused = {r.route: (r.paused_until, r.pause_reason) for r in rows}
    if kept is not None:
        kept[db] = (time.monotonic(), paused)
    return paused


def gate(key: str, db: str, paused: dict[str, tuple[int, str]]) -> Gate:
    """The gate of the route ``key`` for one pass (``paused``: :func:`paused_routes`)."""
    until, reason = paused.get(key, (0, ""))
    return Gate(key, db, route_limits(key), until, reason)
