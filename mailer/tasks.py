"""The ``send_queued_mail`` task of Django's tasks framework: one bounded
delivery pass, and its successor when mail is left.

``send_queued_mail`` runs ``mailer.engine.send_all`` with all its guarantees
(row locks, one committed transaction per message, the file lock) and, when
mail is left, enqueues its successor instead of holding the worker. It is a
task of ``django.tasks`` (Django 6.0+) or of the ``django-tasks`` backport
(Django 4.2 and 5.2), whichever is there; neither is a dependency. The task
object is made when first looked up (``from mailer.tasks import
send_queued_mail``, or a worker importing it by path), so importing this
module needs neither. Enqueueing after queueing is :mod:`mailer.taskhook`'s.
See docs/tasks.rst.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from mailer import engine
from mailer.conf import conf
from mailer.taskhook import after_queueing, backend, enqueue, framework, require_framework

logger = logging.getLogger(__name__)

# send_queued_mail is made on first access (the module's __getattr__).
__all__ = [  # noqa: F822
    "after_queueing",
    "backend",
    "enqueue",
    "framework",
    "send_queued_mail",
]

#: Messages a pass started by the task attempts when ``MAILER_EMAIL_MAX_BATCH``
#: is not set; when mail is left, a successor task goes on.
TASK_BATCH = 100

#: Seconds before a successor runs when the pass found the file lock held by
#: another pass (backends that can defer; see ``send_queued_mail``).
LOCKED_RETRY_SECONDS = 5.0

_task: Any = None
_task_lock = threading.Lock()


# --- the task ----------------------------------------------------------------------


def _send_queued_mail(context: Any, route: str | None = None) -> dict[str, Any]:
    """One bounded delivery pass; a successor is enqueued when mail is left.

    ``route``: serve only this route (see :mod:`mailer.routes`; ``None``:
    all mail). A name that is no route raises ``UnknownRoute``, sending
    nothing. A successor serves all mail.
    """
    routes = None
    if route is not None:
        from mailer.routelanes import require_served

        routes = require_served([route])
    alias = getattr(getattr(context, "task_result", None), "backend", None) or conf.TASK_BACKEND
    if conf.PAUSE_SEND:
        logger.info("MAILER_PAUSE_SEND is set: not sending.")
        successor = _successor(alias, conf.EMPTY_QUEUE_SLEEP)
        return {"paused": True, "successor": successor}
    budget = _Budget(TASK_BATCH if conf.EMAIL_MAX_BATCH is None else None)
    with _lock_refusal_as_info():
        result = engine.send_all(should_stop=budget, routes=routes)
    if result.locked_out:
        # Another pass (cron, runmailer, another task) holds the lock: it
        # sends what is due as it walks the queue. A look again shortly
        # covers what it leaves (its batch ran out, it was a partial pass).
        delay: float | None = LOCKED_RETRY_SECONDS
    elif result.drained:
        delay = None  # nothing due is left; later mail has its own runs
    elif result.timed_out or _deferred_limit(result):
        delay = conf.EMPTY_QUEUE_SLEEP  # the server is in trouble: not at once
    elif result.held_for is not None and not budget.spent() and not result.limited:
        # A route waits for its quota or its provider's pause (and nothing
        # else stopped the pass): the successor runs when it is free.
        delay = min(max(result.held_for, engine.MIN_DUE_WAIT), conf.EMPTY_QUEUE_SLEEP)
    else:
        delay = 0.0  # the batch ran out: go on
    successor = None if delay is None else _successor(alias, delay)
    return {
        "sent": result.sent,
        "deferred": result.deferred,
        "failed": result.failed,
        "dont_send": result.dont_send,
        "locked_out": result.locked_out,
        "drained": result.drained,
        "held": result.held,
        "held_for": result.held_for,
        "successor": successor,
    }


# The name workers import it by: mailer.tasks.send_queued_mail.
_send_queued_mail.__name__ = _send_queued_mail.__qualname__ = "send_queued_mail"


class _LockRefusalAsInfo(logging.Filter):
    """2.3.2's ERROR line for a held lock ("lock already in place. quitting.",
    meant for cron's mail) as INFO for this thread's pass: for a task it is
    routine, and a successor follows."""

    LINES = ("lock already in place. quitting.", "waiting for the lock timed out. quitting.")

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and record.msg in self.LINES:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


@contextlib.contextmanager
def _lock_refusal_as_info() -> Iterator[None]:
    engine_logger = logging.getLogger("mailer.engine")
    refusal = _LockRefusalAsInfo()
    engine_logger.addFilter(refusal)
    try:
        yield
    finally:
        engine_logger.removeFilter(refusal)


class _Budget:
    """``should_stop`` for ``send_all``: asked before each claim, it ends the
    pass after ``limit`` messages (``None``: never; ``MAILER_EMAIL_MAX_BATCH``
    bounds the pass then)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.asked = 0
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        if self.limit is None:
            return False
        with self.lock:
            self.asked += 1
            return self.asked > self.limit

    def spent(self) -> bool:
        """Did the pass end because its budget ran out?"""
        return self.limit is not None and self.asked > self.limit


def _deferred_limit(result: Any) -> bool:
    limit = conf.EMAIL_MAX_DEFERRED
    return limit is not None and result.deferred >= limit


def _successor(alias: str | None, delay: float) -> str | None:
    """Enqueue the next run ``delay`` seconds from now; say what was done.

    A backend that can't defer gets one only for ``delay`` 0 (else it would
    run at once and find the same state): the next queueing, cron's
    ``send_mail`` or ``runmailer`` cover the rest (``mailer.W021``).
    """
    if alias is None:
        return None
    at = None if delay <= 0 else timezone.now() + timedelta(seconds=delay)
    if at is not None and not getattr(backend(alias), "supports_defer", False):
        logger.info(
            "TASKS[%r] can't defer a task: no successor in %ss; the next queued mail, "
            "send_mail or runmailer sends what is waiting.",
            alias,
            delay,
        )
        return None
    enqueue(alias, at)
    return "now" if at is None else at.isoformat()


def send_queued_mail_task() -> Any:
    """The ``Task`` object (made once, on first use).

    Its own backend is ``MAILER_TASK_BACKEND``, else ``"default"``, else the
    first of ``TASKS`` (a worker's settings need not have a "default"); it
    is enqueued with ``.using(backend=...)`` and a worker runs it on the
    backend it came from.
    """
    global _task
    if _task is None:
        with _task_lock:
            if _task is None:
                tasks = require_framework()
                alias = conf.TASK_BACKEND
                if alias is None:
                    alias = tasks.DEFAULT_TASK_BACKEND_ALIAS
                    configured = getattr(settings, "TASKS", None) or {}
                    if configured and alias not in configured:
                        alias = next(iter(configured))
                _task = tasks.task(backend=alias, takes_context=True)(_send_queued_mail)
    return _task


def __getattr__(name: str) -> Any:
    # mailer.tasks.send_queued_mail, made when first looked up (by an import
    # or by a worker resolving the task's path).
    if name == "send_queued_mail":
        return send_queued_mail_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
