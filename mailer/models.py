"""The queue (``Message``), the log (``MessageLog``) and the don't-send list."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from django.core.mail import EmailMessage
from django.db import models, router
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from mailer import attachments, taskhook, wakeup
from mailer.conf import ROUTE_MAX_LENGTH, conf
from mailer.mysql import packet_limit

# The priorities (mailer.priorities), importable here as in 2.3.2.
from mailer.priorities import PRIORITIES as PRIORITIES
from mailer.priorities import PRIORITY_DEFERRED as PRIORITY_DEFERRED
from mailer.priorities import PRIORITY_HIGH as PRIORITY_HIGH
from mailer.priorities import PRIORITY_LOW as PRIORITY_LOW
from mailer.priorities import PRIORITY_MAPPING as PRIORITY_MAPPING
from mailer.priorities import PRIORITY_MEDIUM as PRIORITY_MEDIUM

# Putting mail on the queue (mailer.queueing): its names stay importable here.
from mailer.queueing import fill_search_fields as fill_search_fields
from mailer.queueing import get_message_id as get_message_id
from mailer.queueing import message_ids as message_ids
from mailer.queueing import prepare_for_queue
from mailer.queueing import queue_emails as queue_emails
from mailer.rows import RowInserter as RowInserter

# Encoding and (safe) decoding live in mailer.storage; the names stay
# importable from here as in 2.3.2.
from mailer.storage import db_to_email as db_to_email
from mailer.storage import decode
from mailer.storage import decode_error as decode_error
from mailer.storage import email_to_db as email_to_db
from mailer.validation import encode_for_queue

logger = logging.getLogger(__name__)

RESULT_SUCCESS = "1"
RESULT_DONT_SEND = "2"
RESULT_FAILURE = "3"

RESULT_CODES = (
    (RESULT_SUCCESS, "success"),
    (RESULT_DONT_SEND, "don't send"),
    (RESULT_FAILURE, "failure"),
)

# Labels shown in forms and the admin (the stored choices keep 2.3.2's words).
PRIORITY_LABELS = {
    PRIORITY_HIGH: _("high"),
    PRIORITY_MEDIUM: _("medium"),
    PRIORITY_LOW: _("low"),
    PRIORITY_DEFERRED: _("deferred"),
}
RESULT_LABELS = {
    RESULT_SUCCESS: _("success"),
    RESULT_DONT_SEND: _("don't send"),
    RESULT_FAILURE: _("failure"),
}


def datetime_now() -> datetime:
    """Now: the clock of age-based decisions (``purge_old_entries``).

    Looked up at each use, so a test can move it with
    ``mock.patch.object(mailer.models, "datetime_now")`` as in 2.3.2.
    """
    return timezone.now()


def _email_to_addresses(email: EmailMessage | None) -> list[str]:
    if email is None:
        return []
    if email.to:
        return list(email.to)
    # Like 2.3.2: a message to nobody but Bcc shows its Bcc.
    return list(email.bcc or [])


class _EmailProperties:
    """``email``, ``to_addresses`` and ``subject`` over ``message_data``."""

    message_data: str | None

    def decoded(self) -> tuple[Any, str | None]:
        """``(stored object, None)`` or ``(None, why it can't be decoded)``.

        Decoded once per value of ``message_data`` (see mailer.storage: no
        code outside the allow-list runs).
        """
        data = self.message_data
        cached = self.__dict__.get("_email_cache")
        if cached is not None and cached[0] is data:
            return cached[1], cached[2]
        obj, reason = decode(data)
        self.__dict__["_email_cache"] = (data, obj, reason)
        return obj, reason

    def _decode_email(self) -> EmailMessage | None:
        obj = self.decoded()[0]
        return obj if isinstance(obj, EmailMessage) else None

    @property
    def email(self) -> EmailMessage | None:
        """The stored message, or ``None`` when it can't be decoded or isn't one."""
        return self._decode_email()

    @email.setter
    def email(self, value: EmailMessage) -> None:
        self.message_data = encode_for_queue(value)
        self.__dict__["_email_cache"] = (self.message_data, value, None)

    @property
    def to_addresses(self) -> list[str]:
        return _email_to_addresses(self.email)

    @property
    def subject(self) -> str:
        email = self.email
        return str(email.subject) if email is not None else ""


# --- indexes -----------------------------------------------------------------

#: Characters of a text column that MySQL/MariaDB index (a TEXT column can
#: only be indexed by a prefix; Message-IDs are far shorter in practice).
MYSQL_TEXT_PREFIX = 255


class TextIndex(models.Index):
    """An index for equality lookups on text columns of any length.

    PostgreSQL: a hash index (a b-tree refuses values over ~2.7 kB, and a
    header may be that long). MySQL/MariaDB: a b-tree over a prefix of each
    column (a TEXT column can't be indexed whole). SQLite: a b-tree.
    """

    def create_sql(self, model: Any, schema_editor: Any, using: str = "", **kwargs: Any) -> Any:
        vendor = schema_editor.connection.vendor
        if vendor == "postgresql" and len(self.fields) == 1:
            return super().create_sql(model, schema_editor, using=" USING hash", **kwargs)
        if vendor != "mysql":
            return super().create_sql(model, schema_editor, using=using, **kwargs)
        fields = [model._meta.get_field(name) for name, _order in self.fields_orders]
        return schema_editor._create_index_sql(
            model,
            fields=fields,
            name=self.name,
            using=using,
            col_suffixes=[f"({MYSQL_TEXT_PREFIX})"] * len(fields),
            **kwargs,
        )


# --- Message ---------------------------------------------------------------


class MessageQuerySet(models.QuerySet):
    def high_priority(self) -> MessageQuerySet:
        return self.filter(priority=PRIORITY_HIGH)

    def medium_priority(self) -> MessageQuerySet:
        return self.filter(priority=PRIORITY_MEDIUM)

    def low_priority(self) -> MessageQuerySet:
        return self.filter(priority=PRIORITY_LOW)

    def non_deferred(self) -> MessageQuerySet:
        return self.exclude(priority=PRIORITY_DEFERRED)

    def deferred(self) -> MessageQuerySet:
        return self.filter(priority=PRIORITY_DEFERRED)

    def in_sending_order(self) -> MessageQuerySet:
        return self.order_by("priority", "when_added", "id")

    def retry_deferred(self, new_priority: int = PRIORITY_MEDIUM) -> int:
        """Put deferred messages back on the queue now; return how many moved.

        Each moved message's ``retry_count`` goes up by one and its automatic
        retry time, if it had one, is dropped: it is due at once. With
        ``MAILER_EMAIL_MAX_RETRIES`` set, messages that have used up their
        retries stay deferred.
        """
        qs = self.deferred()
        max_retries = conf.EMAIL_MAX_RETRIES
        if max_retries is not None:
            qs = qs.filter(retry_count__lt=max_retries)
        moved = qs.update(
            priority=new_priority, retry_count=models.F("retry_count") + 1, not_before=None
        )
        if moved:
            # The database written to (self.db would be the read one).
            wakeup.became_sendable(self._db or router.db_for_write(Message))  # type: ignore[attr-defined]
        return moved

    def due(self, now: datetime | None = None) -> MessageQuerySet:
        """Messages whose time has come: no ``not_before``, or one not after ``now``."""
        return self.filter(due_q(timezone.now() if now is None else now))

    def scheduled(self, now: datetime | None = None) -> MessageQuerySet:
        """Sendable messages held back until a later time (``send_at``)."""
        now = timezone.now() if now is None else now
        return self.non_deferred().filter(not_before__gt=now)

    def retrying(self) -> MessageQuerySet:
        """Deferred messages with an automatic retry time (``MAILER_AUTO_RETRY``)."""
        return self.deferred().filter(not_before__isnull=False)

    def waiting_for_operator(self) -> MessageQuerySet:
        """Deferred messages nothing retries by itself (``retry_deferred`` or the admin)."""
        return self.deferred().filter(not_before__isnull=True)

    def release_due_retries(self, now: datetime | None = None) -> int:
        """Put deferred messages whose automatic retry is due back on the queue.

        As ``retry_deferred`` does for every deferred message: at medium
        priority, ``retry_count`` up by one, due at once. Returns how many.
        """
        now = timezone.now() if now is None else now
        return self.retrying().filter(not_before__lte=now).update(
            priority=PRIORITY_MEDIUM, retry_count=models.F("retry_count") + 1, not_before=None
        )

    def next_due(self, *, retries: bool) -> datetime | None:
        """The earliest ``not_before`` the workers must wake for, or None.

        ``retries``: count deferred messages' automatic retry times too
        (``MAILER_AUTO_RETRY``). One scan of the ``not_before`` index.
        """
        qs = self.filter(not_before__isnull=False)
        if not retries:
            qs = qs.non_deferred()
        return qs.order_by("not_before").values_list("not_before", flat=True).first()


def due_q(now: datetime) -> models.Q:
    """The condition "due at ``now``" (the claim builds the same in SQL)."""
    return models.Q(not_before__isnull=True) | models.Q(not_before__lte=now)


MessageManager = models.Manager.from_queryset(MessageQuerySet)


class Message(_EmailProperties, models.Model):
    """An email waiting to be sent."""

    message_data = models.TextField()
    when_added = models.DateTimeField(default=timezone.now)
    priority = models.PositiveSmallIntegerField(choices=PRIORITIES, default=PRIORITY_MEDIUM)
    retry_count = models.IntegerField(default=0)
    # Not sent before this time: scheduled sending (send_at) on the queue, the
    # automatic retry time on a deferred message (MAILER_AUTO_RETRY). NULL:
    # at once (queued) or when an operator says so (deferred). 2.3.2 workers
    # don't know the column and ignore it.
    not_before = models.DateTimeField(null=True, blank=True, editable=False)
    # Denormalised at queue time so the admin can search without unpickling.
    message_id = models.TextField(null=True, blank=True, editable=False, db_index=False)
    recipients = models.TextField(null=True, blank=True, editable=False)
    subject_text = models.TextField(null=True, blank=True, editable=False)
    # The directory of its attachments in MAILER_ATTACHMENT_STORAGE, if any
    # (see mailer.attachments): indexed, so a bundle's last reference is
    # found without decoding anything.
    attachment_bundle = models.CharField(
        max_length=200, null=True, blank=True, editable=False, db_index=True
    )
    # The alias it is delivered through (see mailer.routes); NULL: the
    # delivery backend chosen as before (2.3.2's rows, sites without routes).
    route = models.CharField(max_length=ROUTE_MAX_LENGTH, null=True, blank=True, editable=False)

    objects = MessageManager()

    class Meta:
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        indexes = [
            models.Index(fields=["priority", "when_added", "id"], name="mailer_msg_sending_order"),
            # The claim of a pass's lanes for one route (mailer.routes).
            models.Index(
                fields=["route", "priority", "when_added", "id"], name="mailer_msg_route_order"
            ),
            # The workers' "when is the next message due" and the release of
            # due retries: a range at the start of this index.
            models.Index(fields=["not_before"], name="mailer_msg_not_before"),
            # mailer.status(message_id)
            TextIndex(fields=["message_id"], name="mailer_msg_message_id"),
        ]

    def __str__(self) -> str:
        # 2.3.2's words, which sites' own tests compare against.
        try:
            email = self.email
            if email is None:
                return "<Message repr unavailable>"
            to = ", ".join(_email_to_addresses(email))
            return f'On {self.when_added}, "{email.subject}" to {to}'
        except Exception:
            return "<Message repr unavailable>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self._state.adding and self.message_data:
            # Queued through make_message(): check it and give it its
            # Message-ID now, as every other way of queueing does.
            email = self.email
            if email is not None:
                written = attachments.Stored()
                stored, self.attachment_bundle = attachments.store(
                    prepare_for_queue(email), written
                )
                self.email = stored
                try:
                    self._save(*args, **kwargs)
                except BaseException:
                    written.discard()
                    raise
                return
        self._save(*args, **kwargs)

    def _save(self, *args: Any, **kwargs: Any) -> None:
        update_fields = kwargs.get("update_fields")
        data_saved = update_fields is None or "message_data" in update_fields
        if data_saved:
            self.fill_search_fields()
        using = kwargs.get("using") or router.db_for_write(Message, instance=self)
        adding = self._state.adding
        with packet_limit(using, [self] if data_saved else []):
            super().save(*args, **kwargs)
        if adding and self.priority != PRIORITY_DEFERRED:
            taskhook.after_queueing(using, self.not_before)

    def fill_search_fields(self) -> None:
        """Copy recipients, subject and Message-ID out of the pickle."""
        fill_search_fields(self, self.email)

    def defer(self, retry_at: datetime | None = None) -> None:
        """Take the message off the queue.

        ``retry_at``: when it is retried automatically (``MAILER_AUTO_RETRY``);
        ``None``: not until ``retry_deferred`` or an operator puts it back.
        """
        self.priority = PRIORITY_DEFERRED
        self.not_before = retry_at
        self.save(update_fields=["priority", "not_before"])
        if retry_at is not None:
            # An idle runmailer_pg (maybe another process's) must wake for it,
            # and MAILER_TASK_BACKEND gets a run at its time.
            wakeup.became_sendable(
                self._state.db or router.db_for_write(Message, instance=self), retry_at
            )

    def requeue(self, priority: int = PRIORITY_MEDIUM) -> None:
        """Put a message back on the queue to be sent now (whatever its time)."""
        self.priority = priority
        self.not_before = None
        self.save(update_fields=["priority", "not_before"])
        wakeup.became_sendable(self._state.db or router.db_for_write(Message, instance=self))


# --- don't-send list -------------------------------------------------------


class DontSendEntryQuerySet(models.QuerySet):
    def has_address(self, address: str) -> bool:
        """Is ``address`` on the don't-send list (case-insensitive)?"""
        return self.filter(to_address__iexact=address).exists()

    def blocked_among(self, addresses: Iterable[str]) -> set[str]:
        """The lower-cased members of ``addresses`` on the list, in one query."""
        lowered: set[str] = set()
        for address in addresses:
            if address:
                text = str(address).lower()
                lowered.add(text)
                lowered.add(parseaddr(text)[1] or text)
        if not lowered:
            return set()
        return set(
            self.annotate(lower_address=Lower("to_address"))
            .filter(lower_address__in=lowered)
            .values_list("lower_address", flat=True)
        )


    def all_addresses(self) -> frozenset[str]:
        """Every address on the list, lower-cased, in one query."""
        return frozenset(
            self.annotate(lower_address=Lower("to_address")).values_list(
                "lower_address", flat=True
            )
        )


DontSendEntryManager = models.Manager.from_queryset(DontSendEntryQuerySet)


class DontSendEntry(models.Model):
    to_address = models.EmailField(max_length=254)
    when_added = models.DateTimeField(default=timezone.now)

    objects = DontSendEntryManager()

    class Meta:
        verbose_name = _("don't send entry")
        verbose_name_plural = _("don't send entries")

    def __str__(self) -> str:
        return self.to_address

    @staticmethod
    def matches(address: Any, lowered: frozenset[str] | set[str]) -> bool:
        """Is ``address`` (``"a@x"`` or ``"Name <a@x>"``) among ``lowered``?"""
        text = str(address).lower()
        if text in lowered:
            return True
        parsed = parseaddr(text)[1]
        return bool(parsed) and parsed in lowered


def filter_recipient_list(lst: Iterable[str] | None) -> list[str] | None:
    """Drop addresses on the don't-send list; ``None`` stays ``None``."""
    if lst is None:
        return None
    lst = list(lst)
    blocked = DontSendEntry.objects.blocked_among(lst)
    if not blocked:
        return lst
    kept = []
    for address in lst:
        if str(address).lower() in blocked:
            logger.info("Skipping %s: it is on the don't-send list", address)
        else:
            kept.append(address)
    return kept


def make_message(
    subject: str = "",
    body: str = "",
    from_email: str | None = None,
    to: Iterable[str] | None = None,
    bcc: Iterable[str] | None = None,
    attachments: list[Any] | None = None,
    headers: dict[str, str] | None = None,
    priority: int | None = None,
) -> Message:
    """An unsaved ``Message`` holding an ``EmailMessage``.

    ``to`` and ``bcc`` are filtered through the don't-send list. Replace
    ``.email`` with any ``EmailMessage`` before ``save()`` if needed.
    """
    to = filter_recipient_list(to)
    bcc = filter_recipient_list(bcc)
    email = EmailMessage(
        subject=subject,
        body=body,
        from_email=from_email,
        to=to,
        bcc=bcc,
        attachments=attachments,
        headers=headers,
    )
    msg = Message(priority=PRIORITY_MEDIUM if priority is None else priority)
    msg.email = email
    return msg


# --- MessageLog --------------------------------------------------------------


class MessageLogQuerySet(models.QuerySet):
    def log(
        self,
        message: Message,
        result_code: str,
        log_message: str = "",
        *,
        keep_data: bool | None = None,
    ) -> MessageLog:
        """Record an attempt to send ``message`` with ``result_code``."""
        entry = self.model.from_message(message, result_code, log_message, keep_data=keep_data)
        entry.save(force_insert=True)
        return entry

    def purge_old_entries(
        self,
        days: float,
        result_codes: Iterable[str] | None = None,
        batch_size: int | None = None,
    ) -> int:
        """Delete entries attempted more than ``days`` ago; return the count.

        ``result_codes`` defaults to success only. Deletes in batches of
        ``MAILER_PURGE_BATCH_SIZE`` rows so a huge log never needs one huge
        statement (or one huge transaction). Stored attachments
        (``MAILER_ATTACHMENT_STORAGE``) that no queue row or log entry refers
        to any more are deleted with the last entry that did.
        """
        if result_codes is None:
            result_codes = [RESULT_SUCCESS]
        batch_size = batch_size or conf.PURGE_BATCH_SIZE
        limit = datetime_now() - timedelta(days=days)
        qs = self.filter(when_attempted__lt=limit, result__in=list(result_codes))
        total = 0
        while True:
            batch = list(qs.order_by("id").values_list("id", "attachment_bundle")[:batch_size])
            if not batch:
                return total
            deleted, _ = self.filter(id__in=[pk for pk, _ in batch]).delete()
            total += deleted
            # Stored attachments whose last reference was in this batch
            # (checked once the deletion is committed).
            for bundle in {b for _, b in batch if b}:
                attachments.release_on_commit(bundle, self.db)


MessageLogManager = models.Manager.from_queryset(MessageLogQuerySet)


class MessageLog(_EmailProperties, models.Model):
    """A record of an attempt to send a message."""

    message_data = models.TextField(null=True)
    message_id = models.TextField(editable=False, null=True)
    when_added = models.DateTimeField(db_index=True)
    priority = models.PositiveSmallIntegerField(choices=PRIORITIES, db_index=True)
    when_attempted = models.DateTimeField(default=timezone.now)
    result = models.CharField(max_length=1, choices=RESULT_CODES)
    log_message = models.TextField()
    recipients = models.TextField(null=True, blank=True, editable=False)
    subject_text = models.TextField(null=True, blank=True, editable=False)
    # The directory of its attachments in MAILER_ATTACHMENT_STORAGE, if any
    # (see mailer.attachments): indexed, so a bundle's last reference is
    # found without decoding anything.
    attachment_bundle = models.CharField(
        max_length=200, null=True, blank=True, editable=False, db_index=True
    )
    # The message's route (see mailer.routes); NULL: the default delivery.
    route = models.CharField(max_length=ROUTE_MAX_LENGTH, null=True, blank=True, editable=False)

    objects = MessageLogManager()

    class Meta:
        verbose_name = _("message log")
        verbose_name_plural = _("message logs")
        indexes = [
            # mailer.status(message_id)
            TextIndex(fields=["message_id"], name="mailer_log_message_id"),
            # Outcomes per hour (the admin's overview, mailer_status): one
            # range scan of this index, never of the table.
            models.Index(fields=["when_attempted", "result", "priority"], name="mailer_log_outcomes"),
        ]

    def __str__(self) -> str:
        # 2.3.2's words: with the content when it was kept (and can be
        # decoded), else the Message-ID.
        try:
            email = self.email
            if email is None:
                return f'On {self.when_attempted}, "{self.message_id}"'
            to = ", ".join(_email_to_addresses(email))
            return f'On {self.when_attempted}, "{email.subject}" to {to}'
        except Exception:
            return "<MessageLog repr unavailable>"

    # Read-only here, as in 2.3.2 (a log entry's message is not replaced).
    @property  # type: ignore[misc]
    def email(self) -> EmailMessage | None:
        return self._decode_email() if self.message_data else None

    @property
    def to_addresses(self) -> list[str] | None:  # type: ignore[override]
        email = self.email
        return None if email is None else _email_to_addresses(email)

    @property
    def subject(self) -> str | None:  # type: ignore[override]
        email = self.email
        return None if email is None else str(email.subject)

    @classmethod
    def from_message(
        cls,
        message: Message,
        result_code: str,
        log_message: str = "",
        *,
        email: EmailMessage | None = None,
        keep_data: bool | None = None,
        as_sent: bool = False,
    ) -> MessageLog:
        """An unsaved log entry for ``message`` (``email``: its decoded form).

        ``as_sent``: ``email`` is what the sending backend was given, maybe
        changed by it (headers it added, the Message-ID); the entry keeps
        that, serialized once here, as 2.3.2 does. Otherwise it keeps the
        stored data as queued. Nothing is kept (nor serialized) when
        ``MAILER_EMAIL_LOG_MESSAGE_DATA`` is False.
        """
        if keep_data is None:
            keep_data = conf.EMAIL_LOG_MESSAGE_DATA
        if email is None:
            email = message.email
        data = message.message_data if keep_data else None
        if keep_data and as_sent and email is not None:
            try:
                # Stored attachments stay references (the log keeps no copy).
                data = email_to_db(attachments.for_log(email))
            except Exception as err:
                # Sent already: never fail the bookkeeping over the copy.
                logger.warning(
                    "Message %s was sent, but the sent form can't be serialized (%s: %s); "
                    "the log keeps it as queued.",
                    message.pk,
                    type(err).__name__,
                    err,
                )
        entry = cls(
            message_data=data,
            attachment_bundle=message.attachment_bundle if data else None,
            when_added=message.when_added,
            priority=message.priority,
            route=message.route,
            result=result_code,
            log_message=log_message,
        )
        try:
            if email is None:
                raise ValueError("no message")
            fill_search_fields(entry, email)
        except Exception:
            # Undecodable or broken: keep what the row says about itself.
            entry.recipients = message.recipients or ""
            entry.subject_text = message.subject_text or ""
            entry.message_id = message.message_id
        return entry


from mailer.routequota import RouteQuota  # noqa: E402,F401  - a model of this app
