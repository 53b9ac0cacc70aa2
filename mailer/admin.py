"""The admin: see, search, send, retry and requeue mail.

List pages read only the denormalised columns (``recipients``,
``subject_text``, ``message_id``) and never load ``message_data``, so a page
costs the same however large the stored messages are and nothing is
unpickled. Counting is bounded (:class:`CappedCountPaginator`): a table of
millions of rows is never ``COUNT(*)``-ed in full. Only the detail page
decodes the stored email, and shows a placeholder when it can't.

HTML bodies are shown inside ``<iframe sandbox="" srcdoc="...">`` (no
scripts, no same origin, no forms) with a Content-Security-Policy that lets
nothing load from the network, so a message can neither run code in the
admin nor phone home (tracking pixels, remote CSS) when someone opens it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.mail import EmailMessage
from django.core.paginator import EmptyPage, Page, PageNotAnInteger, Paginator
from django.db import connections, transaction
from django.db.models import F, Max, QuerySet
from django.http import FileResponse, Http404, HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailer import attachments as attachment_refs
from mailer.attachments import StoredAttachment
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_LABELS,
    PRIORITY_MEDIUM,
    RESULT_FAILURE,
    RESULT_LABELS,
    DontSendEntry,
    Message,
    MessageLog,
    MessageQuerySet,
    decode_error,
    get_message_id,
    queue_emails,
)
from mailer.overview import overview
from mailer.validation import validate_email

if TYPE_CHECKING:
    from django.contrib.admin.options import _FieldsetSpec
    from django.db.models.options import Options

logger = logging.getLogger(__name__)

EMPTY = "—"

#: The policy put inside every rendered HTML body: nothing may be fetched
#: (no remote images, CSS, fonts or frames); inline styles and ``data:``
#: images still show.
HTML_PREVIEW_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

#: How many rows list pages count at most before saying "more than".
DEFAULT_COUNT_CAP = 10_000


# --- counting large tables --------------------------------------------------------


def planner_row_estimate(queryset: QuerySet) -> int | None:
    """PostgreSQL's estimate of the rows in an *unfiltered* table, else None."""
    if queryset.query.where:
        return None
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    table = connection.ops.quote_name(queryset.model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    if not row or row[0] is None or row[0] < 0:
        return None  # never analysed
    return int(row[0])


class CappedCountPaginator(Paginator):
    """A paginator that never counts more than ``count_cap`` rows.

    The count is ``SELECT COUNT(*) FROM (SELECT ... LIMIT cap + 1)``: exact up
    to the cap, and never a scan of the whole table. Past the cap it is
    PostgreSQL's planner estimate when the list is unfiltered (one catalogue
    lookup) and otherwise the cap itself; either way ``count_is_exact`` is
    False and pages past the estimated end are simply empty instead of an
    error, so nobody gets stuck on a stale estimate.
    """

    count_cap = DEFAULT_COUNT_CAP

    def __init__(self, *args: Any, count_cap: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if count_cap is not None:
            self.count_cap = count_cap
        self.count_is_exact = True
        self.count_is_estimate = False

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if not isinstance(object_list, QuerySet):
            return len(object_list)
        counted = object_list.order_by()[: self.count_cap + 1].count()
        if counted <= self.count_cap:
            return counted
        self.count_is_exact = False
        estimate = planner_row_estimate(object_list)
        if estimate is not None and estimate > self.count_cap:
            self.count_is_estimate = True
            return estimate
        return self.count_cap

    def validate_number(self, number: Any) -> int:
        try:
            return super().validate_number(number)
        except EmptyPage:
            if self.count_is_exact or isinstance(number, bool):
                raise
            # An inexact count: a page past it may still hold rows.
            try:
                number = int(number)
            except (TypeError, ValueError) as err:
                raise PageNotAnInteger(str(err)) from err
            if number < 1:
                raise
            return number

    def page(self, number: Any) -> Page:
        number = self.validate_number(number)
        if self.count_is_exact:
            return super().page(number)
        bottom = (number - 1) * self.per_page
        # _get_page: Paginator's hook for the Page class (all supported
        # Djangos have it; django-stubs leaves it out as private).
        return self._get_page(  # type: ignore[attr-defined]
            self.object_list[bottom : bottom + self.per_page], number, self
        )


class _CheckboxRow:
    """What ``ModelAdmin.action_checkbox`` reads of a row: its pk and str()."""

    def __init__(self, pk: Any, label: str) -> None:
        self.pk = pk
        self.label = label

    def __str__(self) -> str:
        return self.label


def _row_label(obj: Any) -> str:
    """A short description of a row from its denormalised columns only."""
    first = next(iter((obj.recipients or "").splitlines()), "")
    subject = Truncator(obj.subject_text or "").chars(60)
    return f'{obj.pk}: "{subject}" {first}'.strip()


class LeanChangeList(ChangeList):
    """A change list whose rows are fetched without ``message_data``.

    Only the displayed rows are affected: actions still receive full rows
    (they get a fresh queryset from ``get_queryset``).
    """

    model_admin: LargeTableAdmin  # the only admin that uses this change list

    def get_results(self, request: HttpRequest) -> None:
        self.queryset = self.queryset.defer("message_data")
        super().get_results(request)
        self.model_admin.prepare_rows(self.result_list)


class LargeTableAdmin(admin.ModelAdmin):
    """Options shared by the queue and the log, tables that may be huge."""

    paginator = CappedCountPaginator
    count_cap = DEFAULT_COUNT_CAP
    show_full_result_count = False  # no unfiltered COUNT(*) next to every search
    list_per_page = 100
    if hasattr(admin, "ShowFacets"):  # Django 5.0+: facets count every filter choice
        show_facets = admin.ShowFacets.NEVER

    def get_paginator(
        self, request: HttpRequest, queryset: Any, per_page: int, *args: Any, **kwargs: Any
    ) -> Paginator:
        return self.paginator(queryset, per_page, *args, count_cap=self.count_cap, **kwargs)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LeanChangeList

    def prepare_rows(self, rows: list[Any]) -> None:
        """Fetch what the list columns need for the rows of one page, at once."""

    def detail_title(self, obj: Any) -> str:
        """The detail page's heading (and ``<title>``): what, to whom, when."""
        return str(obj)

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        obj = kwargs.get("obj", args[3] if len(args) > 3 else None)
        if obj is not None:
            context["subtitle"] = self.detail_title(obj)
        return super().render_change_form(request, context, *args, **kwargs)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def action_checkbox(self, obj: Any) -> Any:
        # Django labels each row's checkbox with str(obj), which would decode
        # the stored email (and, with message_data deferred, query for it).
        return super().action_checkbox(_CheckboxRow(obj.pk, _row_label(obj)))

    action_checkbox.__dict__.update(admin.ModelAdmin.action_checkbox.__dict__)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Stored mail is evidence: the detail page is read-only. The actions
        # ask for their own permissions below.
        return False


# --- showing values -----------------------------------------------------------------


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Render a placeholder instead of an error page when a value can't be shown."""

    def wrapper(self: Any, obj: Any) -> Any:
        try:
            return func(self, obj)
        except Exception:
            logger.warning("Could not display %s of %r", func.__name__, obj.pk, exc_info=True)
            return _placeholder(_("could not be displayed"))

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _placeholder(text: Any) -> SafeString:
    return format_html(
        '<span class="mailer-placeholder" style="font-style: italic">{}</span>', text
    )


def _recipient_list(value: str | None, limit: int = 3) -> str:
    addresses = [a for a in (value or "").splitlines() if a.strip()]
    if not addresses:
        return EMPTY
    shown = ", ".join(addresses[:limit])
    if len(addresses) > limit:
        more = len(addresses) - limit
        shown += " " + ngettext("(+%(count)d more)", "(+%(count)d more)", more) % {"count": more}
    return shown


def _addresses(values: Iterable[Any] | None) -> str:
    values = [str(v) for v in values or []]
    return ", ".join(values) if values else EMPTY


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def html_preview(html: str) -> SafeString:
    """``html`` in a sandboxed iframe that can run nothing and load nothing.

    ``srcdoc`` is escaped by ``format_html``, so the message can't close the
    attribute; the CSP ``<meta>`` comes first so it governs everything after
    it (the parser puts it in the document's ``<head>`` whatever follows).
    """
    srcdoc = (
        f'<meta http-equiv="Content-Security-Policy" content="{HTML_PREVIEW_CSP}">'
        '<meta name="referrer" content="no-referrer">' + html
    )
    return format_html(
        '<iframe class="mailer-html-preview" sandbox="" referrerpolicy="no-referrer" '
        'title="{}" srcdoc="{}" style="width: min(60em, 75vw); height: 32em; '
        'border: 1px solid var(--hairline-color, #ccc); background: #fff"></iframe>',
        _("HTML version of the message"),
        srcdoc,
    )


def _pre(text: str) -> SafeString:
    return format_html(
        '<pre style="white-space: pre-wrap; overflow-wrap: anywhere; margin: 0">{}</pre>', text
    )


def when(value: Any) -> str:
    """A datetime as the admin shows dates (``DATETIME_FORMAT``, current time zone)."""
    if value is None:
        return EMPTY
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    return date_format(value, "DATETIME_FORMAT")


def short_message_id(value: str | None, limit: int = 28) -> Any:
    """A Message-ID cut to ``limit`` characters for a list column; full in the tooltip."""
    if not value:
        return EMPTY
    if len(value) <= limit:
        return value
    return format_html(
        '<span title="{}" class="mailer-message-id">{}…</span>', value, value[: limit - 1]
    )


def _header(email: EmailMessage, name: str) -> Any:
    """The value of extra header ``name`` (any case), or None."""
    for key, value in (getattr(email, "extra_headers", None) or {}).items():
        if str(key).lower() == name.lower():
            return value
    return None


def _html_body(email: EmailMessage) -> str | None:
    if getattr(email, "content_subtype", "plain") == "html":
        return _text(email.body)
    for alternative in getattr(email, "alternatives", None) or []:
        content, mimetype = alternative[0], alternative[1]
        if str(mimetype).split(";")[0].strip().lower() == "text/html":
            return _text(content)
    return None


def _attachment_rows(email: EmailMessage) -> list[tuple[str, str, str, StoredAttachment | None]]:
    """``(file name, content type, size, reference)`` of each attachment, then
    of each alternative kept in ``MAILER_ATTACHMENT_STORAGE``."""
    rows = []
    for item in getattr(email, "attachments", None) or []:
        ref = attachment_refs.ref_in(item)
        if ref is not None:
            filename: Any = ref.name
            mimetype: Any = ref.mimetype
            size: int | None = ref.size
        elif isinstance(item, tuple):
            filename, content, mimetype = (list(item) + [None, None, None])[:3]
            if isinstance(content, str):
                size = len(content.encode("utf-8"))
            elif isinstance(content, bytes | bytearray):
                size = len(content)
            else:
                size = None
        else:  # a MIME part
            filename = item.get_filename() if hasattr(item, "get_filename") else None
            mimetype = item.get_content_type() if hasattr(item, "get_content_type") else None
            payload = item.get_payload(decode=True) if hasattr(item, "get_payload") else None
            size = len(payload) if isinstance(payload, bytes) else None
        rows.append(
            (
                str(filename) if filename else str(_("(no name)")),
                str(mimetype) if mimetype else EMPTY,
                filesizeformat(size) if size is not None else EMPTY,
                ref,
            )
        )
    for item in getattr(email, "alternatives", None) or []:
        ref = attachment_refs.ref_in(item)
        if ref is not None:
            rows.append(
                (str(_("(alternative)")), ref.mimetype or EMPTY, filesizeformat(ref.size), ref)
            )
    return rows


#: The request a detail page is being rendered for (read-only fields get only
#: the object): who may download stored attachments.
_detail_request: ContextVar[HttpRequest | None] = ContextVar("mailer_detail_request", default=None)


# --- 2.3.2's public names ------------------------------------------------------------
#
# A project's own admin may import these (list columns in its list_display, the
# mixin under its own ModelAdmin), so they keep 2.3.2's names and behaviour.
# They decode the stored email; our own list columns read the denormalised
# columns instead, so a list page never unpickles anything.


@admin.display(description=_("To"))
def show_to(message: Any) -> str:
    """The message's To addresses, comma-separated (its Bcc when it has no To)."""
    try:
        return ", ".join(str(a) for a in message.to_addresses or [])
    except Exception:
        logger.warning("Could not read the recipients of %r", message.pk, exc_info=True)
        return ""


@admin.display(description=_("Subject"))
def show_subject(message: Any) -> str:
    """The message's subject (empty when the data is missing or unreadable)."""
    try:
        return _text(message.subject)
    except Exception:
        logger.warning("Could not read the subject of %r", message.pk, exc_info=True)
        return ""


class MessageAdminMixin:
    """2.3.2's mixin for an admin of ``Message`` or ``MessageLog``.

    ``plain_text_body`` is a read-only field: the body text of the stored
    email, or a placeholder when there is none to show.
    """

    def _email(self, obj: Any) -> EmailMessage | None:
        try:
            return obj.email
        except Exception:
            logger.warning("Could not decode the stored email of %r", obj.pk, exc_info=True)
            return None

    def _missing(self, obj: Any) -> SafeString:
        if obj.message_data is None or obj.message_data == "":
            if isinstance(obj, MessageLog):
                return _placeholder(_("message content not kept"))
            return _placeholder(_("no message data"))
        return _placeholder(_("undecodable message data"))

    @admin.display(description=_("text body"))
    def plain_text_body(self, instance: Any) -> Any:
        email = self._email(instance)
        if email is None:
            return self._missing(instance)
        return _text(email.body)


class StoredEmailDisplay(MessageAdminMixin):
    """Read-only fields that show the decoded email on a detail page."""

    # Provided by the ModelAdmin this is mixed into.
    admin_site: admin.AdminSite
    opts: Options[Any]

    email_fields = (
        "stored_data",
        "from_display",
        "to_display",
        "cc_display",
        "bcc_display",
        "reply_to_display",
        "email_subject",
        "email_message_id",
        "extra_headers_display",
        "text_body",
        "html_body",
        "attachments_display",
    )

    email_fieldsets: _FieldsetSpec = (
        (
            _("Headers"),
            {
                "fields": (
                    "from_display",
                    "to_display",
                    "cc_display",
                    "bcc_display",
                    "reply_to_display",
                    "email_subject",
                    "email_message_id",
                    "extra_headers_display",
                )
            },
        ),
        (
            _("Content"),
            {"fields": ("stored_data", "text_body", "html_body", "attachments_display")},
        ),
    )

    def _from_email(self, obj: Any, render: Callable[[EmailMessage], Any]) -> Any:
        email = self._email(obj)
        if email is None:
            return self._missing(obj)
        return render(email)

    @admin.display(description=_("stored data"))
    @_guarded
    def stored_data(self, obj: Any) -> Any:
        if not obj.message_data:
            if isinstance(obj, MessageLog):
                return _placeholder(
                    _("Not kept: MAILER_EMAIL_LOG_MESSAGE_DATA was False when this was logged.")
                )
            return _placeholder(_("no message data"))
        if self._email(obj) is None:
            reason = decode_error(obj.message_data) or _("unknown reason")
            return format_html(
                "{} ({})",
                _placeholder(_("undecodable message data")),
                reason,
            )
        size = len(obj.message_data)
        return format_html("{} ({})", _("decoded"), filesizeformat(size))

    @admin.display(description=_("From"))
    @_guarded
    def from_display(self, obj: Any) -> Any:
        return self._from_email(obj, lambda e: _text(e.from_email) or EMPTY)

    @admin.display(description=_("To"))
    @_guarded
    def to_display(self, obj: Any) -> Any:
        return self._from_email(obj, lambda e: _addresses(e.to))

    @admin.display(description=_("Cc"))
    @_guarded
    def cc_display(self, obj: Any) -> Any:
        return self._from_email(obj, lambda e: _addresses(getattr(e, "cc", None)))

    @admin.display(description=_("Bcc"))
    @_guarded
    def bcc_display(self, obj: Any) -> Any:
        return self._from_email(obj, lambda e: _addresses(e.bcc))

    @admin.display(description=_("Reply-To"))
    @_guarded
    def reply_to_display(self, obj: Any) -> Any:
        def render(email: EmailMessage) -> Any:
            # A Reply-To given through headers= is the one that goes out.
            header = _header(email, "Reply-To")
            if header is not None:
                return _text(header)
            return _addresses(getattr(email, "reply_to", None))

        return self._from_email(obj, render)

    @admin.display(description=_("Subject"))
    @_guarded
    def email_subject(self, obj: Any) -> Any:
        return self._from_email(obj, lambda e: _text(e.subject) or EMPTY)

    @admin.display(description=_("Message-ID"))
    @_guarded
    def email_message_id(self, obj: Any) -> Any:
        email = self._email(obj)
        value = get_message_id(email) if email is not None else None
        return value or obj.message_id or EMPTY

    @admin.display(description=_("other headers"))
    @_guarded
    def extra_headers_display(self, obj: Any) -> Any:
        def render(email: EmailMessage) -> Any:
            headers = [
                (name, _text(value))
                for name, value in (getattr(email, "extra_headers", None) or {}).items()
                if str(name).lower() not in ("message-id", "reply-to")  # shown above
            ]
            if not headers:
                return EMPTY
            return format_html(
                '<table class="mailer-headers">{}</table>',
                format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", headers),
            )

        return self._from_email(obj, render)

    @admin.display(description=_("text body"))
    @_guarded
    def text_body(self, obj: Any) -> Any:
        def render(email: EmailMessage) -> Any:
            if getattr(email, "content_subtype", "plain") == "html":
                return _placeholder(_("The body is HTML: see the HTML version."))
            body = self.plain_text_body(obj)
            return _pre(body) if body else EMPTY

        return self._from_email(obj, render)

    @admin.display(description=_("HTML version"))
    @_guarded
    def html_body(self, obj: Any) -> Any:
        def render(email: EmailMessage) -> Any:
            html = _html_body(email)
            if html is None:
                return EMPTY
            return html_preview(html)

        return self._from_email(obj, render)

    @admin.display(description=_("attachments"))
    @_guarded
    def attachments_display(self, obj: Any) -> Any:
        request = _detail_request.get()
        may_download = request is not None and self.has_download_permission(request)

        def cell(number: int, ref: StoredAttachment | None) -> Any:
            if ref is None:
                return EMPTY
            if not may_download:
                return _("stored")
            url = reverse(
                f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_attachment",
                args=[obj.pk, number],
            )
            return format_html('{} (<a href="{}">{}</a>)', _("stored"), url, _("download"))

        def render(email: EmailMessage) -> Any:
            rows = _attachment_rows(email)
            if not rows:
                return EMPTY
            if not any(ref for *_, ref in rows):
                return format_html(
                    '<table class="mailer-attachments"><thead><tr><th>{}</th><th>{}</th>'
                    "<th>{}</th></tr></thead><tbody>{}</tbody></table>",
                    _("file name"),
                    _("content type"),
                    _("size"),
                    format_html_join(
                        "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", (r[:3] for r in rows)
                    ),
                )
            numbered = []
            number = 0
            for name, mimetype, size, ref in rows:
                numbered.append((name, mimetype, size, cell(number, ref)))
                number += ref is not None
            return format_html(
                '<table class="mailer-attachments"><thead><tr><th>{}</th><th>{}</th>'
                "<th>{}</th><th>{}</th></tr></thead><tbody>{}</tbody></table>",
                _("file name"),
                _("content type"),
                _("size"),
                _("storage"),
                format_html_join(
                    "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", numbered
                ),
            )

        return self._from_email(obj, render)

    # -- stored attachments: shown on the detail page, downloaded through the admin --

    def has_download_permission(self, request: HttpRequest) -> bool:
        """Staff with the change permission may download stored attachments."""
        opts = self.opts
        return bool(request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}"))

    def changeform_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        token = _detail_request.set(request)
        try:
            response = super().changeform_view(request, *args, **kwargs)  # type: ignore[misc]
            if hasattr(response, "render") and not getattr(response, "is_rendered", True):
                response.render()  # the read-only fields are rendered now, knowing who asks
            return response
        finally:
            _detail_request.reset(token)

    def get_urls(self) -> list[Any]:
        opts = self.opts
        view = self.admin_site.admin_view(self.attachment_view)
        return [
            path(
                "<path:object_id>/attachment/<int:number>/",
                view,
                name=f"{opts.app_label}_{opts.model_name}_attachment",
            ),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def attachment_view(self, request: HttpRequest, object_id: str, number: int) -> Any:
        """Stream stored attachment ``number`` of a message as a download."""
        if not self.has_download_permission(request):
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))  # type: ignore[attr-defined]
        if obj is None:
            raise Http404(_("No such message."))
        email = self._email(obj)
        refs = attachment_refs.references(email) if email is not None else []
        if number >= len(refs):
            raise Http404(_("No such stored attachment."))
        ref = refs[number]
        try:
            handle = attachment_refs.get_storage().open(ref.key, "rb")
        except Exception as err:
            raise Http404(
                _("The stored attachment can't be read: %(error)s") % {"error": err}
            ) from err
        # Never rendered by the browser, whatever the attachment claims to be.
        response = FileResponse(
            handle,
            as_attachment=True,
            filename=ref.name or f"attachment-{number + 1}",
            content_type="application/octet-stream",
        )
        response["X-Content-Type-Options"] = "nosniff"
        return response


class DenormalisedColumns:
    """List columns read from the searchable columns filled at queue time."""

    @admin.display(description=_("recipients"), ordering="recipients")
    def recipients_display(self, obj: Any) -> str:
        return _recipient_list(obj.recipients)

    @admin.display(description=_("subject"), ordering="subject_text")
    def subject_display(self, obj: Any) -> str:
        return Truncator(obj.subject_text).chars(100) if obj.subject_text else EMPTY

    @admin.display(description=_("Message-ID"), ordering="message_id")
    def message_id_display(self, obj: Any) -> str:
        return obj.message_id or EMPTY

    @admin.display(description=_("Message-ID"), ordering="message_id")
    def message_id_column(self, obj: Any) -> Any:
        return short_message_id(obj.message_id)

    def _who(self, obj: Any) -> str:
        return _recipient_list(obj.recipients, limit=2)

    def _what(self, obj: Any) -> str:
        return Truncator(obj.subject_text or "").chars(80) or str(_("(no subject)"))

    @admin.display(description=_("priority"), ordering="priority")
    def priority_display(self, obj: Any) -> str:
        return str(PRIORITY_LABELS.get(obj.priority, obj.priority))

    @admin.display(description=_("when added"), ordering="when_added")
    def when_added_display(self, obj: Any) -> Any:
        return obj.when_added

    @admin.display(description=_("all recipients"))
    def all_recipients(self, obj: Any) -> Any:
        addresses = [a for a in (obj.recipients or "").splitlines() if a.strip()]
        return format_html_join(", ", "{}", ((a,) for a in addresses)) if addresses else EMPTY


# --- filters --------------------------------------------------------------------------


class PriorityFilter(admin.SimpleListFilter):
    title = _("priority")
    parameter_name = "priority"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(str(number), label) for number, label in PRIORITY_LABELS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(priority=int(value))
        return queryset


class NextAttemptFilter(admin.SimpleListFilter):
    """Messages by what they wait for: their time, a retry, or an operator."""

    title = _("waiting for")
    parameter_name = "waiting"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("scheduled", _("scheduled")),
            ("retrying", _("automatic retry")),
            ("operator", _("an operator")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "scheduled":
            return queryset.scheduled()  # type: ignore[attr-defined]
        if value == "retrying":
            return queryset.retrying()  # type: ignore[attr-defined]
        if value == "operator":
            return queryset.waiting_for_operator()  # type: ignore[attr-defined]
        return queryset


class WhenAttemptedFilter(admin.DateFieldListFilter):
    """Django's date filter, titled with a translated name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = _("when attempted")


class ResultFilter(admin.SimpleListFilter):
    title = _("result")
    parameter_name = "result"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return list(RESULT_LABELS.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value in RESULT_LABELS:
            return queryset.filter(result=value)
        return queryset


# --- the queue --------------------------------------------------------------------------


@admin.register(Message)
class MessageAdmin(DenormalisedColumns, StoredEmailDisplay, LargeTableAdmin):
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
    readonly_fields = [
        "id",
        "priority_display",
        "retry_count_display",
        "next_attempt",
        "when_added_display",
        "all_recipients",
        "last_error",
        "attempts",
        *StoredEmailDisplay.email_fields,
    ]
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

    @admin.action(description=_("Send selected messages now"), permissions=["send"])
    def send_messages(self, request: HttpRequest, queryset: MessageQuerySet) -> None:
        deferred = queryset.filter(priority=PRIORITY_DEFERRED).count()
        scheduled = queryset.scheduled().count()
        last_log_id = MessageLog.objects.aggregate(last=Max("id"))["last"] or 0
        try:
            result = send_all(queryset=queryset)
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


# --- the don't-send list --------------------------------------------------------------


class DontSendEntryForm(forms.ModelForm):
    class Meta:
        model = DontSendEntry
        fields = ["to_address", "when_added"]
        labels = {"to_address": _("Address"), "when_added": _("When added")}


@admin.register(DontSendEntry)
class DontSendEntryAdmin(admin.ModelAdmin):
    form = DontSendEntryForm
    list_display = ["address_display", "when_added_display"]
    search_fields = ["to_address"]
    search_help_text = _("Search by address.")
    ordering = ["-when_added", "-id"]

    @admin.display(description=_("address"), ordering="to_address")
    def address_display(self, obj: DontSendEntry) -> str:
        return obj.to_address

    @admin.display(description=_("when added"), ordering="when_added")
    def when_added_display(self, obj: DontSendEntry) -> Any:
        return obj.when_added


# --- the log ----------------------------------------------------------------------------

REQUEUE_CHUNK = 500


@admin.register(MessageLog)
class MessageLogAdmin(DenormalisedColumns, StoredEmailDisplay, LargeTableAdmin):
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
                    "when_added_display",
                    "all_recipients",
                )
            },
        ),
        *StoredEmailDisplay.email_fieldsets,
    ]
    readonly_fields = [
        "id",
        "result_display",
        "when_attempted_display",
        "full_log_message",
        "message_id_display",
        "priority_display",
        "when_added_display",
        "all_recipients",
        *StoredEmailDisplay.email_fields,
    ]

    # Log ids grow in the order attempts are logged, so sorting by id gives
    # the attempt order without sorting the whole (unindexed) column.
    @admin.display(description=_("when attempted"), ordering="id")
    def when_attempted_display(self, obj: MessageLog) -> Any:
        return obj.when_attempted

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
        list like any new message, and carries the same ``Message-ID`` so the
        receiver can tell it is a resend.
        """
        queued = not_kept = undecodable = invalid = 0
        groups: dict[int, list[EmailMessage]] = defaultdict(list)

        def flush() -> int:
            # Queueing no longer consults the don't-send list (delivery
            # does), but a requeue of mail nobody may receive is pointless:
            # one query per chunk leaves those out.
            blocked = DontSendEntry.objects.blocked_among(
                a for emails in groups.values() for e in emails for a in e.recipients()
            )
            count = 0
            with transaction.atomic(using=queryset.db):
                for priority, emails in groups.items():
                    wanted = [
                        e
                        for e in emails
                        if not all(DontSendEntry.matches(a, blocked) for a in e.recipients())
                    ]
                    count += queue_emails(wanted, priority=priority)
            groups.clear()
            return count

        offered = 0
        rows = queryset.order_by("id").only("id", "message_data", "message_id", "priority")
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
            groups[priority].append(email)
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
