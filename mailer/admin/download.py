"""The download of a stored attachment from a message's admin page."""

from __future__ import annotations

import unicodedata
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpRequest
from django.urls import path
from django.utils.translation import gettext_lazy as _

from mailer import attachments as attachment_refs

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.core.mail import EmailMessage
    from django.db.models.options import Options

#: The request a detail page is being rendered for (read-only fields get only
#: the object): who may download stored attachments.
_detail_request: ContextVar[HttpRequest | None] = ContextVar("mailer_detail_request", default=None)


class AttachmentDownloads:
    """The download view of stored attachments, and who may use it.

    Mixed into :class:`~mailer.admin.display.StoredEmailDisplay`, whose
    attachment rows link here.
    """

    # Provided by the ModelAdmin this is mixed into.
    admin_site: admin.AdminSite
    opts: Options[Any]
    _email: Callable[[Any], EmailMessage | None]  # MessageAdminMixin._email

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
        response = FileResponse(handle, content_type="application/octet-stream")
        response["Content-Disposition"] = attachment_disposition(
            ref.name or "", f"attachment-{number + 1}"
        )
        response["X-Content-Type-Options"] = "nosniff"
        return response


#: Unicode categories left out of a download's file name: controls, format
#: characters (the bidirectional overrides such as U+202E, which make
#: ``invoice\u202egpj.exe`` read as ``invoiceexe.jpg``, and zero-width
#: characters), line and paragraph separators.
_UNSAFE_IN_FILENAME = frozenset({"Cc", "Cf", "Zl", "Zp"})


def safe_filename(name: str, default: str) -> str:
    """``name`` without control, format (bidirectional) and separator
    characters, nor path separators; ``default`` when nothing is left."""
    kept = "".join(
        c for c in name if unicodedata.category(c) not in _UNSAFE_IN_FILENAME and c not in "/\\"
    ).strip()
    return kept or default


def attachment_disposition(name: str, default: str) -> str:
    """``Content-Disposition`` of a download in RFC 6266's form: an ASCII
    ``filename`` for old clients, and ``filename*`` (UTF-8) with the name as
    :func:`safe_filename` leaves it."""
    cleaned = safe_filename(name, default)
    fallback = "".join(c if " " <= c <= "~" else "_" for c in cleaned)
    fallback = fallback.replace("\\", "_").replace('"', "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(cleaned, safe='')}"
