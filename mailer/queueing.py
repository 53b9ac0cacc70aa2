"""Putting mail on the queue: preparing messages, Message-IDs, row templates, inserts.

The path of a message from ``mailer.send_mail`` to its row: :func:`queue_emails`
checks and prepares each message (:mod:`mailer.validation`), encodes it
(:mod:`mailer.storage`), writes large attachments (:mod:`mailer.attachments`)
and inserts the rows (:mod:`mailer.rows`). :mod:`mailer.models` imports this
module (and re-exports its names), so the queue's model is found here through
the app registry, once.
"""

from __future__ import annotations

import copy
import functools
import gc
import itertools
import os
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from django.apps import apps
from django.core.mail import EmailMessage
from django.core.mail.utils import DNS_NAME
from django.db import router, transaction
from django.db.models.base import ModelState
from django.utils import timezone

from mailer import attachments, taskhook
from mailer.conf import conf
from mailer.mysql import packet_limit
from mailer.priorities import PRIORITY_MEDIUM
from mailer.retry import not_before_from
from mailer.rows import RowInserter
from mailer.validation import encode_for_queue, force_lazy, quick_check, validate_email

if TYPE_CHECKING:
    from mailer.models import Message


@functools.cache
def _message_model() -> type[Message]:
    """The queue's model, looked up once (``mailer.models`` imports this module)."""
    return cast("type[Message]", apps.get_model("mailer", "Message"))


def get_message_id(email: EmailMessage | None) -> str | None:
    """The ``Message-ID`` from the message's extra headers (any case), or None."""
    if email is None:
        return None
    for name, value in getattr(email, "extra_headers", {}).items():
        if name.lower() == "message-id":
            return value
    return None


def fill_search_fields(obj: Any, email: EmailMessage | None) -> None:
    """Copy ``email``'s recipients, subject and Message-ID onto ``obj`` (a row)."""
    if email is None:
        obj.recipients = obj.subject_text = ""
        obj.message_id = None
        return
    addresses = [*email.to, *getattr(email, "cc", []), *email.bcc]
    obj.recipients = "\n".join(str(a) for a in addresses)
    obj.subject_text = str(email.subject)
    obj.message_id = get_message_id(email)


def prepare_for_queue(email: EmailMessage) -> EmailMessage:
    """Check ``email``, give it a Message-ID; return the form to store.

    Raises ``ValueError`` naming the field for a message that can't be sent
    (see :mod:`mailer.validation`), so nothing unsendable is ever stored.
    The Message-ID is written onto ``email`` itself; lazy strings are forced
    in the active language in the returned form only (a copy when there were
    any).
    """
    return _prepare(email, quick_check(email), message_ids(str(DNS_NAME)))[0]


def message_ids(domain: str) -> Callable[[], str]:
    """A maker of ``Message-ID`` values in the form of ``email.utils.
    make_msgid(domain=domain)``: ``<time.pid.number@domain>``, with the time
    and process id read once.

    The number is 64 random bits for the first message, then counts up:
    the ids of one call are unique among themselves, and sort in the order
    they were made, so a bulk's entries go to the end of one place in the
    Message-ID index instead of 10,000 random places (on SQLite, 40% of the
    database's time per row of a bulk of 10,000). Another call (another time
    or process, another random start) meets the same ids with a chance of
    about one in 2**64 / its size, as random ids would.
    """
    prefix = f"<{int(time.time() * 100)}.{os.getpid()}."
    suffix = f"@{domain}>"
    numbers = itertools.count(random.getrandbits(64))
    return lambda: f"{prefix}{next(numbers) & _64_BITS}{suffix}"


_64_BITS = 2**64 - 1


def _prepare(
    email: EmailMessage, checked: bool | None, new_id: Callable[[], str]
) -> tuple[EmailMessage, str]:
    """``(form to store, Message-ID)``. ``checked``: :func:`quick_check`'s
    verdict; ``new_id``: a :func:`message_ids` maker."""
    if checked is None:
        stored = force_lazy(email)
        validate_email(stored)
    else:  # plain strings only: nothing lazy
        stored = email
        if not checked:
            validate_email(email)
    message_id = get_message_id(email)
    if message_id is None:
        message_id = new_id()
        email.extra_headers = {**email.extra_headers, "Message-ID": message_id}
        if stored is not email:
            stored.extra_headers = {**stored.extra_headers, "Message-ID": message_id}
    return stored, message_id


def _scheduled_form(stored: EmailMessage, send_at: Any) -> tuple[EmailMessage, datetime | None]:
    """``(form to store, not_before)`` for a message and its ``send_at``.

    ``send_at``: the caller's keyword, else the message's own ``send_at``
    attribute (django-anymail's). The queue keeps the schedule; the stored
    form drops the attribute (on a copy), so that a sending backend which
    reads it (anymail's) doesn't schedule the message a second time.
    """
    own = vars(stored).get("send_at")
    not_before = not_before_from(own if send_at is None else send_at)
    if "send_at" in vars(stored):
        stored = copy.copy(stored)
        delattr(stored, "send_at")  # an attribute EmailMessage doesn't declare
    return stored, not_before


def queue_emails(
    emails: Iterable[EmailMessage],
    *,
    priority: int = PRIORITY_MEDIUM,
    batch_size: int | None = None,
    send_at: Any = None,
    route: str | None = None,
) -> int:
    """Store messages on the queue in one bulk insert; return how many.

    Messages without any recipient are skipped. The don't-send list is not
    consulted here: it applies when each message's turn comes (see
    ``mailer.engine``), so an address added after queueing is honoured too
    and queueing costs no query for it. Each message gets its
    ``Message-ID`` now, written back onto the caller's object. A message
    Django would refuse raises ``ValueError`` (like Django, even with
    ``fail_silently``) and nothing is stored. Joins the caller's transaction.

    ``send_at`` (or a message's own ``send_at`` attribute, django-anymail's
    convention): not sent before that time; see ``mailer.retry.not_before_from``.
    ``route``: the alias the messages are delivered through (see
    ``mailer.routes``; ``None``: the delivery backend chosen as before).
    """
    # Python's cycle collector is off while a batch is queued. Queueing
    # makes a few dozen small containers per message, none in a reference
    # cycle, and every few hundred of them made the collector walk the young
    # objects (and now and then every object of the process): a third of
    # the time of queueing 10,000 messages. Cycles made meanwhile are
    # collected once it is back on. Left off if it was off.
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        return _queue_emails(emails, priority, batch_size, send_at, route)
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _row_template() -> dict[str, Any]:
    """The attributes of a new queue row with every field's default."""
    model = _message_model()
    template = model(priority=PRIORITY_MEDIUM, when_added=timezone.now()).__dict__.copy()
    del template["_state"]
    return template


_default_rows: dict[RowInserter, list[Any]] = {}


def _base_values(
    inserter: RowInserter, priority: int, when_added: datetime, connection: Any
) -> list[Any]:
    """A new row's values (every field's default) with ``priority`` and
    ``when_added``, prepared for ``inserter``'s database."""
    defaults = _default_rows.get(inserter)
    if defaults is None:
        defaults = _default_rows[inserter] = inserter.values(_new_row(_row_template()))
    values = defaults.copy()
    values[inserter.index["priority"]] = priority
    # What DateTimeField.get_db_prep_save() returns for timezone.now().
    ops = connection.ops
    values[inserter.index["when_added"]] = ops.adapt_datetimefield_value(when_added)
    return values


def _queue_emails(
    emails: Iterable[EmailMessage],
    priority: int,
    batch_size: int | None,
    send_at: Any,
    route: str | None = None,
) -> int:
    # Every message is checked before anything is stored: one bad message
    # refuses the whole batch.
    prepared: list[tuple[EmailMessage, datetime | None, bool, str]] = []
    new_id = message_ids(str(DNS_NAME))
    for e in emails:
        checked = quick_check(e)
        simple = checked is not None
        stored, message_id = _prepare(e, checked, new_id)
        if send_at is None and "send_at" not in vars(stored):
            prepared.append((stored, None, simple, message_id))  # not scheduled: the usual case
        else:
            prepared.append((*_scheduled_form(stored, send_at), simple, message_id))
    model = _message_model()
    using = router.db_for_write(model)
    inserter = RowInserter.for_model(model, using)
    # Large attachments are written to MAILER_ATTACHMENT_STORAGE before the
    # rows; should anything fail before the rows are in, they are deleted.
    written = attachments.Stored()
    # A simple message's row is a copy of one list of values, made from an
    # instance built by Django once per process, with one time for the whole
    # call. Other rows are copies of that instance (a tenth of
    # Model.__init__'s time); nothing about them is saved through the ORM.
    now = timezone.now()
    connection = inserter.connection  # this thread's: looked up once
    base = _base_values(inserter, priority, now, connection)
    if route is not None:
        base[inserter.index["route"]] = inserter.prepare(inserter.index["route"], route)
    at = inserter.index
    data, not_before_at = at["message_data"], at["not_before"]
    recipients_at, subject_at, id_at = at["recipients"], at["subject_text"], at["message_id"]
    rows: list[list[Any]] = []
    try:
        for email, not_before, simple, message_id in prepared:
            if simple:
                # No attachments (nor anything MAILER_ATTACHMENT_STORAGE
                # could take), nothing that could refer to stored ones.
                addresses = [*email.to, *email.cc, *email.bcc]
                if not any(addresses):  # email.recipients(), for plain strings
                    continue
                values = base.copy()
                values[data] = encode_for_queue(email, simple=True)
                values[recipients_at] = "\n".join(addresses)
                values[subject_at] = str(email.subject)
                values[id_at] = message_id
                if not_before is not None:
                    values[not_before_at] = inserter.prepare(not_before_at, not_before)
                rows.append(values)
                continue
            if not email.recipients():
                continue
            row = _new_row(
                {**_row_template(), "priority": priority, "when_added": now, "route": route}
            )
            row.not_before = not_before
            stored, row.attachment_bundle = attachments.store(email, written)
            row.email = stored
            fill_search_fields(row, email)
            rows.append(inserter.values(row))
        if not rows:
            return 0
        count = _insert(inserter, rows, batch_size, connection)
    except BaseException:
        written.discard()
        raise
    # MAILER_TASK_BACKEND: a delivery task once the transaction commits.
    taskhook.after_queueing(using, (p[1] for p in prepared))
    return count


def _new_row(attributes: dict[str, Any]) -> Message:
    model = _message_model()
    row = model.__new__(model)
    row.__dict__.update(attributes)
    row._state = ModelState()
    return row


def _insert(
    inserter: RowInserter, rows: list[list[Any]], batch_size: int | None, connection: Any
) -> int:
    using = inserter.using
    if len(rows) == 1 and connection.vendor != "mysql":
        # One send_mail call: a plain INSERT, which in autocommit needs no
        # BEGIN/COMMIT round trips (bulk_create always opens a transaction).
        inserter.insert_values(rows[0], connection)
        return 1
    if batch_size is None:
        batch_size = conf.MESSAGES_BATCH_SIZE
    with packet_limit(using, rows) as fit:
        if len(rows) == 1:
            inserter.insert_values(rows[0])
            return 1
        with transaction.atomic(using=using, savepoint=False):
            inserter.insert_rows(rows, fit(batch_size))
    return len(rows)
