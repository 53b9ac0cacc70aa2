"""The admin of the log (``MessageLog``): what happened to each message, and the requeue action."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.core.mail import EmailMessage
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailer.admin.changelist import LargeTableAdmin
from mailer.admin.display import EMPTY, DenormalisedColumns, StoredEmailDisplay, _pre, when
from mailer.admin.filters import ResultFilter, WhenAttemptedFilter
from mailer.admin.routes import RouteColumns
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_MEDIUM,
    RESULT_LABELS,
    DontSendEntry,
    Message,
    MessageLog,
    get_message_id,
    queue_emails,
)
from mailer.validation import validate_email

REQUEUE_CHUNK = 500


class MessageLogAdmin(RouteColumns, DenormalisedColumns, StoredEmailDisplay, LargeTableAdmin):
    # What happened comes first; the long Message-ID is shortened (in full in
    # its tooltip and on the detail page) so the row fits a laptop screen.
    list_display = [
        "result_display",
        "when_attempted_display",
        "recipients_display",
        "subject_display",
        "log_message_display",
        "message_id_column",
        "id",
    ]
    # No date hierarchy: on a log of millions of rows it would scan the table
    # for its year/month links on every page; a date filter costs nothing.
    list_filter = [ResultFilter, ("when_attempted", WhenAttemptedFilter)]
    search_fields = ["message_id", "recipients", "subject_text"]
    search_help_text = _("Search by Message-ID, recipient address or subject.")
    actions = ["requeue"]
    fieldsets = [
        (
            _("Attempt"),
            {
                "fields": (
                    "id",
                    "result_display",
                    "when_attempted_display",
                    "full_log_message",
                    "message_id_display",
                    "priority_display",
                    "route_display",
                    "when_added_display",
                    "all_recipients",
                )
            },
        ),
        *StoredEmailDisplay.email_fieldsets,
    ]
    readonly_fields = flatten_fieldsets(fieldsets)  # every field is read-only

    # Log ids grow in the order attempts are logged, so sorting by id gives
    # the attempt order without sorting the whole (unindexed) column.
    @admin.display(description=_("when attempted"), ordering="id")
    def when_attempted_display(self, obj: MessageLog) -> Any:
        return when(obj.when_attempted)

    @admin.display(description=_("result"), ordering="result")
    def result_display(self, obj: MessageLog) -> str:
        return str(RESULT_LABELS.get(obj.result, obj.result))

    @admin.display(description=_("log message"))
    def log_message_display(self, obj: MessageLog) -> str:
        return Truncator(obj.log_message).chars(80) if obj.log_message else EMPTY

    @admin.display(description=_("log message"))
    def full_log_message(self, obj: MessageLog) -> Any:
        return _pre(obj.log_message) if obj.log_message else EMPTY

    def detail_title(self, obj: MessageLog) -> str:
        # From the columns, not the stored email: a don't-send entry's email
        # has nobody left in To, its recipients column keeps who was suppressed.
        return str(
            _("%(result)s: %(subject)s to %(recipients)s, %(when)s")
            % {
                "result": RESULT_LABELS.get(obj.result, obj.result),
                "subject": self._what(obj),
                "recipients": self._who(obj),
                "when": when(obj.when_attempted),
            }
        )

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        opts = Message._meta
        return request.user.has_perm(f"{opts.app_label}.add_{opts.model_name}")

    @admin.action(
        description=_("Requeue selected messages (send them again)"), permissions=["requeue"]
    )
    def requeue(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Put each logged message back on the queue, with its Message-ID.

        The new queue entry keeps the logged priority (a message logged while
        deferred goes back at medium priority), goes through the don't-send
        list like any new message, keeps its route, and carries the same
        ``Message-ID`` so the receiver can tell it is a resend.
        """
        queued = not_kept = undecodable = invalid = 0
        # By (priority, route): the resend goes the way the message went.
        groups: dict[tuple[int, str | None], list[EmailMessage]] = defaultdict(list)

        def flush() -> int:
            # Queueing no longer consults the don't-send list (delivery
            # does), but a requeue of mail nobody may receive is pointless:
            # one query per chunk leaves those out.
            blocked = DontSendEntry.objects.blocked_among(
                a for emails in groups.values() for e in emails for a in e.recipients()
            )
            count = 0
            with transaction.atomic(using=queryset.db):
                for (priority, route), emails in groups.items():
                    wanted = [
                        e
                        for e in emails
                        if not all(DontSendEntry.matches(a, blocked) for a in e.recipients())
                    ]
                    count += queue_emails(wanted, priority=priority, route=route)
            groups.clear()
            return count

        offered = 0
        rows = queryset.order_by("id").only(
            "id", "message_data", "message_id", "priority", "route"
        )
        for log in rows.iterator(chunk_size=REQUEUE_CHUNK):
            if not log.message_data:
                not_kept += 1
                continue
            email = log.email
            if email is None:
                undecodable += 1
                continue
            if get_message_id(email) is None and log.message_id:
                email.extra_headers = {**email.extra_headers, "Message-ID": log.message_id}
            try:
                validate_email(email)
            except ValueError:
                invalid += 1
                continue
            priority = log.priority if log.priority != PRIORITY_DEFERRED else PRIORITY_MEDIUM
            groups[priority, log.route].append(email)
            offered += 1
            if offered % REQUEUE_CHUNK == 0:
                queued += flush()
        queued += flush()
        blocked = offered - queued

        self.message_user(
            request,
            ngettext(
                "%(count)d message was put back on the queue.",
                "%(count)d messages were put back on the queue.",
                queued,
            )
            % {"count": queued},
            messages.SUCCESS if queued else messages.WARNING,
        )
        problems = [
            (
                not_kept,
                ngettext(
                    "%(count)d message can't be requeued: its content was not kept "
                    "(MAILER_EMAIL_LOG_MESSAGE_DATA is False).",
                    "%(count)d messages can't be requeued: their content was not kept "
                    "(MAILER_EMAIL_LOG_MESSAGE_DATA is False).",
                    not_kept,
                ),
            ),
            (
                undecodable,
                ngettext(
                    "%(count)d message can't be requeued: its stored data can't be decoded.",
                    "%(count)d messages can't be requeued: their stored data can't be decoded.",
                    undecodable,
                ),
            ),
            (
                invalid,
                ngettext(
                    "%(count)d message can't be requeued: it is not a valid email.",
                    "%(count)d messages can't be requeued: they are not valid emails.",
                    invalid,
                ),
            ),
            (
                blocked,
                ngettext(
                    "%(count)d message was not requeued: all its recipients are on the "
                    "don't-send list or it has none.",
                    "%(count)d messages were not requeued: all their recipients are on the "
                    "don't-send list or they have none.",
                    blocked,
                ),
            ),
        ]
        for count, text in problems:
            if count:
                self.message_user(request, text % {"count": count}, messages.WARNING)
