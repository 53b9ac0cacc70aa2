"""Waking the workers when mail becomes sendable without an INSERT.

``runmailer_pg`` listens on :data:`CHANNEL`; the trigger notifies it of
every INSERT on the queue (:mod:`mailer.pgtrigger`). Mail also becomes
sendable, or falls due at a new time, through UPDATEs: ``retry_deferred``,
the admin's *Retry*, ``Message.requeue()``, and a deferral with an automatic
retry time (made by any process: ``send_mail``, the admin's *Send now*,
another worker), which an idle worker must wake for. Those code paths call
:func:`became_sendable`, which asks ``MAILER_TASK_BACKEND`` for a run
(:mod:`mailer.taskhook`) and calls :func:`notify`: one ``pg_notify`` on the same channel, delivered when their
transaction commits (PostgreSQL folds identical ones into one), nothing on
other databases. An UPDATE made by other code (a raw ``UPDATE``, your own
``Message.objects.update(...)``) is seen at the worker's next pass, within
``MAILER_EMPTY_QUEUE_SLEEP`` seconds.
"""

from __future__ import annotations

from typing import Any

from django.db import connections

from mailer import taskhook

#: The channel ``runmailer_pg`` listens on (the trigger's, too).
CHANNEL = "django_mailer_new_message"


def notify(using: str) -> None:
    """Tell ``runmailer_pg`` to look at the queue of ``using`` (PostgreSQL only)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


def became_sendable(using: str, due: Any = None) -> None:
    """Mail of ``using`` is sendable now (or at ``due``): wake whoever sends it.

    ``runmailer_pg`` is notified when the transaction commits; with
    ``MAILER_TASK_BACKEND`` set, a delivery task is asked for (at ``due``
    where the backend can defer).
    """
    taskhook.after_queueing(using, due)
    notify(using)
