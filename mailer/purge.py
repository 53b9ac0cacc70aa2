"""Taking deferred messages that are too old off the queue, each logged as a failure.

``manage.py purge_deferred DAYS`` (upstream's open pull request #183): after
an outage, or for addresses that will never accept mail, deferred messages
queued more than ``DAYS`` days ago leave the queue. Each leaves a failure
entry in the log with the reason (and its data, unless
``MAILER_EMAIL_LOG_MESSAGE_DATA`` is off), so ``mailer.status`` says
"failed" and the admin's log still shows what was not sent. Work goes in
batches of ``MAILER_PURGE_BATCH_SIZE`` rows, one transaction each, the rows
locked where the database can: a message retried meanwhile (by
``retry_deferred``, the admin or an automatic retry) is no longer deferred
and stays.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import connections, router, transaction

from mailer import attachments, models
from mailer.conf import conf
from mailer.models import PRIORITY_DEFERRED, PRIORITY_MEDIUM, RESULT_FAILURE, Message, MessageLog
from mailer.mysql import packet_limit
from mailer.signals import message_failed, send_outcome


def reason(days: float) -> str:
    """The log text of a purged message."""
    return (
        f"Removed from the queue by purge_deferred: deferred, and queued more than "
        f"{days:g} day(s) ago"
    )


def purgeable(days: float, using: str | None = None) -> models.MessageQuerySet:
    """Deferred messages queued more than ``days`` days ago."""
    using = using or router.db_for_write(Message)
    limit = models.datetime_now() - timedelta(days=days)
    return Message.objects.using(using).deferred().filter(when_added__lt=limit)


def purge_deferred(
    days: float, *, batch_size: int | None = None, using: str | None = None
) -> int:
    """Take deferred messages queued more than ``days`` days ago off the queue,
    each logged as a failure with the reason; return how many."""
    using = using or router.db_for_write(Message)
    batch_size = batch_size or conf.PURGE_BATCH_SIZE
    text = reason(days)
    lock = connections[using].features.has_select_for_update
    total = 0
    while True:
        with transaction.atomic(using=using):
            qs = purgeable(days, using).order_by("id")
            if lock:
                qs = qs.select_for_update()
            batch = list(qs[:batch_size])
            if not batch:
                return total
            if lock:
                gone = batch  # locked: nobody retries them meanwhile
                Message.objects.using(using).filter(pk__in=[m.pk for m in batch]).delete()
            else:
                # SQLite: no row locks; a row retried since it was read is
                # not deleted (nor logged).
                gone = [
                    m
                    for m in batch
                    if Message.objects.using(using)
                    .filter(pk=m.pk, priority=PRIORITY_DEFERRED)
                    .delete()[0]
                ]
            entries = []
            for message in gone:
                entry = MessageLog.from_message(message, RESULT_FAILURE, text)
                # It leaves the queue: a failure, not a deferral (the log
                # tells them apart by PRIORITY_DEFERRED). The priority it had
                # before it was deferred is not kept; medium is what a retry
                # would have given it.
                entry.priority = PRIORITY_MEDIUM
                entries.append(entry)
                if message.attachment_bundle and not entry.attachment_bundle:
                    attachments.release_on_commit(message.attachment_bundle, using)
            with packet_limit(using, entries) as fit:  # MySQL's max_allowed_packet
                MessageLog.objects.using(using).bulk_create(entries, batch_size=fit(500))
            if message_failed.receivers:
                for message in gone:
                    send_outcome(message_failed, message, message.email, text)
            total += len(gone)
            if len(batch) < batch_size:
                return total
