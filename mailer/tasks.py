"""Delivery through Django's tasks framework: the ``send_queued_mail`` task,
and its enqueueing once a transaction that queued mail commits.

* ``send_queued_mail`` runs one bounded delivery pass (``mailer.engine.
  send_all``, with all its guarantees: row locks, one committed transaction
  per message, the file lock) and, when mail is left, enqueues its successor
  instead of holding the worker. It is a task of ``django.tasks`` (Django
  6.0+) or of the ``django-tasks`` backport (Django 4.2 and 5.2), whichever
  is there; neither is a dependency. The task object is made when first
  looked up (``from mailer.tasks import send_queued_mail``, or a worker
  importing it by path), so importing this module needs neither.
* ``after_queueing(using, due)``, called where rows are put on the queue:
  with ``MAILER_TASK_BACKEND`` set, the transaction asks for one run when it
  commits (one per transaction, however many messages), plus one at each
  later due second (``send_at``, automatic retries) where the backend can
  defer. Nothing for a transaction that rolls back. Unset, it costs one
  setting read.

See docs/tasks.rst.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from mailer.conf import conf

logger = logging.getLogger(__name__)

# send_queued_mail is made on first access (the module's __getattr__).
__all__ = ["after_queueing", "enqueue", "framework", "send_queued_mail"]  # noqa: F822

#: Messages a pass started by the task attempts when ``MAILER_EMAIL_MAX_BATCH``
#: is not set; when mail is left, a successor task goes on.
TASK_BATCH = 100

#: Seconds before a successor runs when the pass found the file lock held by
#: another pass (backends that can defer; see ``send_queued_mail``).
LOCKED_RETRY_SECONDS = 5.0

_UNSET: Any = object()
_framework: Any = _UNSET
_task: Any = None
_task_lock = threading.Lock()

# The connection attribute holding what the open transaction will enqueue.
_PENDING = "_mailer_task_pending"


def framework() -> Any | None:
    """``django.tasks`` (Django 6.0+), else the ``django_tasks`` backport, else None."""
    global _framework
    if _framework is _UNSET:
        found = None
        for name in ("django.tasks", "django_tasks"):
            try:
                found = importlib.import_module(name)
            except ImportError:
                continue
            break
        _framework = found
    return _framework


def require_framework() -> Any:
    found = framework()
    if found is None:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            "mailer.tasks needs Django's tasks framework: Django 6.0 or later, or the "
            "django-tasks package on Django 4.2/5.2 (pip install django-tasks). "
            "Install it, or remove MAILER_TASK_BACKEND from your settings."
        )
    return found


def backend(alias: str) -> Any:
    """The task backend ``TASKS[alias]`` (the framework's error when unknown)."""
    return require_framework().task_backends[alias]


# --- the task ----------------------------------------------------------------------


def _send_queued_mail(context: Any, route: str | None = None) -> dict[str, Any]:
    """One bounded delivery pass; a successor is enqueued when mail is left.

    ``route``: routes are not in this version; only ``None`` (all mail) is
    accepted, so that a task enqueued for a route fails loudly instead of
    sending other mail.
    """
    if route is not None:
        raise ValueError(
            f"send_queued_mail(route={route!r}): this version of django-mailer has no "
            "routes; enqueue it without a route (all queued mail)."
        )
    # Imported here: mailer.engine imports the models, which import this
    # module to enqueue after queueing.
    from mailer import engine

    alias = getattr(getattr(context, "task_result", None), "backend", None) or conf.TASK_BACKEND
    if conf.PAUSE_SEND:
        logger.info("MAILER_PAUSE_SEND is set: not sending.")
        successor = _successor(alias, conf.EMPTY_QUEUE_SLEEP)
        return {"paused": True, "successor": successor}
    budget = _Budget(TASK_BATCH if conf.EMAIL_MAX_BATCH is None else None)
    with _lock_refusal_as_info():
        result = engine.send_all(should_stop=budget)
    if result.locked_out:
        # Another pass (cron, runmailer, another task) holds the lock: it
        # sends what is due as it walks the queue. A look again shortly
        # covers what it leaves (its batch ran out, it was a partial pass).
        delay: float | None = LOCKED_RETRY_SECONDS
    elif result.drained:
        delay = None  # nothing due is left; later mail has its own runs
    elif result.timed_out or _deferred_limit(result):
        delay = conf.EMPTY_QUEUE_SLEEP  # the server is in trouble: not at once
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
    """The ``Task`` object (made once, on first use)."""
    global _task
    if _task is None:
        with _task_lock:
            if _task is None:
                tasks = require_framework()
                alias = conf.TASK_BACKEND or tasks.DEFAULT_TASK_BACKEND_ALIAS
                _task = tasks.task(backend=alias, takes_context=True)(_send_queued_mail)
    return _task


def __getattr__(name: str) -> Any:
    # mailer.tasks.send_queued_mail, made when first looked up (by an import
    # or by a worker resolving the task's path).
    if name == "send_queued_mail":
        return send_queued_mail_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enqueue(alias: str, run_after: datetime | None = None) -> Any:
    """Enqueue ``send_queued_mail`` on ``TASKS[alias]`` (at ``run_after``)."""
    task = send_queued_mail_task()
    if run_after is None:
        return task.using(backend=alias).enqueue()
    return task.using(backend=alias, run_after=run_after).enqueue()


# --- enqueueing after queueing -------------------------------------------------------


def after_queueing(using: str, due: Any = None) -> None:
    """Mail was put on the queue on database ``using``: with
    ``MAILER_TASK_BACKEND`` set, ask for a delivery run once the transaction
    commits (at once outside a transaction).

    ``due``: when the mail may go (``None``: now), a datetime, or an
    iterable of such (read only when the setting is on).
    """
    alias = conf.TASK_BACKEND
    if alias is None:
        return
    _ask(alias, using, due)


def _ask(alias: str, using: str, due: Any) -> None:
    connection = connections[using]
    if connection.in_atomic_block:
        pending = getattr(connection, _PENDING, None)
        if pending is None or pending.alias != alias or not pending.registered_on(connection):
            pending = _Pending(alias)
            transaction.on_commit(pending, using=using)
            pending.hooks = connection.run_on_commit
            setattr(connection, _PENDING, pending)
        pending.add(due)
        return
    # Autocommit: the rows are committed already.
    pending = _Pending(alias)
    pending.add(due)
    pending()


def _ceil_second(when: datetime) -> datetime:
    if when.microsecond:
        return when.replace(microsecond=0) + timedelta(seconds=1)
    return when


class _Pending:
    """What one transaction asks of the task backend once it commits: a run
    now, and one at each later due second."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.now = False
        self.later: set[datetime] = set()
        self.hooks: list[Any] | None = None  # the connection's on-commit list

    def registered_on(self, connection: Any) -> bool:
        """Is this still among the connection's on-commit callbacks? (A
        rollback, or a rolled-back savepoint, drops it.)"""
        hooks = connection.run_on_commit
        if hooks is self.hooks:
            return True
        if any(entry[1] is self for entry in hooks):
            self.hooks = hooks
            return True
        return False

    def add(self, due: Any) -> None:
        if due is None:
            self.now = True
            return
        values: Iterable[Any] = (due,) if isinstance(due, datetime) else due
        now = timezone.now()
        for when in values:
            if when is None or when <= now:
                self.now = True
            else:
                self.later.add(_ceil_second(when))

    def __call__(self) -> None:
        """Enqueue what was asked; never raise (the mail is committed and
        stays queued whatever happens here)."""
        try:
            now = timezone.now()
            runs: list[datetime | None] = []
            if self.now or any(when <= now for when in self.later):
                runs.append(None)
            later = sorted(when for when in self.later if when > now)
            if later and not getattr(backend(self.alias), "supports_defer", False):
                logger.warning(
                    "TASKS[%r] can't defer a task: no run enqueued for the %s scheduled "
                    "time(s) of the mail just queued; send_mail (cron) or runmailer sends it "
                    "when due (see mailer.W021).",
                    self.alias,
                    len(later),
                )
                later = []
            runs.extend(later)
            for run_after in runs:
                enqueue(self.alias, run_after)
        except Exception:
            logger.exception(
                "Could not enqueue mailer.tasks.send_queued_mail on TASKS[%r] "
                "(MAILER_TASK_BACKEND); the mail stays queued for the next task, "
                "send_mail or runmailer.",
                self.alias,
            )
