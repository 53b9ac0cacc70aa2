"""Waking ``runmailer_pg`` when mail becomes sendable without an INSERT.

``runmailer_pg`` listens on :data:`CHANNEL`; the trigger notifies it of
every INSERT on the queue (:mod:`mailer.pgtrigger`). Mail also becomes
sendable, or falls due at a new time, through UPDATEs: ``retry_deferred``,
the admin's *Retry*, ``Message.requeue()``, and a deferral with an automatic
retry time (made by any process: ``send_mail``, the admin's *Send now*,
another worker), which an idle worker must wake for. Those code paths call
:func:`notify`: one ``pg_notify`` on the same channel, delivered when their
transaction commits (PostgreSQL folds identical ones into one), nothing on
other databases. An UPDATE made by other code (a raw ``UPDATE``, your own
``Message.objects.update(...)``) is seen at the worker's next pass, within
``MAILER_EMPTY_QUEUE_SLEEP`` seconds.
"""

from __future__ import annotations

from django.db import connections

#: The channel ``runmailer_pg`` listens on (the trigger's, too).
CHANNEL = "django_mailer_new_message"


def notify(using: str) -> None:
    """Tell ``runmailer_pg`` to look at the queue of ``using`` (PostgreSQL only)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])
