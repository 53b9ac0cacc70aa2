"""Large attachments in MAILER_ATTACHMENT_STORAGE (mailer/attachments.py).

The storage is a real FileSystemStorage in a temporary directory (the
``attachment_storage`` fixture); mail goes to a real SMTP server.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.management import call_command
from django.db import transaction

from mailer import attachments
from mailer.attachments import StoredAttachment
from mailer.engine import send_all
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
    make_message,
    queue_emails,
)
from mailer.storage import decode

pytestmark = pytest.mark.django_db(transaction=True)


def stored_files(storage) -> list[str]:
    """Every file in the storage, relative to its root."""
    found = []
    for root, _, files in os.walk(storage.location):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), storage.location))
    return sorted(found)


def big(size: int, seed: int = 1) -> bytes:
    """``size`` bytes that don't compress (not one repeated byte)."""
    chunk = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(chunk + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def message_with_attachments(**extra) -> EmailMultiAlternatives:
    email = EmailMultiAlternatives(
        "Report", "See attached.", "from@example.com", ["to@example.com"], **extra
    )
    email.attach("small.txt", "tiny", "text/plain")
    email.attach("big.bin", big(5000), "application/octet-stream")
    email.attach("big.csv", "a,b,ü\n" * 400, "text/csv")  # a str, over the limit in UTF-8
    email.attach(MIMEApplication(big(3000, seed=2), "pdf", Name="part.pdf"))
    email.attach_alternative("<p>" + "x" * 2000 + "</p>", "text/html")
    return email


def age(storage, days: float) -> None:
    """Make every stored file look ``days`` old."""
    then = time.time() - days * 86400
    for name in stored_files(storage):
        os.utime(os.path.join(storage.location, name), (then, then))


# --- queue time ------------------------------------------------------------------------


def test_large_attachments_go_to_the_storage_and_the_row_keeps_references(
    attachment_storage,
):
    email = message_with_attachments()
    original = list(email.attachments), list(email.alternatives)
    assert queue_emails([email]) == 1

    # The caller's message is not changed.
    assert (list(email.attachments), list(email.alternatives)) == original
    row = Message.objects.get()
    assert row.attachment_bundle and row.attachment_bundle.startswith("mailer/attachments/")
    assert len(row.message_data) < 4000  # no attachment content in the row
    stored = row.email
    assert stored.attachments[0] == original[0][0]  # small: inline
    refs = attachments.references(stored)
    assert [(r.name, r.mimetype) for r in refs] == [
        ("big.bin", "application/octet-stream"),
        ("big.csv", "text/csv"),
        ("part.pdf", "application/pdf"),
        (None, "text/html"),
    ]
    assert refs[0].size == 5000 and refs[0].sha256 == hashlib.sha256(big(5000)).hexdigest()
    assert refs[1].text and refs[1].size == len(("a,b,ü\n" * 400).encode())
    assert {r.bundle for r in refs} == {row.attachment_bundle}
    assert len(stored_files(attachment_storage)) == 4
    # Unguessable names under the dated prefix.
    assert all(len(r.key.split("/")[-2]) == 32 for r in refs)

    # Read back, the message renders to the same bytes as the one queued.
    loaded = attachments.load(stored)
    assert rendered(loaded) == rendered(email)
    assert loaded.alternatives == original[1]
    assert loaded.attachments[0] == original[0][0]
    assert loaded.attachments[2] == original[0][2]  # a str stays a str
    assert loaded.attachments[3].as_bytes() == original[0][3].as_bytes()


def rendered(email) -> bytes:
    """The message as it goes out, with its random boundaries and date fixed."""
    raw = email.message().as_bytes()
    for number, boundary in enumerate(re.findall(rb'boundary="([^"]+)"', raw)):
        raw = raw.replace(boundary, b"BOUNDARY%d" % number)
    return re.sub(rb"Date: [^\r\n]*", b"Date: X", raw)


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 1000, 57 * 1000 + 1, 123_457])
def test_binary_attachments_render_exactly_as_inline(attachment_storage, settings, size):
    email = EmailMessage("S", "b", "from@example.com", ["to@example.com"],
                        headers={"Message-ID": "<same@example.com>"})
    email.attach("data.bin", big(size, seed=size), "application/octet-stream")
    email.attach("photo.jpg", big(size + 3000, seed=size + 1), "image/jpeg")
    email.attach("naïve name.pdf", big(size + 2000), "application/pdf")
    settings.MAILER_ATTACHMENT_INLINE_MAX = 0  # everything non-empty is stored
    queue_emails([email])
    loaded = attachments.load(Message.objects.get().email)
    assert rendered(loaded) == rendered(email)
    if hasattr(email, "_create_attachment") and size > 200:  # Django < 6.1: the lean path
        assert isinstance(loaded.attachments[0], MIMEBase)
    # The log keeps the stored form, references and all.
    assert attachments.for_log(loaded).attachments == Message.objects.get().email.attachments


def test_threshold_is_strictly_larger_than(attachment_storage, settings):
    settings.MAILER_ATTACHMENT_INLINE_MAX = 100
    email = EmailMessage("S", "b", "from@example.com", ["to@example.com"])
    email.attach("exact.bin", b"x" * 100, "application/octet-stream")
    email.attach("over.bin", b"x" * 101, "application/octet-stream")
    queue_emails([email])
    refs = attachments.references(Message.objects.get().email)
    assert [r.name for r in refs] == ["over.bin"]


def test_unset_setting_keeps_rows_as_232_writes_them(settings):
    assert getattr(settings, "MAILER_ATTACHMENT_STORAGE", None) is None
    queue_emails([message_with_attachments()])
    row = Message.objects.get()
    assert row.attachment_bundle is None
    assert attachments.references(row.email) == []
    assert row.email.attachments[1][1] == big(5000)


def test_make_message_and_save_store_too(attachment_storage):
    msg = make_message("S", "b", "from@example.com", ["to@example.com"],
                       attachments=[("a.bin", big(4000), "application/octet-stream")])
    msg.save()
    row = Message.objects.get()
    assert row.attachment_bundle
    assert [r.name for r in attachments.references(row.email)] == ["a.bin"]
    assert len(stored_files(attachment_storage)) == 1


def test_stored_reference_is_plain_data_for_the_safe_unpickler(attachment_storage):
    queue_emails([message_with_attachments()])
    obj, reason = decode(Message.objects.get().message_data)
    assert reason is None
    ref = attachments.references(obj)[0]
    assert type(ref) is StoredAttachment
    assert set(vars(ref)) == {"key", "name", "mimetype", "size", "sha256", "text"}


class FailingStorage(FileSystemStorage):
    """Writes the first file, then fails (a full disk, an S3 outage)."""

    def _save(self, name, content):
        if self.listdir_all():
            raise OSError("No space left on device")
        return super()._save(name, content)

    def listdir_all(self):
        return [f for _, _, files in os.walk(self.location) for f in files]


def test_a_failing_write_queues_nothing_and_leaves_no_file(settings, tmp_path):
    location = tmp_path / "failing"
    settings.STORAGES = {
        **settings.STORAGES,
        "mailer": {
            "BACKEND": f"{__name__}.FailingStorage",
            "OPTIONS": {"location": str(location)},
        },
    }
    settings.MAILER_ATTACHMENT_STORAGE = "mailer"
    settings.MAILER_ATTACHMENT_INLINE_MAX = 1024
    first = EmailMessage("One", "b", "from@example.com", ["a@example.com"])
    first.attach("one.bin", big(2000), "application/octet-stream")
    second = EmailMessage("Two", "b", "from@example.com", ["b@example.com"])
    second.attach("two.bin", big(2000), "application/octet-stream")
    with pytest.raises(OSError, match="No space left"):
        queue_emails([first, second])
    assert Message.objects.count() == 0
    assert FailingStorage(location=str(location)).listdir_all() == []
    # One message with two big attachments: the same.
    first.attach("three.bin", big(2000, seed=3), "application/octet-stream")
    with pytest.raises(OSError):
        queue_emails([first])
    assert Message.objects.count() == 0
    assert FailingStorage(location=str(location)).listdir_all() == []


# --- send time -------------------------------------------------------------------------


def received_attachments(message) -> dict[str, bytes]:
    return {
        part.get_filename(): part.get_payload(decode=True)
        for part in message.iter_attachments()
        if part.get_filename()
    }


def test_20_mb_attachment_is_delivered_intact(attachment_storage, smtp_settings, smtp_server):
    content = big(20 * 1024 * 1024, seed=20)
    email = EmailMessage("Big", "b", "from@example.com", ["to@example.com"])
    email.attach("big.bin", content, "application/octet-stream")
    queue_emails([email])
    row = Message.objects.get()
    assert len(row.message_data) < 2000
    del email

    result = send_all()
    assert result.sent == 1
    got = received_attachments(smtp_server.messages[0]["message"])
    assert hashlib.sha256(got["big.bin"]).hexdigest() == hashlib.sha256(content).hexdigest()
    # The log keeps the reference, not a second copy.
    log = MessageLog.objects.get()
    assert log.result == RESULT_SUCCESS
    assert log.attachment_bundle == row.attachment_bundle
    assert len(log.message_data) < 2000
    assert attachments.references(log.email)[0].name == "big.bin"
    assert len(stored_files(attachment_storage)) == 1


def test_sent_message_matches_the_inline_one(attachment_storage, smtp_settings, smtp_server, settings):
    queue_emails([message_with_attachments(headers={"Message-ID": "<stored@example.com>"})])
    settings.MAILER_ATTACHMENT_STORAGE = None
    queue_emails([message_with_attachments(headers={"Message-ID": "<inline@example.com>"})])
    settings.MAILER_ATTACHMENT_STORAGE = "mailer"
    assert send_all().sent == 2
    stored, inline = (m["message"] for m in smtp_server.messages)

    def parts(message):
        return [(p.get_content_type(), p.get_filename(), p.get_payload(decode=True))
                for p in message.walk() if not p.is_multipart()]

    assert parts(stored) == parts(inline)


def test_log_without_data_deletes_the_files_after_success(
    attachment_storage, smtp_settings, smtp_server, settings
):
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    queue_emails([message_with_attachments()])
    assert stored_files(attachment_storage)
    assert send_all().sent == 1
    log = MessageLog.objects.get()
    assert log.message_data is None and log.attachment_bundle is None
    assert stored_files(attachment_storage) == []


def test_missing_file_defers_the_message_and_sends_nothing(
    attachment_storage, smtp_settings, smtp_server
):
    queue_emails([message_with_attachments()])
    ref = attachments.references(Message.objects.get().email)[0]
    attachment_storage.delete(ref.key)

    result = send_all()
    assert result.sent == 0 and result.deferred == 1
    assert smtp_server.messages == []
    row = Message.objects.get()
    assert row.priority == PRIORITY_DEFERRED
    log = MessageLog.objects.get()
    assert log.result == RESULT_FAILURE
    assert "big.bin is missing from MAILER_ATTACHMENT_STORAGE 'mailer'" in log.log_message
    assert log.attachment_bundle == row.attachment_bundle  # the log keeps its data


def test_changed_file_defers_the_message(attachment_storage, smtp_settings, smtp_server):
    queue_emails([message_with_attachments()])
    ref = attachments.references(Message.objects.get().email)[0]
    with open(attachment_storage.path(ref.key), "r+b") as handle:
        handle.write(b"tampered")
    result = send_all()
    assert result.deferred == 1 and smtp_server.messages == []
    assert "is not what was stored" in MessageLog.objects.get().log_message


def test_unset_storage_with_stored_rows_defers_with_the_setting_named(
    attachment_storage, smtp_settings, smtp_server, settings
):
    queue_emails([message_with_attachments()])
    settings.MAILER_ATTACHMENT_STORAGE = None
    assert send_all().deferred == 1
    assert "MAILER_ATTACHMENT_STORAGE is not set" in MessageLog.objects.get().log_message


# --- nothing left behind -------------------------------------------------------------------


def test_rolled_back_transaction_leaves_no_row_and_its_file_is_swept(attachment_storage):
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            queue_emails([message_with_attachments()])
            raise RuntimeError("the order was not saved")
    assert Message.objects.count() == 0
    assert len(stored_files(attachment_storage)) == 4  # written before the row

    # Young files are never swept: their row's transaction may still commit.
    call_command("purge_mail_log", "1")
    assert len(stored_files(attachment_storage)) == 4
    age(attachment_storage, 0.9)
    assert attachments.sweep_orphans() == 0
    age(attachment_storage, 1.1)
    call_command("purge_mail_log", "1")
    assert stored_files(attachment_storage) == []


def test_sweep_keeps_old_files_a_row_refers_to(attachment_storage):
    queue_emails([message_with_attachments()])
    age(attachment_storage, 30)
    assert attachments.sweep_orphans() == 0
    assert len(stored_files(attachment_storage)) == 4
    Message.objects.all().delete()  # deleted by other means: swept
    assert attachments.sweep_orphans() == 4
    assert stored_files(attachment_storage) == []


def test_purge_deletes_files_exactly_when_the_last_reference_goes(
    attachment_storage, smtp_settings, smtp_server, settings
):
    queue_emails([message_with_attachments()])
    smtp_server.fail_with = "451 4.3.0 Temporary failure"
    assert send_all().deferred == 1  # a failure entry refers to the files
    Message.objects.update(priority=2)
    smtp_server.fail_with = None
    assert send_all().sent == 1  # and a success entry
    assert list(MessageLog.objects.order_by("id").values_list("result", flat=True)) == [
        RESULT_FAILURE,
        RESULT_SUCCESS,
    ]
    MessageLog.objects.update(when_attempted=MessageLog.objects.get(result=RESULT_SUCCESS)
                              .when_attempted.replace(year=2000))

    call_command("purge_mail_log", "1")  # success entries only
    assert MessageLog.objects.count() == 1
    assert len(stored_files(attachment_storage)) == 4  # the failure entry still refers
    call_command("purge_mail_log", "1", "--result", "failure")
    assert MessageLog.objects.count() == 0
    assert stored_files(attachment_storage) == []


def test_purge_keeps_files_a_queue_row_refers_to(attachment_storage, smtp_settings, smtp_server):
    queue_emails([message_with_attachments()])
    smtp_server.fail_with = "451 4.3.0 Temporary failure"
    assert send_all().deferred == 1
    MessageLog.objects.update(when_attempted=MessageLog.objects.get().when_attempted.replace(year=2000))
    call_command("purge_mail_log", "1", "--result", "all")
    assert MessageLog.objects.count() == 0
    assert len(stored_files(attachment_storage)) == 4  # the deferred message still needs them


def test_requeue_from_the_log_shares_the_files(attachment_storage, smtp_settings, smtp_server):
    queue_emails([message_with_attachments()])
    assert send_all().sent == 1
    log = MessageLog.objects.get()
    queue_emails([log.email])  # what the admin's requeue does
    row = Message.objects.get()
    assert row.attachment_bundle == log.attachment_bundle
    assert len(stored_files(attachment_storage)) == 4  # nothing copied
    log.delete()
    assert attachments.release(row.attachment_bundle) is False  # the queue row refers
    assert send_all().sent == 1
    assert received_attachments(smtp_server.messages[1]["message"])["big.bin"] == big(5000)


@pytest.mark.mysql
def test_20_mb_attachment_queues_on_mariadb(attachment_storage):
    email = EmailMessage("Big", "b", "from@example.com", ["to@example.com"])
    email.attach("big.bin", big(20 * 1024 * 1024, seed=7), "application/octet-stream")
    assert queue_emails([email]) == 1
    assert attachments.references(Message.objects.get().email)[0].size == 20 * 1024 * 1024


def test_only_bundle_directories_are_ever_deleted(attachment_storage):
    # A row's attachment_bundle is data: whatever it says, only directories
    # named like a bundle are deleted.
    attachment_storage.save("precious.txt", ContentFile(b"keep"))
    for bundle in (".", "", "mailer/attachments", "mailer/attachments/2026/11/30/../../.."):
        assert attachments.release(bundle) is False
    assert stored_files(attachment_storage) == ["precious.txt"]
