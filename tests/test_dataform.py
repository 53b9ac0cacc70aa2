"""mailer/dataform.py: the data-only stored form gives back what went in."""

from __future__ import annotations

import pytest
from django.core.mail import EmailMessage

from mailer import dataform
from mailer.compat import repair_email
from mailer.dataform import NotData
from tests.mailsurface import MAKERS, PROJECT_CLASSES, make, rendered


@pytest.fixture
def project_classes(settings):
    settings.MAILER_MESSAGE_CLASSES = PROJECT_CLASSES
    yield


def _with_id(email: EmailMessage) -> EmailMessage:
    email.extra_headers = {**email.extra_headers, "Message-ID": "<fixed@example.com>"}
    return email


@pytest.mark.parametrize("name", MAKERS)
def test_round_trip_is_byte_identical(name, tmp_path, project_classes):
    email = _with_id(make(name, tmp_path))
    before = rendered(email)
    data = dataform.encode(email)
    assert data.startswith("{") and data.isascii()
    back, reason = dataform.decode(data)
    assert reason is None
    back = repair_email(back)
    assert type(back) is type(email)
    assert rendered(back) == before
    extra = set(vars(email)) - {"connection", "_connection"}
    assert extra == set(vars(back)) - {"connection", "_connection"}


@pytest.mark.parametrize("name", MAKERS)
def test_encoding_is_stable(name, tmp_path, project_classes):
    data = dataform.encode(_with_id(make(name, tmp_path)))
    assert dataform.encode(repair_email(dataform.decode(data)[0])) == data


class Opaque:
    pass


def test_an_attribute_that_is_not_data_is_named(project_classes):
    from tests.mailsurface import ProjectMessage

    email = ProjectMessage("S", "b", "f@example.com", ["t@example.com"])
    email.tracking["ids"].append(Opaque())
    with pytest.raises(NotData) as raised:
        dataform.encode(email)
    assert raised.value.path == "tracking['ids'][3]"
    assert "Opaque" in str(raised.value)


def test_an_unlisted_class_is_refused_naming_the_setting():
    from tests.mailsurface import ProjectMessage

    email = ProjectMessage("S", "b", "f@example.com", ["t@example.com"])
    with pytest.raises(NotData, match="MAILER_MESSAGE_CLASSES"):
        dataform.encode(email)


def test_a_row_of_an_unlisted_class_is_refused(project_classes, settings):
    from tests.mailsurface import ProjectMessage

    data = dataform.encode(ProjectMessage("S", "b", "f@example.com", ["t@example.com"]))
    settings.MAILER_MESSAGE_CLASSES = []
    obj, reason = dataform.decode(data)
    assert obj is None
    assert "tests.mailsurface.ProjectMessage" in reason and "MAILER_MESSAGE_CLASSES" in reason


@pytest.mark.parametrize("value", ["", 0, [], (), "ünïcode", [["nested"], {"k": 1}], {"$b": 1},
                                   {1: (2, b"3")}])
def test_plain_values_round_trip(value):
    back, reason = dataform.decode(dataform.encode(value))
    assert reason is None
    assert back == value and type(back) is type(value)


_EMPTY = '"subject":"S","body":"b","from_email":"f@example.com","to":["t@example.com"]'


@pytest.mark.parametrize(
    "data",
    [
        '{"v":1,"c":"os.system","d":{}}',
        '{"v":1,"c":"posix.system","d":{}}',
        '{"v":1,"c":"django.core.mail.backends.smtp.EmailBackend","d":{}}',
        '{"v":2,"c":"django.core.mail.message.EmailMessage","d":{}}',
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{"__class__":"x"}}',
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{"__dict__":{}}}',
        '{"v":1,"value":{"$obj":["os._wrap_close",{}]}}',
        '{"v":1,"value":{"$obj":["email.mime.text.MIMEText",{"__class__":1}]}}',
        '{"v":1,"value":{"$nope":1}}',
        '{"v":1,"value":{"$policy":"os"}}',
        '{"v":1,"value":{"$policy":["default",{"header_factory":"x"}]}}',
        '{"v":1,"value":{"$dtz":["2026-01-01T00:00:00","../../etc/passwd",0]}}',
        '{"v":1,"value":{"$ref":{"key":"k"}}}',
        '{"v":1,"value":{"$b":"not base64!"}}',
        '{"v":1,"value":' + "[" * 100_000 + "]" * 100_000 + "}",
        "{not json",
    ],
)
def test_crafted_data_is_refused(data):
    import sys

    modules = set(sys.modules)
    obj, reason = dataform.decode(data)
    assert obj is None and reason
    assert set(sys.modules) <= modules | {"zoneinfo._tzpath"}


# --- through the queue and a worker pass -------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["json", "pickle"])
@pytest.mark.parametrize("name", MAKERS)
def test_what_a_worker_sends_is_what_was_queued(name, fmt, tmp_path, settings, project_classes):
    """message().as_bytes() after a worker pass equals the bytes before
    queueing (boundaries and Date aside; the Message-ID is the one queueing
    gave, written back onto the caller's message)."""
    from django.core import mail
    from django.utils import translation

    from mailer.engine import send_all
    from mailer.models import Message, queue_emails

    settings.MAILER_MESSAGE_FORMAT = fmt
    settings.MAILER_PICKLE_ALLOWLIST = PROJECT_CLASSES
    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    email = make(name, tmp_path)
    with translation.override("de"):
        assert queue_emails([email]) == 1
        before = rendered(email)
    assert Message.objects.get().message_data[:1] == ("{" if fmt == "json" else "g")
    mail.outbox = []
    assert send_all().sent == 1
    (sent,) = mail.outbox
    assert rendered(sent) == before


def test_a_memoryview_attachment_is_stored_as_its_bytes():
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.attachments.append(("a.bin", memoryview(b"\x00\x01\x02"), "application/octet-stream"))
    back, reason = dataform.decode(dataform.encode(email))
    assert reason is None and bytes(back.attachments[0][1]) == b"\x00\x01\x02"
