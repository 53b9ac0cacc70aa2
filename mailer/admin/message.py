"""The admin of the queue (``Message``): why a message waits, and the send and retry actions."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.db import router
from django.db.models import F, Max, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailer import wakeup
from mailer.admin.changelist import LargeTableAdmin
from mailer.admin.display import (
    EMPTY,
    DenormalisedColumns,
    StoredEmailDisplay,
    _placeholder,
    _pre,
    when,
)
from mailer.admin.filters import NextAttemptFilter, PriorityFilter
from mailer.admin.overview import overview
from mailer.admin.routes import RouteColumns
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_LABELS,
    Message,
    MessageLog,
    MessageQuerySet,
)

logger = logging.getLogger(__name__)


class MessageAdmin(RouteColumns, DenormalisedColumns, StoredEmailDisplay, LargeTableAdmin):
    list_display = [
        "id",
        "recipients_display",
        "subject_display",
        "priority_display",
        "retry_count_display",
        "next_attempt",
        "last_error_column",
        "when_added_display",
        "message_id_column",
    ]
    list_filter = [PriorityFilter, NextAttemptFilter]
    date_hierarchy = "when_added"
    search_fields = ["recipients", "subject_text", "message_id"]
    search_help_text = _("Search by recipient address, subject or Message-ID.")
    # "send_messages" is 2.3.2's name: projects list it in their own actions
    # and post it from their tests.
    actions = ["send_messages", "retry"]
    fieldsets = [
        (
            _("Queue"),
            {
                "fields": (
                    "id",
                    "priority_display",
                    "route_display",
                    "retry_count_display",
                    "next_attempt",
                    "when_added_display",
                    "all_recipients",
                )
            },
        ),
        (_("Delivery attempts"), {"fields": ("last_error", "attempts")}),
        *StoredEmailDisplay.email_fieldsets,
    ]
    readonly_fields = flatten_fieldsets(fieldsets)  # every field is read-only
    #: Log entries shown on a message's page (the newest; all are one search away).
    attempts_shown = 20

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        # A callable: the template calls it only when it renders the list
        # (an action's POST that redirects costs no query for it).
        url = reverse(f"{self.admin_site.name}:mailer_message_changelist")
        context = {**(extra_context or {}), "mailer_overview": lambda: overview(url)}
        return super().changelist_view(request, context)

    @admin.display(description=_("retry count"), ordering="retry_count")
    def retry_count_display(self, obj: Message) -> int:
        return obj.retry_count

    @admin.display(description=_("next attempt"), ordering="not_before")
    def next_attempt(self, obj: Message) -> Any:
        """When the message is next tried: its time, its retry, or an operator's say."""
        if obj.priority == PRIORITY_DEFERRED:
            if obj.not_before is None:
                return _placeholder(_("when an operator retries it"))
            return format_html("{} ({})", when(obj.not_before), _("automatic retry"))
        if obj.not_before is not None and obj.not_before > timezone.now():
            return format_html("{} ({})", when(obj.not_before), _("scheduled"))
        return EMPTY

    # -- why wasn't it sent? -------------------------------------------------------

    def attempts_of(self, obj: Message) -> QuerySet:
        """The log entries of this queue row, newest first.

        They carry the row's ``when_added`` (an indexed column, so this is no
        scan of a large log) and its Message-ID.
        """
        entries = MessageLog.objects.using(obj._state.db).filter(when_added=obj.when_added)
        if obj.message_id:
            entries = entries.filter(message_id=obj.message_id)
        else:
            entries = entries.filter(message_id__isnull=True)
        return entries.defer("message_data").order_by("-id")

    def prepare_rows(self, rows: list[Any]) -> None:
        """One query for the last error of every row on the page."""
        if not rows:
            return
        found: dict[tuple[Any, Any], str] = {}
        failures = (
            MessageLog.objects.using(rows[0]._state.db)
            .filter(result=RESULT_FAILURE, when_added__in={row.when_added for row in rows})
            .order_by("id")
            .values_list("when_added", "message_id", "log_message")
        )
        for when_added, message_id, text in failures:
            found[(when_added, message_id)] = text
        for row in rows:
            row.last_error_text = found.get((row.when_added, row.message_id))

    @admin.display(description=_("last error"))
    def last_error_column(self, obj: Message) -> Any:
        text = getattr(obj, "last_error_text", None)
        if not text:
            return EMPTY
        return format_html('<span title="{}">{}</span>', text, Truncator(text).chars(70))

    @admin.display(description=_("last error"))
    def last_error(self, obj: Message) -> Any:
        entry = self.attempts_of(obj).filter(result=RESULT_FAILURE).first()
        if entry is None:
            if obj.priority == PRIORITY_DEFERRED:
                return _placeholder(_("deferred, but no failure is logged for it"))
            return EMPTY
        return format_html(
            '{}<div class="help">{}</div>', _pre(entry.log_message), when(entry.when_attempted)
        )

    @admin.display(description=_("attempts"))
    def attempts(self, obj: Message) -> Any:
        entries = list(self.attempts_of(obj)[: self.attempts_shown])
        if not entries:
            return _placeholder(_("not attempted yet"))
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse(f"{self.admin_site.name}:mailer_messagelog_change", args=[entry.pk]),
                    when(entry.when_attempted),
                    RESULT_LABELS.get(entry.result, entry.result),
                    entry.log_message or EMPTY,
                )
                for entry in entries
            ),
        )
        table = format_html(
            '<table class="mailer-attempts"><thead><tr><th>{}</th><th>{}</th><th>{}</th>'
            "</tr></thead><tbody>{}</tbody></table>",
            _("when attempted"),
            _("result"),
            _("log message"),
            rows,
        )
        if not obj.message_id:
            return table
        search = reverse(f"{self.admin_site.name}:mailer_messagelog_changelist")
        return format_html(
            '{}<p><a href="{}?{}">{}</a></p>',
            table,
            search,
            urlencode({"q": obj.message_id}),
            _("Every log entry with this Message-ID"),
        )

    def detail_title(self, obj: Message) -> str:
        return str(
            _("%(subject)s to %(recipients)s, queued %(when)s")
            % {
                "subject": self._what(obj),
                "recipients": self._who(obj),
                "when": when(obj.when_added),
            }
        )

    def has_send_permission(self, request: HttpRequest) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    #: At most this many messages are sent inside the request of "Send
    #: selected messages now"; the rest of the selection is moved to the top
    #: of the queue (high priority) for the worker. 100 messages take a few
    #: seconds with a healthy SMTP server; a selection of 100,000 ran for
    #: over ten minutes inside one request. A subclass may change it.
    send_now_batch = 100
    #: ...and for at most this many seconds (a slow server): what is not
    #: sent by then is handed to the worker the same way.
    send_now_seconds = 20.0

    @admin.action(description=_("Send selected messages now"), permissions=["send"])
    def send_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        now = timezone.now()
        deferred = queryset.filter(priority=PRIORITY_DEFERRED).count()
        scheduled = queryset.scheduled(now).count()
        due = queryset.non_deferred().due(now)
        batch = list(
            due.in_sending_order().values_list("pk", flat=True)[: self.send_now_batch + 1]
        )
        beyond_batch = len(batch) > self.send_now_batch
        batch = batch[: self.send_now_batch]
        last_log_id = MessageLog.objects.aggregate(last=Max("id"))["last"] or 0
        deadline = time.monotonic() + self.send_now_seconds
        out_of_time: list[bool] = []

        def should_stop() -> bool:
            if time.monotonic() >= deadline:
                out_of_time.append(True)
                return True
            return False

        try:
            result = send_all(
                queryset=Message.objects.filter(pk__in=batch), should_stop=should_stop
            )
        except Exception as exc:
            logger.exception("Sending from the admin failed")
            self.message_user(
                request,
                _("Sending stopped with an error: %(error)s")
                % {"error": f"{type(exc).__name__}: {exc}"},
                messages.ERROR,
            )
            return
        if result.locked_out:
            self.message_user(
                request,
                _(
                    "Nothing was sent: another worker is sending right now (the send lock "
                    "is taken). Try again in a moment."
                ),
                messages.WARNING,
            )
        else:
            level = messages.SUCCESS if not (result.deferred or result.failed) else messages.WARNING
            self.message_user(
                request,
                _(
                    "Sending pass finished in %(seconds).1f s: %(sent)d sent, %(deferred)d "
                    "deferred, %(failed)d failed, %(dont_send)d with nobody to send to."
                )
                % {
                    "seconds": result.seconds,
                    "sent": result.sent,
                    "deferred": result.deferred,
                    "failed": result.failed,
                    "dont_send": result.dont_send,
                },
                level,
            )
            if result.deferred or result.failed:
                self.report_errors(request, last_log_id)
            if beyond_batch or out_of_time:
                self.hand_to_worker(request, due)
        if deferred:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected message is deferred and was not sent: retry it first.",
                    "%(count)d selected messages are deferred and were not sent: retry them first.",
                    deferred,
                )
                % {"count": deferred},
                messages.WARNING,
            )
        if scheduled:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected message is scheduled for later and was not sent: "
                    "retry it to send it now.",
                    "%(count)d selected messages are scheduled for later and were not sent: "
                    "retry them to send them now.",
                    scheduled,
                )
                % {"count": scheduled},
                messages.WARNING,
            )

    def hand_to_worker(self, request: HttpRequest, rest: MessageQuerySet) -> None:
        """Put what "Send now" did not get to at the top of the queue, and say so."""
        moved = rest.exclude(priority=PRIORITY_DEFERRED).update(priority=PRIORITY_HIGH)
        if not moved:
            return
        self.message_user(
            request,
            ngettext(
                "%(count)d more selected message was not sent now (this action sends at most "
                "%(batch)d messages, for at most %(seconds)d seconds): it was moved to the top "
                "of the queue (high priority) and the worker sends it next.",
                "%(count)d more selected messages were not sent now (this action sends at most "
                "%(batch)d messages, for at most %(seconds)d seconds): they were moved to the "
                "top of the queue (high priority) and the worker sends them next.",
                moved,
            )
            % {"count": moved, "batch": self.send_now_batch, "seconds": self.send_now_seconds},
            messages.INFO,
        )

    #: Errors quoted after a "Send now" (the rest are in the log).
    errors_reported = 5

    def report_errors(self, request: HttpRequest, after_log_id: int) -> None:
        """Quote the failures the pass just logged, so "deferred" comes with a why."""
        entries = list(
            MessageLog.objects.filter(pk__gt=after_log_id, result=RESULT_FAILURE)
            .only("id", "recipients", "subject_text", "log_message")
            .order_by("id")[: self.errors_reported + 1]
        )
        for entry in entries[: self.errors_reported]:
            self.message_user(
                request,
                _("Not sent: %(subject)s to %(recipients)s: %(error)s")
                % {
                    "subject": self._what(entry),
                    "recipients": self._who(entry),
                    "error": entry.log_message,
                },
                messages.ERROR,
            )
        if len(entries) > self.errors_reported:
            self.message_user(request, _("More errors are in the message log."), messages.ERROR)

    @admin.action(description=_("Retry selected deferred messages"), permissions=["send"])
    def retry(self, request: HttpRequest, queryset: QuerySet) -> None:
        # An operator's explicit choice: MAILER_EMAIL_MAX_RETRIES (which
        # limits the automatic retry_deferred) does not apply here, nor does
        # a message's automatic retry time or its send_at: due now.
        selected = queryset.count()
        moved = queryset.filter(priority=PRIORITY_DEFERRED).update(
            priority=PRIORITY_MEDIUM, retry_count=F("retry_count") + 1, not_before=None
        )
        brought_forward = queryset.scheduled().update(not_before=None)  # type: ignore[attr-defined]
        if moved or brought_forward:
            # runmailer_pg, MAILER_TASK_BACKEND; on the database written to.
            wakeup.became_sendable(queryset._db or router.db_for_write(Message))  # type: ignore[attr-defined]
        if brought_forward:
            self.message_user(
                request,
                ngettext(
                    "%(count)d scheduled message is due now instead of at its time.",
                    "%(count)d scheduled messages are due now instead of at their time.",
                    brought_forward,
                )
                % {"count": brought_forward},
                messages.SUCCESS,
            )
        self.message_user(
            request,
            ngettext(
                "%(count)d deferred message was put back on the queue.",
                "%(count)d deferred messages were put back on the queue.",
                moved,
            )
            % {"count": moved},
            messages.SUCCESS if moved else messages.WARNING,
        )
        skipped = selected - moved - brought_forward
        if skipped > 0:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected message was not deferred and was left as it was.",
                    "%(count)d selected messages were not deferred and were left as they were.",
                    skipped,
                )
                % {"count": skipped},
                messages.INFO,
            )
