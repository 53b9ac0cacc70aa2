"""mailer/mysql.py: messages near the server's max_allowed_packet (MariaDB / MySQL).

Sizes are taken from the server itself (``@@max_allowed_packet``), so the
tests hold for any setting; the one here is MariaDB's default, 16 MB.
"""

from __future__ import annotations

import os

import pytest
from django.core.mail import EmailMessage
from django.db import connection, transaction

import mailer
from mailer.backend import DbBackend
from mailer.engine import send_all
from mailer.models import Message, MessageLog, email_to_db, fill_search_fields, make_message
from mailer.mysql import PACKET_TOO_LARGE, packet_limit, row_size

pytestmark = [pytest.mark.mysql, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RAW_PER_STORED = 0.73  # attachment bytes per stored character (base64 of a pickle)


def server_limit() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        return int(cursor.fetchone()[0])


def email_with(raw: int, subject: str = "big") -> EmailMessage:
    email = EmailMessage(subject, "body", "from@example.com", ["to@example.com"])
    email.attach("big.bin", os.urandom(raw), "application/octet-stream")
    return email


def sized_email(size_of, target: int, subject: str = "big") -> EmailMessage:
    """An email whose ``size_of(email)`` is within 1 KiB of ``target``."""
    raw = int(target * RAW_PER_STORED)
    for _ in range(5):
        email = email_with(raw, subject)
        size = size_of(email)
        if abs(size - target) <= 1024:
            return email
        raw += int((target - size) * RAW_PER_STORED)
    raise AssertionError(f"could not size a message to {target} bytes")


def stored_length(email: EmailMessage) -> int:
    return len(email_to_db(email))


def statement_size(email: EmailMessage) -> int:
    row = Message()
    row.email = email
    fill_search_fields(row, email)
    return row_size(row)


def assert_clear_error(err: ValueError) -> None:
    text = str(err)
    assert "max_allowed_packet" in text
    assert "MAILER_ATTACHMENT_STORAGE" in text
    assert "Nothing was queued" in text
    assert "gone away" not in text


def test_message_just_over_the_limit_is_a_clear_error():
    limit = server_limit()
    mailer.send_mail("before", "b", "from@example.com", ["to@example.com"])
    # The stored text alone is bigger than the server accepts in one packet.
    big = sized_email(stored_length, limit + 4096)
    with pytest.raises(ValueError) as info:
        DbBackend().send_messages([big])
    assert_clear_error(info.value)
    assert f"({limit / (1 << 20):.1f} MB)" in str(info.value)
    # Nothing half-stored, and the connection still works.
    assert list(Message.objects.values_list("subject_text", flat=True)) == ["before"]
    mailer.send_mail("after", "b", "from@example.com", ["to@example.com"])
    assert Message.objects.count() == 2


def test_the_callers_transaction_survives_the_error():
    limit = server_limit()
    big = sized_email(stored_length, limit + 4096)
    with transaction.atomic():
        mailer.send_mail("first", "b", "from@example.com", ["to@example.com"])
        with pytest.raises(ValueError):
            DbBackend().send_messages([big])
        mailer.send_mail("second", "b", "from@example.com", ["to@example.com"])
    assert sorted(Message.objects.values_list("subject_text", flat=True)) == ["first", "second"]


def test_make_message_save_too_large_is_the_same_error():
    """The 2.3.2 route: make_message(), replace .email, save()."""
    limit = server_limit()
    message = make_message("big", "b", "from@example.com", ["to@example.com"])
    message.email = sized_email(stored_length, limit + 4096)
    with pytest.raises(ValueError) as info:
        message.save()
    assert_clear_error(info.value)
    assert not Message.objects.exists()


def test_message_just_under_the_limit_is_queued_and_sent(smtp_settings, smtp_server):
    """The size check refuses nothing the server would take (32 KiB margin)."""
    limit = server_limit()
    email = sized_email(statement_size, limit - 32 * 1024, subject="just fits")
    assert DbBackend().send_messages([email]) == 1
    assert send_all().sent == 1
    arrived = smtp_server.wait_for(1, timeout=60)
    assert arrived[0]["message"]["Subject"] == "just fits"
    assert MessageLog.objects.get().message_data  # the log row fits as well
    assert not Message.objects.exists()


def test_many_messages_over_the_limit_together_are_split_into_statements():
    limit = server_limit()
    # Six messages of a fifth of the limit each: one INSERT of all six would
    # be refused; each row on its own fits easily.
    each = limit // 5
    emails = [sized_email(statement_size, each, subject=f"part {i}") for i in range(6)]
    assert DbBackend().send_messages(emails) == 6
    assert Message.objects.count() == 6


def test_a_refused_statement_becomes_the_same_clear_error():
    """Should a statement get past the size check, the server's refusal is
    translated the same way and the dropped connection is replaced."""
    limit = server_limit()
    row = Message(message_data="x")
    with pytest.raises(ValueError) as info:
        with packet_limit("default", [row]):
            with connection.cursor() as cursor:
                cursor.execute("SELECT LENGTH(%s)", ["x" * (limit + 1024)])
    assert_clear_error(info.value)
    assert info.value.__cause__.args[0] in PACKET_TOO_LARGE
    assert Message.objects.count() == 0  # a new connection


def test_four_byte_characters_are_stored():
    """With charset utf8mb4 (docs/installation.rst) an emoji subject queues;
    Django 4.2's default, utf8 (utf8mb3), refuses it with error 1366."""
    mailer.send_mail("Party \U0001f389", "b", "from@example.com", ["to@example.com"])
    message = Message.objects.get()
    assert message.subject_text == "Party \U0001f389"
    assert message.email.subject == "Party \U0001f389"
