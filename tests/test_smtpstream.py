"""Stored attachments streamed from the storage into the SMTP DATA
(mailer/smtpstream.py), against a real SMTP server and a real
FileSystemStorage (the ``attachment_storage`` fixture)."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.dispatch import receiver

from mailer import attachments, smtpstream
from mailer.attachments import StoredAttachment
from mailer.compat import HAS_MAILERS
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    queue_emails,
)
from mailer.signals import message_sent
from tests.backends import ChangingStorage, FailingReadStorage
from tests.settings import smtp_mailers

pytestmark = pytest.mark.django_db(transaction=True)

DATE = "Mon, 30 Nov 2026 12:00:00 -0000"
CHUNK = attachments.READ_CHUNK


def normalized(raw: bytes) -> bytes:
    """The bytes received, with the random MIME boundaries numbered."""
    for number, boundary in enumerate(dict.fromkeys(re.findall(rb'boundary="([^"]+)"', raw))):
        raw = raw.replace(boundary, b"BOUNDARY%d" % number)
    return raw


def size_option(received: dict) -> int:
    options = [o for o in received["mail_options"] if o.upper().startswith("SIZE=")]
    return int(options[0].split("=", 1)[1])


def use_backend(settings, smtp_server, dotted: str) -> None:
    if HAS_MAILERS:
        mailers = smtp_mailers(smtp_server.port)
        settings.MAILERS = {**mailers, "smtp": {**mailers["smtp"], "BACKEND": dotted}}
    else:
        settings.MAILER_EMAIL_BACKEND = dotted


def use_storage(settings, tmp_path, storage_class) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "mailer": {
            "BACKEND": f"tests.backends.{storage_class.__name__}",
            "OPTIONS": {"location": str(tmp_path / "attachments")},
        },
    }


def one_of_each(tag: str, content: bytes) -> EmailMultiAlternatives:
    """Streamable attachments beside ones that are not, and a body with a
    line starting with a period (escaped in the DATA)."""
    email = EmailMultiAlternatives(
        "Report", "See attached.\n.a line starting with a period\n", "from@example.com",
        ["to@example.com"], headers={"Message-ID": f"<{tag}@example.com>", "Date": DATE},
    )
    email.attach("data.bin", content, "application/octet-stream")
    email.attach("notes.txt", "ü text\n" * 400, "text/plain")  # text: read into memory
    email.attach("photo.jpg", content[::-1] + b"x", "image/jpeg")
    email.attach_alternative("<p>" + "x" * 2000 + "</p>", "text/html")
    return email


def send_both_ways(settings, smtp_server, make) -> tuple[dict, dict]:
    """``make(tag)`` queued with attachments stored and inline; both sent."""
    queue_emails([make("stored")])
    settings.MAILER_ATTACHMENT_STORAGE = None
    queue_emails([make("inline")])
    settings.MAILER_ATTACHMENT_STORAGE = "mailer"
    assert send_all().sent == 2
    by_id = {m["message"]["Message-ID"]: m for m in smtp_server.messages}
    return by_id["<stored@example.com>"], by_id["<inline@example.com>"]


@pytest.mark.parametrize(
    "size", [1, 56, 57, 58, 171, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 57 * 3 + 2]
)
def test_streamed_message_is_byte_for_byte_the_inline_one(
    attachment_storage, smtp_settings, smtp_server, settings, size
):
    settings.MAILER_ATTACHMENT_INLINE_MAX = 0
    content = os.urandom(size)
    stored, inline = send_both_ways(settings, smtp_server, lambda tag: one_of_each(tag, content))
    assert normalized(stored["raw"]).replace(b"stored@", b"X@") == normalized(inline["raw"]).replace(
        b"inline@", b"X@"
    )
    # SIZE is announced as smtplib announces it for the inline message.
    assert size_option(stored) == size_option(inline)


def test_size_is_the_length_of_the_message(attachment_storage, smtp_settings, smtp_server, settings):
    content = os.urandom(3 * CHUNK + 5)
    stored, inline = send_both_ways(settings, smtp_server, lambda tag: one_of_each(tag, content))
    assert size_option(stored) == size_option(inline)
    assert size_option(stored) >= len(stored["raw"]) > len(content) * 4 // 3


def test_two_attachments_with_the_same_content(attachment_storage, smtp_settings, smtp_server, settings):
    content = os.urandom(5000)

    def make(tag):
        email = EmailMessage("S", "b", "from@example.com", ["to@example.com"],
                             headers={"Message-ID": f"<{tag}@example.com>", "Date": DATE})
        email.attach("a.bin", content, "application/octet-stream")
        email.attach("b.bin", content, "application/octet-stream")
        return email

    stored, inline = send_both_ways(settings, smtp_server, make)
    assert normalized(stored["raw"]).replace(b"stored@", b"X@") == normalized(inline["raw"]).replace(
        b"inline@", b"X@"
    )


def test_a_plan_that_does_not_match_sends_nothing_and_says_why():
    ref = StoredAttachment("k", name="a.bin", mimetype="application/pdf", size=10, sha256="x", text=False)
    plan = smtpstream.Plan(storage=None)
    sample = plan.add(ref)
    with pytest.raises(smtpstream.PlanMismatch, match="not in the message"):
        plan.segments(b"Subject: x\r\n\r\nnothing here\r\n")
    lines = __import__("base64").encodebytes(sample).replace(b"\n", b"\r\n")
    with pytest.raises(smtpstream.PlanMismatch, match="ambiguous"):
        plan.segments(b"a\r\n" + lines + lines)
    segments = plan.segments(b"a\r\n" + lines + b"b\r\n")
    assert segments == [b"a\r\n", (ref, b"\r\n"), b"b\r\n"]


def test_only_binary_attachments_stream():
    def item(mimetype, text=False):
        ref = StoredAttachment("k", name="n", mimetype=mimetype, size=9, sha256="x", text=text)
        return ("n", ref, mimetype)

    assert smtpstream.streamable("attachments", item("application/pdf"))
    assert smtpstream.streamable("attachments", item("image/png"))
    assert not smtpstream.streamable("attachments", item("text/csv"))
    assert not smtpstream.streamable("attachments", item("message/rfc822"))
    assert not smtpstream.streamable("attachments", item("application/json", text=True))
    assert not smtpstream.streamable("alternatives", item("application/pdf"))
    assert not smtpstream.streamable("attachments", ("n", b"bytes", "application/pdf"))


def test_a_backend_subclass_gets_the_content_read_back(
    attachment_storage, smtp_settings, smtp_server, settings
):
    use_backend(settings, smtp_server, "tests.backends.PlainSMTP")
    content = os.urandom(200_000)
    stored, inline = send_both_ways(settings, smtp_server, lambda tag: one_of_each(tag, content))
    assert normalized(stored["raw"]).replace(b"stored@", b"X@") == normalized(inline["raw"]).replace(
        b"inline@", b"X@"
    )


def test_a_changed_file_is_never_accepted(
    attachment_storage, smtp_settings, smtp_server, settings, tmp_path
):
    """Same size, other bytes: found only by the sha256 taken as it streams."""
    use_storage(settings, tmp_path, ChangingStorage)
    content = os.urandom(CHUNK * 2)
    changed = EmailMessage("S", "b", "from@example.com", ["to@example.com"],
                           headers={"Message-ID": "<changed@example.com>"})
    changed.attach("data.bin", content, "application/octet-stream")
    queue_emails([changed])
    settings.MAILER_ATTACHMENT_STORAGE = None
    queue_emails([one_of_each("behind", content)])  # inline: not affected
    settings.MAILER_ATTACHMENT_STORAGE = "mailer"

    result = send_all()
    assert (result.sent, result.deferred) == (1, 1)
    # The server dropped the half-sent message (its connection closed
    # mid-DATA); the one behind went out on a new connection.
    assert [m["message"]["Message-ID"] for m in smtp_server.messages] == ["<behind@example.com>"]
    assert smtp_server.connections == 2
    row = Message.objects.get()
    assert row.priority == PRIORITY_DEFERRED and row.message_id == "<changed@example.com>"
    failure = MessageLog.objects.get(result=RESULT_FAILURE)
    assert "data.bin" in failure.log_message and "is not what was stored" in failure.log_message
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 1


def test_a_storage_failing_mid_read_is_never_accepted(
    attachment_storage, smtp_settings, smtp_server, settings, tmp_path
):
    use_storage(settings, tmp_path, FailingReadStorage)
    queue_emails([one_of_each("failing", os.urandom(CHUNK * 3))])
    result = send_all()
    assert result.deferred == 1 and smtp_server.messages == []
    log = MessageLog.objects.get()
    assert "can't be read" in log.log_message and "connection to the storage reset" in log.log_message


def test_partial_refusal_is_reported_as_with_smtplib(
    attachment_storage, smtp_settings, smtp_server
):
    smtp_server.refuse = {"gone@example.com": "550 5.1.1 no such user"}
    email = one_of_each("partial", os.urandom(5000))
    email.to = ["to@example.com", "gone@example.com"]
    queue_emails([email])
    assert send_all().sent == 1
    assert smtp_server.messages[0]["to"] == ["to@example.com"]
    assert "gone@example.com (550 5.1.1 no such user)" in MessageLog.objects.get().log_message


def test_all_recipients_refused_defers(attachment_storage, smtp_settings, smtp_server):
    smtp_server.refuse = {"to@example.com": "550 5.1.1 no such user"}
    queue_emails([one_of_each("refused", os.urandom(5000))])
    result = send_all()
    assert result.sent == 0 and smtp_server.messages == []
    assert "no such user" in MessageLog.objects.get().log_message


def test_signals_get_references_not_content(attachment_storage, smtp_settings, smtp_server):
    seen = []

    @receiver(message_sent)
    def keep(sender, email, **kwargs):
        seen.append(email)

    try:
        content = os.urandom(5000)
        queue_emails([one_of_each("signal", content)])
        assert send_all().sent == 1
    finally:
        message_sent.disconnect(keep)
    (email,) = seen
    refs = attachments.references(email)
    assert [r.name for r in refs] == ["data.bin", "notes.txt", "photo.jpg", None]  # + the HTML
    assert refs[0].sha256 == hashlib.sha256(content).hexdigest()
    assert next(smtp_server.messages[0]["message"].iter_attachments()).get_content() == content


MEASURE = """
import json, os, tracemalloc
import smtplib, email.generator, django.core.mail.backends.smtp  # imported before measuring
from django.test.utils import override_settings
from mailer.engine import send_all

with override_settings(**json.loads(os.environ["MEASURE_SETTINGS"])):
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    assert send_all().sent == 1
    peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"growth": (peak - before) / 2**20}))
"""


def test_sending_holds_no_copy_of_a_large_stored_attachment(
    attachment_storage, manage, smtp_server, settings
):
    """The most memory the sending process's Python objects took, beyond what
    they took before (tracemalloc: what is allocated, not how the C library
    keeps it): pieces of the file when streamed; several copies of it with a
    backend that needs it in memory (the control). bench/ measures RSS."""
    size = 20 * 2**20  # base64: 27 MiB, within the test server's 32 MiB
    stored = {
        "STORAGES": settings.STORAGES,
        "MAILER_ATTACHMENT_STORAGE": "mailer",
        "MAILER_ATTACHMENT_INLINE_MAX": 1024,
    }

    def growth(extra):
        email = EmailMessage("big", "b", "from@example.com", ["to@example.com"])
        email.attach("big.bin", os.urandom(size), "application/octet-stream")
        queue_emails([email])
        del email
        # A generous SMTP timeout: under CI load (coverage tracing both
        # sides) the test server takes a while to take in 27 MB.
        env = {**manage.env, "MEASURE_SETTINGS": json.dumps({**stored, **extra}),
               "MAILER_TEST_EMAIL_TIMEOUT": "300"}
        proc = manage.__class__(env=env).python(MEASURE, timeout=300)
        return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]

    streamed = growth({})
    if HAS_MAILERS:
        mailers = smtp_mailers(smtp_server.port, timeout=300)
        plain = {"MAILERS": {**mailers, "smtp": {**mailers["smtp"], "BACKEND": "tests.backends.PlainSMTP"}}}
    else:
        plain = {"MAILER_EMAIL_BACKEND": "tests.backends.PlainSMTP"}
    in_memory = growth(plain)
    assert len(smtp_server.messages) == 2
    got = next(smtp_server.messages[0]["message"].iter_attachments()).get_content()
    assert len(got) == size
    assert in_memory > size / 2**20, in_memory  # the control: whole copies
    assert streamed < 8, (streamed, in_memory)  # MB: pieces, never the file
