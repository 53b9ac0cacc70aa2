"""Asking Django's tasks framework for delivery runs: the framework (core or
the django-tasks backport), enqueueing ``mailer.tasks.send_queued_mail``, and
the hook called where mail is put on the queue.

``after_queueing(using, due)``: with ``MAILER_TASK_BACKEND`` set, the
transaction asks for one run when it commits (one per transaction, however
many messages), plus one at each later due second (``send_at``, automatic
retries) where the backend can defer. Nothing for a transaction that rolls
back. Unset, it costs one setting read. The task itself is in
:mod:`mailer.tasks` (which imports the delivery engine, so this module,
imported by the models, only names it). See docs/tasks.rst.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from mailer.conf import conf

logger = logging.getLogger("mailer.tasks")

#: Where workers find the task (a constant, never read from the database).
TASK_PATH = "mailer.tasks.send_queued_mail"

_UNSET: Any = object()
_framework: Any = _UNSET

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


def enqueue(alias: str, run_after: datetime | None = None) -> Any:
    """Enqueue ``send_queued_mail`` on ``TASKS[alias]`` (at ``run_after``)."""
    task = import_string(TASK_PATH)
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
