"""Messages across the surface of Django's mail API (4.2 to 6.1), for the
stored form's round trip: each maker returns a message ready to queue."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from email import encoders
from email.headerregistry import Address
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.image import MIMEImage
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils import translation
from django.utils.safestring import mark_safe
from django.utils.translation import gettext_lazy

from mailer.compat import DJANGO_VERSION

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(0, 256, 7)) + b"\x00\xff"
HTML = '<html><body><p>Hello <b>wörld</b> <img src="cid:logo@example.com"></p></body></html>'
LONG = "A long line that goes on " * 60


class ProjectMessage(EmailMessage):
    """A project's own message class with extra plain attributes."""

    content_subtype = "html"

    def __init__(self, *args: Any, campaign: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.campaign = campaign
        self.tracking = {"ids": [1, 2, 3], "on": True, "ratio": 0.5, "none": None}


class ProjectAlternatives(EmailMultiAlternatives):
    """Another project class: alternatives, and a datetime attribute."""


PROJECT_CLASSES = [f"{__name__}.ProjectMessage", f"{__name__}.ProjectAlternatives"]


def _m(**kwargs: Any) -> EmailMessage:
    kwargs.setdefault("subject", "Subject")
    kwargs.setdefault("body", "Body\n")
    kwargs.setdefault("from_email", "from@example.com")
    kwargs.setdefault("to", ["to@example.com"])
    return EmailMessage(**kwargs)


def _alts(**kwargs: Any) -> EmailMultiAlternatives:
    kwargs.setdefault("subject", "Subject")
    kwargs.setdefault("body", "Body\n")
    kwargs.setdefault("from_email", "from@example.com")
    kwargs.setdefault("to", ["to@example.com"])
    return EmailMultiAlternatives(**kwargs)


def plain() -> EmailMessage:
    return _m()


def non_ascii() -> EmailMessage:
    return _m(subject="Grüße – 日本語 ✓", body="Ünïcödé body – 日本語\nzweite Zeile ✓\n")


def non_ascii_names() -> EmailMessage:
    return _m(
        from_email="Jürgen Müller <juergen@example.com>",
        to=["Zoë Ñandú <zoe@example.com>", "plain@example.com"],
        cc=['"Doe, Jane" <jane@example.com>'],
        bcc=["hidden@example.com"],
        reply_to=["Ответ <reply@example.com>"],
    )


def idn_domains() -> EmailMessage:
    return _m(from_email="shop@bücher.example", to=["kunde@münchen.example", "x@例え.jp"])


def headers() -> EmailMessage:
    return _m(
        headers={
            "X-Campaign": "spring-2024",
            "X-Non-Ascii": "Grüße ✓",
            "List-Unsubscribe": "<https://example.com/u?id=1>, <mailto:u@example.com>",
            "Reply-To": "Header Reply <hr@example.com>",
            "From": "Header From <hf@example.com>",
            "To": "Shown To <shown@example.com>",
            "X-Long": LONG,
        },
        cc=["cc@example.com"],
    )


def reply_to() -> EmailMessage:
    return _m(reply_to=["r1@example.com", "Reply Two <r2@example.com>"])


def long_lines() -> EmailMessage:
    return _m(subject="Lang " * 40 + "ü", body=(LONG + "\n") * 3 + "x" * 1200 + "\n")


def crlf_body() -> EmailMessage:
    return _m(body="line one\r\nline two\r\n\r\n.\r\nFrom the start\n")


def empty_body() -> EmailMessage:
    return _m(body="")


def latin1() -> EmailMessage:
    email = _m(subject="Café", body="Déjà vu\n")
    email.encoding = "iso-8859-1"
    return email


def html_only() -> EmailMessage:
    email = _m(body=HTML)
    email.content_subtype = "html"
    return email


def alternatives() -> EmailMultiAlternatives:
    email = _alts()
    email.attach_alternative(HTML, "text/html")
    return email


def several_alternatives() -> EmailMultiAlternatives:
    email = _alts(body="")
    email.attach_alternative(mark_safe("<p>safe</p>"), "text/html")
    email.attach_alternative("# markdown ü", "text/markdown")
    return email


def attachments() -> EmailMessage:
    email = _m()
    email.attach("notes.txt", "Line one\nLine two – ünïcödé ✓\n", "text/plain")
    email.attach("pixel.png", PNG, "image/png")
    email.attach("data.csv", "id,name\n1,Zoë\n", "text/csv")
    email.attach("raw.bin", bytes(range(256)), "application/octet-stream")
    return email


def attachment_forms() -> EmailMessage:
    email = _m()
    email.attach("guessed.pdf", b"%PDF-1.4 fake")  # MIME type guessed from the name
    email.attach("Grüße 日本.txt", "non-ASCII name", "text/plain")
    email.attach("latin1.txt", "café".encode("latin-1"), "text/plain")  # not UTF-8
    email.attach("utf8.txt", "ok ✓".encode(), "text/plain")
    inner = _m(subject="Inner", body="inner body", headers={"Message-ID": "<inner@example.com>"})
    email.attach("forwarded.eml", inner, "message/rfc822")
    return email


def attach_file(tmp: Path) -> EmailMessage:
    path = tmp / "report.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    image = tmp / "logo.png"
    image.write_bytes(PNG)
    email = _m()
    email.attach_file(str(path))
    email.attach_file(str(image))
    return email


def mime_attachments() -> EmailMessage:
    email = _alts()
    email.attach(MIMEText("MIME text ✓", "plain", "utf-8"))
    email.attach(MIMEApplication(b"\x00\x01binary", Name="blob.bin"))
    part = MIMEBase("application", "octet-stream")
    part.set_payload(b"\x00\xff" * 50)
    encoders.encode_base64(part)
    part.add_header("Content-Disposition", "attachment", filename="part.bin")
    email.attach(part)
    return email


def inline_image() -> EmailMultiAlternatives:
    email = _alts()
    email.attach_alternative(HTML, "text/html")
    image = MIMEImage(PNG, "png")
    image.add_header("Content-ID", "<logo@example.com>")
    image.add_header("Content-Disposition", "inline", filename="logo.png")
    email.attach(image)
    if DJANGO_VERSION < (6, 1):
        email.mixed_subtype = "related"
    return email


def mimepart_attachments() -> EmailMessage:
    from email.message import MIMEPart

    email = _alts()
    email.attach_alternative(HTML, "text/html")
    text = MIMEPart()
    text.set_content("MIMEPart text ✓", filename="part ü.txt", disposition="attachment")
    email.attach(text)
    image = MIMEPart()
    image.set_content(PNG, maintype="image", subtype="png", cid="<logo@example.com>",
                      disposition="inline", filename="logo.png")
    email.attach(image)
    return email


def address_objects() -> EmailMessage:
    return _m(
        to=[Address("Zoë", "zoe", "example.com"), "plain@example.com"],
        cc=[Address(addr_spec="cc@example.com")],
    )


def lazy_strings() -> EmailMessage:
    with translation.override("de"):
        return _m(subject=gettext_lazy("Password"), body=gettext_lazy("Username"))


def project_message() -> EmailMessage:
    return ProjectMessage("Projekt", "<p>html body</p>", "from@example.com",
                          ["to@example.com"], campaign="Ünï")


def project_alternatives() -> EmailMultiAlternatives:
    import datetime
    import zoneinfo

    email = ProjectAlternatives("S", "b", "from@example.com", ["to@example.com"])
    email.attach_alternative(HTML, "text/html")
    email.due = datetime.datetime(2026, 3, 29, 1, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
    email.day = datetime.date(2026, 1, 2)
    email.utc = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    email.delay = datetime.timedelta(days=1, seconds=2)
    email.mapping = {1: "int key", "$b": "a tag-like key"}
    email.nested = [[{"a": (1, 2)}], b"bytes"]
    return email


def anymail_message() -> EmailMessage:
    from anymail.message import AnymailMessage, attach_inline_image

    email = AnymailMessage(
        subject="Anymail ü",
        body="Hi {{name}}",
        from_email="Shop <shop@example.com>",
        to=["a@example.com", "B <b@example.com>"],
        tags=["welcome", "ü"],
        metadata={"user_id": 42, "plan": "pro"},
        template_id="tmpl-1",
        merge_data={"a@example.com": {"name": "A"}, "b@example.com": {"name": "B"}},
        merge_global_data={"shop": "Ü-Shop"},
        merge_metadata={"a@example.com": {"order": 1}},
        merge_headers={"a@example.com": {"List-Unsubscribe": "<mailto:u@example.com>"}},
        esp_extra={"options": {"sandbox": True}},
        track_clicks=True,
        track_opens=False,
        envelope_sender="bounces@example.com",
    )
    email.attach_alternative(HTML, "text/html")
    attach_inline_image(email, PNG, filename="logo.png", domain="example.com")
    return email


MAKERS: dict[str, Callable[..., EmailMessage]] = {
    f.__name__: f
    for f in (
        plain, non_ascii, non_ascii_names, idn_domains, headers, reply_to, long_lines,
        crlf_body, empty_body, latin1, html_only, alternatives, several_alternatives,
        attachments, attachment_forms, attach_file, mime_attachments, inline_image,
        lazy_strings, project_message, project_alternatives,
    )
}  # fmt: skip
if DJANGO_VERSION >= (6, 0):
    MAKERS["mimepart_attachments"] = mimepart_attachments
    MAKERS["address_objects"] = address_objects
try:
    import anymail  # noqa: F401
except ImportError:  # pragma: no cover - django-anymail is in the test extra
    pass
else:
    MAKERS["anymail_message"] = anymail_message


def make(name: str, tmp: Path) -> EmailMessage:
    maker = MAKERS[name]
    return maker(tmp) if name == "attach_file" else maker()


_BOUNDARY = re.compile(rb"=+[0-9]+==")
_DATE = re.compile(rb"^Date: .*\r?\n(?:[ \t].*\r?\n)*", re.M)


def rendered(email: EmailMessage) -> bytes:
    """``email.message().as_bytes()`` with the boundaries and Date left out."""
    raw = email.message().as_bytes()
    return _DATE.sub(b"", _BOUNDARY.sub(b"BOUNDARY", raw))


__all__ = ["MAKERS", "PROJECT_CLASSES", "make", "rendered", "sys"]
