"""manage.py mailer_convert: pickled rows of the queue and the log become data."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from mailer.models import RESULT_FAILURE, RESULT_SUCCESS, Message, MessageLog, queue_emails
from tests.crafted import CRAFTED
from tests.mailsurface import MAKERS, PROJECT_CLASSES, make, rendered

pytestmark = pytest.mark.django_db(transaction=True)

DBBACKEND_ROW = (
    Path(__file__).parent / "fixtures" / "pickles" / "django42" / "dbbackend.b64"
).read_text()


def convert(*args: str) -> str:
    out = io.StringIO()
    call_command("mailer_convert", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def pickled_queue(settings, tmp_path):
    """Every message of tests/mailsurface.py queued in 2.3.2's form, a row
    2.3.2 queued through DbBackend, a crafted row, and their log entries."""
    settings.MAILER_MESSAGE_FORMAT = "pickle"
    settings.MAILER_PICKLE_ALLOWLIST = PROJECT_CLASSES
    settings.MAILER_MESSAGE_CLASSES = PROJECT_CLASSES
    for name in MAKERS:
        queue_emails([make(name, tmp_path)])
    Message.objects.bulk_create([Message(message_data=DBBACKEND_ROW)])
    crafted = Message.objects.create(message_data=CRAFTED["os.system"](tmp_path))
    for message in Message.objects.order_by("pk")[:3]:
        MessageLog.objects.log(message, RESULT_SUCCESS, "sent")
    MessageLog.objects.log(crafted, RESULT_FAILURE, "refused")
    MessageLog.objects.create(
        message_data=None, when_added=crafted.when_added, priority=2, result=RESULT_SUCCESS
    )
    settings.MAILER_MESSAGE_FORMAT = "json"
    return crafted


def _rendered_rows(model):
    return {
        row.pk: rendered(row.email) for row in model.objects.order_by("pk") if row.email is not None
    }


def test_dry_run_writes_nothing(pickled_queue):
    before = list(Message.objects.values_list("message_data", flat=True))
    out = convert("--dry-run")
    assert f"{len(MAKERS) + 1} would convert, 1 kept" in out
    assert list(Message.objects.values_list("message_data", flat=True)) == before


def test_convert_in_batches_is_faithful_and_idempotent(pickled_queue, settings):
    queue_before = _rendered_rows(Message)
    log_before = _rendered_rows(MessageLog)
    out = convert("--batch-size", "2")
    assert out.count("mailer_message:") > 2  # progress per batch
    assert "2 rows kept as pickle" in out  # the crafted row, in the queue and the log
    data = dict(Message.objects.values_list("pk", "message_data"))
    assert data.pop(pickled_queue.pk)[:1] != "{"  # the crafted row is kept as it was
    assert all(d.startswith("{") for d in data.values())
    assert _rendered_rows(Message) == queue_before
    assert _rendered_rows(MessageLog) == log_before
    again = convert()
    assert "0 converted" in again
    assert dict(Message.objects.values_list("pk", "message_data")) == {
        **data, pickled_queue.pk: Message.objects.get(pk=pickled_queue.pk).message_data
    }


def test_after_converting_pickle_reading_can_be_off(pickled_queue, settings, smtp_settings,
                                                    smtp_server):
    convert()
    settings.MAILER_READ_PICKLE = False
    from mailer.engine import send_all

    result = send_all()
    assert result.sent == len(MAKERS) + 1
    assert result.failed == 1  # the crafted row: refused without being read
    failure = MessageLog.objects.filter(result=RESULT_FAILURE, log_message__contains="READ_PICKLE")
    assert failure.count() == 1
    assert len(smtp_server.wait_for(len(MAKERS) + 1)) == len(MAKERS) + 1


def test_refuses_to_run_with_pickle_reading_off(settings):
    settings.MAILER_READ_PICKLE = False
    with pytest.raises(CommandError, match="MAILER_READ_PICKLE"):
        convert()


def test_a_class_not_in_message_classes_is_kept_with_the_reason(pickled_queue, settings, caplog):
    settings.MAILER_MESSAGE_CLASSES = []
    convert()
    kept = [r for r in Message.objects.all() if not r.message_data.startswith("{")]
    assert len(kept) == 3  # the two project classes and the crafted row
    assert "MAILER_MESSAGE_CLASSES" in caplog.text
