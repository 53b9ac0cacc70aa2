"""How a stored message is shown: list columns, the decoded email's fields, a safe HTML preview.

Only the detail page decodes the stored email, and shows a placeholder when it
can't; list columns read the denormalised columns filled at queue time.

HTML bodies are shown inside ``<iframe sandbox="" srcdoc="...">`` (no
scripts, no same origin, no forms) with a Content-Security-Policy that lets
nothing load from the network, so a message can neither run code in the
admin nor phone home (tracking pixels, remote CSS) when someone opens it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import flatten_fieldsets
from django.core.mail import EmailMessage
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailer import attachments as attachment_refs
from mailer.admin.download import AttachmentDownloads, _detail_request
from mailer.attachments import StoredAttachment
from mailer.models import PRIORITY_LABELS, MessageLog, decode_error, get_message_id

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


class StoredEmailDisplay(MessageAdminMixin, AttachmentDownloads):
    """Read-only fields that show the decoded email on a detail page."""

    # Provided by the ModelAdmin this is mixed into.
    admin_site: admin.AdminSite
    opts: Options[Any]

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
    #: Every field of ``email_fieldsets``: all read-only.
    email_fields = tuple(flatten_fieldsets(email_fieldsets))

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
        # Formatted here: a read-only field shows a bare datetime raw.
        return when(obj.when_added)

    @admin.display(description=_("all recipients"))
    def all_recipients(self, obj: Any) -> Any:
        addresses = [a for a in (obj.recipients or "").splitlines() if a.strip()]
        return format_html_join(", ", "{}", ((a,) for a in addresses)) if addresses else EMPTY
