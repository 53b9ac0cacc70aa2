"""The sending pool: what the lanes of one pass share.

With ``MAILER_CONCURRENCY = N`` a pass runs N *lanes* in threads of the
worker process, each with its own SMTP connection and its own database
connection, each claiming and sending one message at a time in sending
order. This module holds what they coordinate on, and nothing about
email: the pass's totals, the limits, the throttle, the stop request, and
(on SQLite, which has no row locks) the one claim cursor they share.

With N = 1 the pass runs its single lane in the calling thread and all of
this costs one uncontended lock per message. A lane whose SMTP connection
pipelines (RFC 2920) gets a second thread (:class:`SecondThread`), which
claims through the lane's :class:`Claims`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger("mailer.engine")


@dataclass
class PassResult:
    """What one ``send_all`` pass did."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    dont_send: int = 0
    seconds: float = 0.0
    locked_out: bool = False
    # The server stopped answering: every further message would wait the
    # whole SMTP timeout too, so the pass ends (the rest stays queued).
    timed_out: bool = False
    # The pass ended because it found nothing more to send.
    drained: bool = False
    # Deferrals because the mail server couldn't be reached (refused,
    # unreachable, timed out, hung up), and how the last one was put.
    unreachable: int = 0
    unreachable_error: str = ""
    # Messages put back because their provider asked to slow down (no
    # attempt counted), and the seconds until a route held by its quota or
    # a pause may send again (None: no route was held).
    held: int = 0
    held_for: float | None = None
    # MAILER_EMAIL_MAX_BATCH or MAX_DEFERRED ended (part of) the pass.
    limited: bool = False

    def add(self, other: Any) -> None:
        """Add ``other``'s counts (one message's, or a route group's)."""
        self.held += other.held
        self.limited = self.limited or other.limited
        if other.held_for is not None:
            self.hold(other.held_for)
        self.sent += other.sent
        self.deferred += other.deferred
        self.failed += other.failed
        self.dont_send += other.dont_send
        self.timed_out = self.timed_out or other.timed_out
        if other.unreachable:
            self.unreachable += other.unreachable
            self.unreachable_error = other.unreachable_error

    @staticmethod
    def handed(outcome: Any) -> bool:
        """Did the message of ``outcome`` reach the provider (so its quota
        slot is used)? (None: nothing was claimed.)"""
        if outcome is None:
            return False
        return bool(outcome.sent or outcome.held or outcome.deferred > outcome.unreachable)

    def hold(self, seconds: float) -> None:
        """A route is held for ``seconds`` (the earliest of all is kept)."""
        self.held_for = seconds if self.held_for is None else min(self.held_for, seconds)

    @property
    def attempted(self) -> int:
        return self.sent + self.deferred + self.failed + self.dont_send

    def __str__(self) -> str:
        if self.locked_out:
            return "lock held elsewhere, nothing sent"
        text = f"sent {self.sent}, deferred {self.deferred}, failed {self.failed}"
        if self.dont_send:
            text += f", don't send {self.dont_send}"
        if self.held:
            text += f", put back for a provider's pause {self.held}"
        return f"{text} in {self.seconds:.2f}s"


class Outcome(Protocol):
    """What one message did (the engine's ``PassResult`` is one)."""

    sent: int
    deferred: int
    failed: int
    dont_send: int
    timed_out: bool
    drained: bool  # the pass found nothing more to send
    unreachable: int  # deferred because the mail server couldn't be reached
    unreachable_error: str  # how the last of those was put
    held: int  # put back: the provider asked to slow down
    held_for: float | None  # seconds until a held route may send again

    def add(self, other: Any) -> None: ...

    def hold(self, seconds: float) -> None: ...


class PassState:
    """Shared by the lanes of one pass; every method is thread-safe.

    ``reserve()`` before claiming a message and ``settle()`` once it is
    recorded: a message between the two is *in flight*. Limits count the
    messages in flight, so ``MAILER_EMAIL_MAX_BATCH`` is never exceeded
    however many lanes run.
    """

    def __init__(
        self,
        result: Outcome,
        *,
        should_stop: Callable[[], bool] | None = None,
        limits_reached: Callable[[Any, int], bool] | None = None,
        pacer: PassState | None = None,
    ) -> None:
        self.result = result
        # Whose throttle slots this state takes (a route group's: the pass's).
        self.pacer = pacer
        self.should_stop = should_stop
        self.limits_reached = limits_reached
        self.lock = threading.Lock()
        self.in_flight = 0
        self.stopping = False
        self.pending: BaseException | None = None
        self._next_slot = 0.0


    def reserve(self) -> bool:
        """May this lane claim another message? (Counts it in flight if so.)"""
        asked_to_stop = self.should_stop is not None and self.should_stop()
        with self.lock:
            if self.stopping or self.result.timed_out:
                return False
            if asked_to_stop:
                logger.info("Stopping the pass on request.")
                self.stopping = True
                return False
            if self.limits_reached is not None and self.limits_reached(
                self.result, self.in_flight
            ):
                self.stopping = True
                return False
            self.in_flight += 1
            return True

    def asked_to_stop(self) -> bool:
        """Is the pass ending (the worker asked to stop, or a lane broke)?"""
        return self.stopping or (self.should_stop is not None and self.should_stop())

    def settle(self, outcome: Outcome | None, unexpected: BaseException | None = None) -> None:
        """The reserved message is done (``outcome`` None: nothing was claimed)."""
        with self.lock:
            self.in_flight -= 1
            if outcome is not None:
                self.result.add(outcome)
            if unexpected is not None and self.pending is None:
                self.pending = unexpected

    def hold(self, seconds: float) -> None:
        """A route of this pass is held for ``seconds`` (its quota, a pause)."""
        with self.lock:
            self.result.hold(seconds)

    def finish(self) -> None:
        """No lane claims anything more (the queue is empty, or a lane broke)."""
        with self.lock:
            self.stopping = True

    def pace(self, throttle: float, sleep: Callable[[float], Any]) -> None:
        """``MAILER_EMAIL_THROTTLE`` for the whole process: one message per
        ``throttle`` seconds however many lanes run (slots are handed out in
        turn, so lanes don't wake together)."""
        if self.pacer is not None:
            self.pacer.pace(throttle, sleep)
            return
        with self.lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + throttle
        if slot > now:
            sleep(slot - now)


class SharedCursor:
    """One claim position for all lanes, for databases without row locks.

    On SQLite a claim is a plain ``SELECT``: two lanes asking at once would
    get the same row. Claims go one at a time through this cursor, which
    only moves forward, so each row is claimed by one lane only.
    """

    def __init__(self, start: tuple[Any, ...]) -> None:
        self.lock = threading.Lock()
        self.after = start

    def claim(self, claim: Callable[[tuple[Any, ...]], tuple[Any, tuple[Any, ...]]]) -> Any:
        with self.lock:
            message, self.after = claim(self.after)
            return message


class Claims:
    """Where one thread of a lane claims its next message: after its own
    position in sending order (row locks keep threads apart), or through a
    :class:`SharedCursor` where there are none (SQLite)."""

    def __init__(self, after: tuple[Any, ...], shared: SharedCursor | None) -> None:
        self.after = after
        self.shared = shared

    def next(self, queries: Any) -> Any:
        """The next message (``queries.claim(after)``), or None."""
        if self.shared is not None:
            return self.shared.claim(queries.claim)
        message, self.after = queries.claim(self.after)
        return message

    def pair(self, lock_rows: bool) -> Claims:
        """The claims of a second thread of the lane (called by the first):
        without row locks both go through one cursor from here on."""
        if not lock_rows and self.shared is None:
            self.shared = SharedCursor(self.after)
        return Claims(self.after, self.shared)


class SecondThread:
    """A second thread that joins a lane once the lane's first thread has
    handled ``after`` messages and ``due()`` says so (the connection
    pipelines); ``prepare()``, called in the first thread, gives what it
    runs. An error in it stops the pass from claiming more."""

    def __init__(
        self,
        state: PassState,
        *,
        after: int,
        due: Callable[[], bool],
        prepare: Callable[[], Callable[[], None]],
    ) -> None:
        self.state = state
        self.after = after
        self.due = due
        self.prepare = prepare
        self.seen = 0
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start_if_due(self) -> None:
        """Called by the first thread after each message."""
        if self.thread is not None:
            return
        self.seen += 1
        if self.seen < self.after or self.state.stopping or not self.due():
            return
        target = self.prepare()

        def guarded() -> None:
            try:
                target()
            except BaseException as exc:
                self.state.finish()
                self.error = exc

        self.thread = threading.Thread(target=guarded, name="mailer-lane-2", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def run_lanes(count: int, lane: Callable[[], None], state: PassState) -> None:
    """Run ``lane`` ``count`` times at once (in this thread when ``count`` is 1).

    A lane that raises stops the others from claiming more; the first such
    error is raised once every lane has finished what it had in flight.
    """
    if count <= 1:
        lane()
        return
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            lane()
        except BaseException as exc:
            state.finish()
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="mailer-lane") as pool:
        for _ in range(count):
            pool.submit(guarded)
    if errors:
        raise errors[0]
