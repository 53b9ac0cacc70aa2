"""Stored attachments sent straight from ``MAILER_ATTACHMENT_STORAGE`` to the
SMTP server, a piece at a time.

Rendering a message holds its attachments several times over: the content,
its base64 text, the MIME tree's rendering and ``smtplib``'s copies of that
(a 20 MB attachment took 160 MB of RSS to send). With Django's own SMTP
backend and Django's own message classes, a binary attachment kept in the
storage never enters memory whole:

1. The message is rendered by Django as usual, but with a few random bytes
   (:data:`SAMPLE_BYTES`) in place of each such attachment's content. Their
   base64 lines are unique in what Django renders, and they stand exactly
   where the content's lines would be: Django's rendering of a binary
   attachment (``email.encoders`` up to 5.2, the ``email`` content manager
   on 6.1) does not depend on the content beyond those lines.
2. When Django's backend hands the rendered bytes to ``smtplib``, the
   connection's ``sendmail`` (watched by the engine's sender) does what
   ``smtplib.SMTP.sendmail`` does, but writes the DATA in pieces: the
   rendered bytes up to the sample's lines, then the stored file read
   :data:`mailer.attachments.READ_CHUNK` bytes at a time and base64-encoded
   line by line as Django would, and so on.

What goes out is byte for byte what Django would have sent with the content
inline (``SIZE`` included). Before anything is sent the file's presence and
size are checked (:func:`mailer.attachments.check_present`, no download);
its sha256 is checked as it streams: if it is not what was stored, or the
storage fails mid-read, the connection is closed before the end of the
DATA, so the server never accepts a message without its attachment, and
the message is deferred.

Anything else (another backend, a subclass that renders or sends its own
way, text attachments, MIME parts) is read into memory and sent the usual
way (:func:`mailer.attachments.load`).
"""

from __future__ import annotations

import base64
import copy
import os
import re
from collections.abc import Callable
from typing import Any

from mailer import attachments, pipelining
from mailer.attachments import StoredAttachment

__all__ = [
    "SAMPLE_BYTES",
    "Plan",
    "PlanMismatch",
    "data_writer",
    "plan_for",
    "sendmail",
    "streamable",
]

#: Random bytes standing in for an attachment while Django renders the
#: message: three full base64 lines (57 bytes each).
SAMPLE_BYTES = 57 * 3

_CRLF = b"\r\n"
_PERIODS = re.compile(rb"(?m)^\.")

#: The methods through which Django renders a message; a subclass that
#: overrides one of them renders its own way and is not streamed.
_RENDERING = (
    "message",
    "attach",
    "_create_message",
    "_create_attachments",
    "_create_attachment",
    "_create_mime_attachment",
    "_add_attachments",
    "_add_attachment",
    "_add_bodies",
    "_create_alternatives",
)


class PlanMismatch(Exception):
    """The rendered message does not hold the samples as planned: nothing was
    sent, and the message goes out the usual way instead."""


def streamable(field: str, item: Any) -> bool:
    """Can this attachment (a ``(name, content, mimetype)`` item) be streamed?

    Only binary ones: Django base64-encodes them whatever they hold. Text
    (``text/*``: 8bit or quoted-printable, by content) and ``message/*``
    attachments depend on their content, and are read into memory.
    """
    if field != "attachments" or not isinstance(item, tuple) or len(item) != 3:
        return False
    ref, mimetype = item[1], item[2]
    if not isinstance(ref, StoredAttachment) or ref.text or ref.size == 0:
        return False
    if not isinstance(mimetype, str) or "/" not in mimetype:
        return False
    return mimetype.split("/", 1)[0].lower() not in ("text", "message")


def _django_backend(backend: Any) -> bool:
    from django.core.mail.backends.smtp import EmailBackend

    return (
        isinstance(backend, EmailBackend)
        and getattr(type(backend), "_send", None) is getattr(EmailBackend, "_send", None)
        and type(backend).send_messages is EmailBackend.send_messages
    )


def _django_rendering(email: Any) -> bool:
    from django.core.mail import EmailMessage, EmailMultiAlternatives

    base = EmailMultiAlternatives if isinstance(email, EmailMultiAlternatives) else EmailMessage
    if not isinstance(email, base):
        return False
    cls = type(email)
    return all(getattr(cls, name, None) is getattr(base, name, None) for name in _RENDERING)


class _Stream:
    def __init__(self, ref: StoredAttachment, sample: bytes) -> None:
        self.ref = ref
        self.sample = sample

    def encoded(self, linesep: bytes) -> bytes:
        return base64.encodebytes(self.sample).replace(b"\n", linesep)


class Plan:
    """Which stored attachments of one message stream, and their samples."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.streams: list[_Stream] = []

    def add(self, ref: StoredAttachment) -> bytes:
        sample = os.urandom(SAMPLE_BYTES)
        self.streams.append(_Stream(ref, sample))
        return sample

    def segments(self, msg: bytes) -> list[bytes | tuple[StoredAttachment, bytes]]:
        """``msg`` cut at the samples: rendered bytes, and ``(reference,
        line separator)`` where a stored file's lines go.

        :class:`PlanMismatch` unless each sample's lines are found exactly
        once, each starting a line.
        """
        if not isinstance(msg, (bytes, bytearray)):
            raise PlanMismatch(f"the rendered message is a {type(msg).__name__}, not bytes")
        found = []
        for stream in self.streams:
            for linesep in (_CRLF, b"\n"):
                lines = stream.encoded(linesep)
                at = msg.find(lines)
                if at >= 0:
                    break
            if at < 0:
                raise PlanMismatch(f"the lines standing for {stream.ref.name!r} are not in the message")
            if msg.find(lines, at + 1) >= 0 or (at > 0 and msg[at - 1 : at] != b"\n"):
                raise PlanMismatch(f"the lines standing for {stream.ref.name!r} are ambiguous")
            found.append((at, len(lines), stream.ref, linesep))
        found.sort(key=lambda f: f[0])
        segments: list[bytes | tuple[StoredAttachment, bytes]] = []
        position = 0
        for at, length, ref, linesep in found:
            if at < position:
                raise PlanMismatch("the samples overlap")
            segments.append(bytes(msg[position:at]))
            segments.append((ref, linesep))
            position = at + length
        segments.append(bytes(msg[position:]))
        return segments


def plan_for(backend: Any, email: Any) -> tuple[Any, Plan] | None:
    """``(message to hand to the backend, plan)``, or None when ``email`` has
    nothing to stream or ``backend``/``email`` don't send Django's way.

    The message handed over has random samples where the streamed
    attachments' content goes (and any other stored content read back).
    """
    if not (_django_backend(backend) and _django_rendering(email)):
        return None
    plan = Plan(attachments.get_storage())
    items = list(email.attachments)
    for index, item in enumerate(items):
        if streamable("attachments", item):
            items[index] = attachments._with_content("attachments", item, plan.add(item[1]))
    if not plan.streams:
        return None
    stand_in = copy.copy(email)
    stand_in.attachments = items
    return attachments.load(stand_in), plan


def encoded_size(size: int, linesep: bytes) -> int:
    """Length of ``size`` bytes base64-encoded in lines of 76 characters."""
    lines = -(-size // 57)
    return 4 * -(-size // 3) + lines * len(linesep)


def sendmail(
    plan: Plan,
    smtp: Any,
    from_addr: str,
    to_addrs: Any,
    msg: bytes,
    mail_options: Any = (),
    rcpt_options: Any = (),
) -> dict[str, tuple[int, bytes]]:
    """``smtplib.SMTP.sendmail(from_addr, to_addrs, msg)``, the planned
    attachments streamed from the storage into the DATA.

    Same commands, replies, exceptions and return value as ``smtplib``'s;
    :class:`PlanMismatch` before any command if ``msg`` is not as planned;
    :class:`AttachmentUnavailable` (the connection closed, the message not
    accepted) if a file can't be read or is not what was stored.
    """
    size, write_body = data_writer(plan, smtp, msg)
    return pipelining.transaction(
        smtp,
        from_addr,
        to_addrs,
        size=size,
        write_body=write_body,
        mail_options=mail_options,
        rcpt_options=rcpt_options,
        pipelined=False,
    )


def data_writer(plan: Plan, smtp: Any, msg: bytes) -> tuple[int, Callable[[], None]]:
    """``(size, write)``: the DATA's size as sent and a function writing it
    to ``smtp`` with the planned attachments streamed (for a pipelined
    transaction, :class:`mailer.pipelining.Pipeline`).

    :class:`PlanMismatch` (nothing sent) if ``msg`` is not as planned.
    """
    segments = plan.segments(msg)
    size = sum(len(s) if isinstance(s, bytes) else encoded_size(s[0].size, s[1]) for s in segments)
    return size, lambda: _write_data(smtp, segments, plan)


def _write_data(smtp: Any, segments: list[Any], plan: Plan) -> None:
    """The DATA's content, written a segment (a file: a piece) at a time,
    then its end (CRLF ``.`` CRLF), as ``smtplib.SMTP.data`` writes it."""
    tail = b""
    for segment in segments:
        if isinstance(segment, bytes):
            if segment:
                smtp.send(_PERIODS.sub(b"..", segment))
                tail = (tail + segment)[-2:]
            continue
        ref, linesep = segment
        try:
            # base64 lines never start with a period: nothing to escape.
            for piece in attachments.chunks(ref, plan.storage):
                smtp.send(base64.encodebytes(piece).replace(b"\n", linesep))
        except BaseException:
            # Never end the DATA of an incomplete message: closing the
            # connection mid-message makes the server drop what it has.
            smtp.close()
            raise
        tail = linesep[-2:]
    if tail != _CRLF:
        smtp.send(_CRLF)
    smtp.send(b"." + _CRLF)
