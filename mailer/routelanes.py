"""A pass over several routes: which routes it serves, and one group of lanes
per route with mail, each group claiming only its own route's rows.

A route whose provider is slow or down then holds up only its own group:
the other routes' lanes keep claiming and sending in the same pass. A pass
over a queue without routed mail (no routes configured, or none with mail
waiting) is the single group over the whole queue it always was; a lane
there still delivers a routed row through its route (one connection per
route it meets).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from mailer import quotas, routes
from mailer.compat import delivery_alias, mailers_configured
from mailer.conf import conf
from mailer.connection import Session, _Sender
from mailer.models import RESULT_FAILURE, Message, MessageLog, MessageQuerySet, due_q
from mailer.pool import PassState, run_lanes

# 2.3.2's logger, which operators' logging configuration and alerts name.
logger = logging.getLogger("mailer.engine")

#: The name ``--route`` gives the unrouted mail (``route`` NULL) on Django
#: 4.2-6.0; with ``MAILERS`` it is the alias that mail is delivered through.
UNROUTED_NAME = routes.UNROUTED_NAME


def unrouted_name() -> str:
    """The ``--route`` name that serves unrouted mail (``route`` NULL)."""
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        try:
            return delivery_alias()
        except ImproperlyConfigured:
            return UNROUTED_NAME
    return UNROUTED_NAME


def require_served(names: Sequence[str]) -> list[str]:
    """``names`` (from ``--route``), or ``UnknownRoute`` for one that names nothing."""
    unrouted = unrouted_name()
    for name in names:
        if name != unrouted:
            routes.require_route(name)
    return list(dict.fromkeys(names))


def served_filter(names: Sequence[str]) -> Q:
    """The rows of the routes ``names`` (unrouted ones with :func:`unrouted_name`)."""
    q = Q(route__in=list(names))
    if unrouted_name() in names:
        q |= Q(route__isnull=True)
    return q


def served_rows(queryset: MessageQuerySet | None, names: Sequence[str] | None) -> MessageQuerySet:
    """``queryset`` (default: every row) restricted to the routes ``names`` (None: all)."""
    if queryset is None:
        queryset = Message.objects.all()
    return queryset if names is None else queryset.filter(served_filter(names))


#: The index a route's claim walks. MariaDB/MySQL lock every row a locking
#: read examines, matching or not, until the transaction ends (which spans
#: the SMTP exchange): a claim that walked the sending-order index would
#: hold rows of other routes, which their own lanes then skip (SKIP LOCKED)
#: as taken, ending their pass early. On this index a route's claim
#: examines its own rows only.
ROUTE_INDEX = "mailer_msg_route_order"


@dataclass
class RouteGroup:
    """The lanes of one route in a pass."""

    route: str | None
    queryset: MessageQuerySet
    lanes: int
    # Set by run_route_groups: are other groups' lanes still running?
    running: Any = None

    def others_running(self) -> bool:
        running = self.running
        return running is not None and running.others(self)


def route_lane(lane: Any, group: RouteGroup, threaded: bool) -> Callable[[], None]:
    """Make ``lane`` (an engine lane over ``group.queryset``) one of
    ``group``'s: in a thread or not, on the route index, with a second look
    on MariaDB/MySQL (:class:`Recheck`). Returns its body."""
    lane.pooled = threaded
    if group.lanes == 1:
        lane.shared = None  # one lane: its own claim position
    lane.index_hint = ROUTE_INDEX
    if threaded and lane.lock_rows and connections[lane.db].vendor == "mysql":
        lane.recheck = Recheck(group.queryset)
    run: Callable[[], None] = lane.run
    return run


def plan(
    queryset: MessageQuerySet, served: Sequence[str] | None, concurrency: int | None
) -> list[RouteGroup] | None:
    """The route groups of a pass, or None for the single group over
    ``queryset`` (nothing routed is waiting and no route was named).

    ``served``: the routes named with ``--route`` (None: every route).
    ``concurrency``: the lanes of a route without its own ``CONCURRENCY``.
    One indexed ``EXISTS`` per configured route (and one for unrouted
    mail) tells which have mail.
    Nothing is asked when the only route is the one unrouted mail goes
    through.
    """
    if served is not None:
        served = require_served(served)
    if served is None:
        # Mail routed to the alias unrouted mail goes through (MAILERS) needs
        # no lanes of its own: with nothing else routed, the single group
        # sends both (a plain Django 6.1 project asks nothing more per pass).
        unrouted = unrouted_name()
        others = [name for name in routes.route_names() if name != unrouted]
        if not others:
            return None
        present = [name for name in others if _has_rows(queryset.filter(route=name))]
        if not present and not quotas.rated_routes():
            # (With a RATE anywhere, a lane serves one route only: routed
            # mail queued during the pass waits for its own group.)
            return None
        if routes.is_route(unrouted) and _has_rows(queryset.filter(route=unrouted)):
            present.insert(0, unrouted)
        unrouted_rows = queryset.filter(route__isnull=True)
        groups = []
        if _has_rows(unrouted_rows):
            groups.append(RouteGroup(None, unrouted_rows, _lanes(None, concurrency)))
        return groups + [
            RouteGroup(name, queryset.filter(route=name), _lanes(name, concurrency))
            for name in present
        ]
    groups = []
    if unrouted_name() in served:
        groups.append(
            RouteGroup(None, queryset.filter(route__isnull=True), _lanes(None, concurrency))
        )
    for name in served:
        if routes.is_route(name):
            groups.append(RouteGroup(name, queryset.filter(route=name), _lanes(name, concurrency)))
    return groups


def take_slot(
    gate: Any,
    senders: LaneSenders,
    route: str | None,
    sleep: Callable[[float], Any],
    state: PassState,
    warmed: list[bool],
) -> Any:
    """A slot of ``gate``'s quota for the lane's next message (see
    :meth:`mailer.quotas.Gate.take`). Before the lane's first slot is used,
    its connection is opened (not before a slot: never to a route that is
    paused or used up); a slot that went by meanwhile is not used late, next
    to the slots after it, but exchanged for a fresh one."""
    slot = gate.take(sleep, state.asked_to_stop)
    if slot is None or slot is quotas.FREE or warmed[0]:
        return slot
    warmed[0] = True
    if senders.warm(route):
        return gate.renew(slot, sleep, state.asked_to_stop)
    return slot


def wait_out_hold(
    gate: Any, state: PassState, sleep: Callable[[float], Any], others_running: Any
) -> bool:
    """A lane of a route held by its quota or its provider's pause
    (``gate.held_for``) while other routes' lanes still run waits for the
    hold to end (at most ``MAILER_EMPTY_QUEUE_SLEEP``) rather than for the
    end of their pass; True once it may try again."""
    held_for = gate.held_for
    if held_for is None or others_running is None or state.asked_to_stop():
        return False
    if held_for > conf.EMPTY_QUEUE_SLEEP or not others_running():
        return False
    until = time.monotonic() + held_for
    while time.monotonic() < until:
        if not others_running() or state.asked_to_stop():
            return False
        sleep(min(until - time.monotonic(), 1.0))
    gate.held_for = None
    return True


class Recheck:
    """A route lane's second look before it ends its pass (MariaDB/MySQL,
    several lanes at once).

    A locking read there may lock, for a moment, the first row past the end
    of its range: another route's row, which that route's own claim then
    skips (``SKIP LOCKED``) as taken, and finds "nothing". A plain read (no
    lock) says whether due rows of this route are left; if so the lane looks
    again from the start, at most ``tries`` times, ``wait`` seconds apart
    (a row another worker really holds is sent by it, or by the next pass).
    """

    def __init__(self, queryset: MessageQuerySet, tries: int = 3, wait: float = 0.02) -> None:
        self.queryset = queryset
        self.tries = tries
        self.wait = wait

    def __call__(self) -> bool:
        """Look again? (The lane waits ``wait`` seconds first, outside its
        transaction, so the claim's locks are gone meanwhile.)"""
        if self.tries <= 0:
            return False
        self.tries -= 1
        return self.queryset.filter(due_q(timezone.now())).exists()


def _has_rows(queryset: MessageQuerySet) -> bool:
    return queryset.non_deferred().exists()


def _lanes(route: str | None, concurrency: int | None) -> int:
    lanes = routes.concurrency(route, concurrency)
    if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
        raise ValueError(f"concurrency must be a whole number >= 1, not {lanes!r}")
    return lanes


def run_route_groups(
    groups: Sequence[RouteGroup],
    lane_for: Callable[[RouteGroup, PassState, bool], Callable[[], None]],
    state: PassState,
    new_state: Callable[[], PassState],
    threads: bool = True,
) -> None:
    """Run one group of lanes per route, each with its own totals and limits
    (``new_state()``: a route that times out or reaches
    ``MAILER_EMAIL_MAX_DEFERRED`` stops only its own lanes); their totals go
    to ``state.result``. ``lane_for(group, its state, threaded)``: a lane's
    body (``threaded``: it runs in a thread of its own). ``threads`` False
    (a pass inside a transaction, whose rows other threads can't see): the
    groups run one after another in this thread, one lane each."""
    result: Any = state.result
    if not groups:
        result.drained = True
        return
    threaded = threads and (len(groups) > 1 or groups[0].lanes > 1)
    running = Running(groups) if threads and len(groups) > 1 else None
    runs = []
    for group in groups:
        own = new_state()
        lanes = group.lanes if threads else 1
        group.running = running
        body = lane_for(group, own, threaded)
        runs.append((lanes, body if running is None else running.wrap(group, body), own))
    try:
        if threads:
            run_groups(runs)
        else:
            for lanes, lane, own in runs:
                run_lanes(lanes, lane, own)
    finally:
        drained = True
        for _, _, own in runs:
            part: Any = own.result
            result.add(part)
            drained = drained and part.drained
            if own.pending is not None and state.pending is None:
                state.pending = own.pending
        result.drained = drained


class Running:
    """How many lanes of each route group of a pass are still running."""

    def __init__(self, groups: Sequence[RouteGroup]) -> None:
        self.lock = threading.Lock()
        self.lanes = {id(group): group.lanes for group in groups}

    def wrap(self, group: RouteGroup, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            finally:
                with self.lock:
                    self.lanes[id(group)] -= 1

        return run

    def others(self, group: RouteGroup) -> bool:
        with self.lock:
            return any(n > 0 for key, n in self.lanes.items() if key != id(group))


def run_groups(groups: Sequence[tuple[int, Callable[[], None], PassState]]) -> None:
    """Run every group's lanes at once, each in a thread (one lane alone runs
    in this thread). A lane that raises stops its own group from claiming
    more; the first such error is raised once every lane has finished."""
    if len(groups) == 1:
        run_lanes(*groups[0])
        return
    errors: list[BaseException] = []

    def guarded(lane: Callable[[], None], state: PassState) -> None:
        try:
            lane()
        except BaseException as exc:
            state.finish()
            errors.append(exc)

    total = sum(count for count, _, _ in groups)
    with ThreadPoolExecutor(max_workers=total, thread_name_prefix="mailer-route") as pool:
        for count, lane, state in groups:
            for _ in range(count):
                pool.submit(guarded, lane, state)
    if errors:
        raise errors[0]


class LaneSenders:
    """The connections one lane keeps: one per route it meets, taken from
    (and given back to) the worker's session when there is one. Shared by
    the lane's two threads when its connection pipelines."""

    def __init__(self, session: Session | None) -> None:
        self.session = session
        self.senders: dict[str | None, _Sender] = {}
        self.last: _Sender | None = None
        # A second thread shares these senders (the lane's connection
        # pipelines); one that doesn't pipeline is then used in turn.
        self.paired = False
        self._lock = threading.Lock()

    def get(self, route: str | None) -> _Sender:
        with self._lock:
            sender = self.senders.get(route)
            if sender is None:
                session = self.session
                sender = session.sender(route) if session is not None else _Sender(route)
                self.senders[route] = sender
            self.last = sender
            return sender

    def warm(self, route: str | None) -> bool:
        """Open ``route``'s connection if it isn't (a failure is met again,
        and recorded, when the message is sent); True if it was opened now."""
        sender = self.get(route)
        if sender.backend is not None:
            return False
        with contextlib.suppress(Exception):
            sender.get()
        return True

    def turn(self, sender: _Sender) -> contextlib.AbstractContextManager[Any]:
        """Hold while a message goes through ``sender``: nothing, or, once
        the lane has two threads, the sender's own lock if its connection
        doesn't pipeline (a backend need not be safe for two threads)."""
        if self.paired and not sender.may_pair():
            return sender.serial
        return contextlib.nullcontext()

    def may_pair(self) -> bool:
        """May a second thread join the lane? (The connection of its last
        message pipelines: see ``_Sender.may_pair``.)"""
        last = self.last
        return last is not None and last.may_pair()

    def keep(self) -> None:
        """The lane is done: its open connections go back to the session."""
        assert self.session is not None
        for sender in self.senders.values():
            self.session.keep(sender)

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()


def defer_unroutable(message: Message, result: Any) -> bool:
    """Defer ``message`` (logged with the reason) if its route is not
    configured any more; True if it was. Put back with ``retry_deferred``
    once the route is there again."""
    route = message.route
    if route is None or routes.is_route(route):
        return False
    where = "MAILERS" if mailers_configured() else "MAILER_ROUTES"
    reason = (
        f"Not sent: its route {route!r} is not in {where}; deferred until it is "
        "(then put it back with retry_deferred)."
    )
    logger.warning("Message %s: %s", message.pk, reason)
    with transaction.atomic(using=message._state.db):
        message.defer()
        MessageLog.objects.log(message, RESULT_FAILURE, log_message=reason)
    result.deferred += 1
    return True
