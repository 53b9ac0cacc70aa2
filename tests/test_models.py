"""mailer/models.py: stored data, managers, properties."""

import base64
import gc
import pickle

import pytest
from django.core.mail import EmailMessage
from django.utils import timezone
from django.utils.functional import lazy

from mailer import models, storage
from mailer.models import (
    PRIORITIES,
    PRIORITY_MAPPING,
    RESULT_CODES,
    DontSendEntry,
    Message,
    MessageLog,
    db_to_email,
    email_to_db,
    filter_recipient_list,
    get_message_id,
    make_message,
    queue_emails,
)


def test_constants():
    assert (models.PRIORITY_HIGH, models.PRIORITY_MEDIUM, models.PRIORITY_LOW,
            models.PRIORITY_DEFERRED) == (1, 2, 3, 4)
    assert [label for _, label in PRIORITIES] == ["high", "medium", "low", "deferred"]
    assert PRIORITY_MAPPING == {"high": 1, "medium": 2, "low": 3, "deferred": 4}
    assert [code for code, _ in RESULT_CODES] == ["1", "2", "3"]
    assert [label for _, label in RESULT_CODES] == ["success", "don't send", "failure"]


def test_tables():
    assert Message._meta.db_table == "mailer_message"
    assert MessageLog._meta.db_table == "mailer_messagelog"
    assert DontSendEntry._meta.db_table == "mailer_dontsendentry"


def test_stored_form_is_base64_pickle(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    data = email_to_db(email)
    assert data.isascii()
    assert pickle.loads(base64.decodebytes(data.encode("ascii"))).subject == "S"
    assert db_to_email(data).subject == "S"


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 1500, 57 * 40 + 3])
def test_stored_form_has_the_lines_base64_encodebytes_writes(size):
    """76-character lines, each ending in a newline, as 2.3.2 stores it."""
    data = bytes(range(256)) * 40
    assert storage._encodebytes(data[:size]) == base64.encodebytes(data[:size]).decode("ascii")


@pytest.mark.django_db
def test_queueing_pauses_the_cycle_collector_and_restores_it():
    seen = []
    # A lazy subject: forced (and so observed) while the batch is prepared.
    subject = lazy(lambda: seen.append(gc.isenabled()) or "S", str)()

    assert gc.isenabled()
    queue_emails([EmailMessage(subject, "b", "f@example.com", ["t@example.com"])] * 2)
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(ValueError):  # refused: still restored
        queue_emails([EmailMessage("S\n", "b", "f@example.com", ["t@example.com"])])
    assert gc.isenabled()
    gc.disable()
    try:
        queue_emails([EmailMessage("S", "b", "f@example.com", ["t@example.com"])])
        assert not gc.isenabled()  # a process that keeps it off keeps it off
    finally:
        gc.enable()


def test_legacy_raw_pickle_and_garbage():
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    assert db_to_email(pickle.dumps(email, protocol=0).decode("latin-1")).subject == "S"
    for bad in ("", None, "garbage!", "gASVAAAA", "\u00e9\u00e8"):
        assert db_to_email(bad) is None


def test_get_message_id_any_case():
    email = EmailMessage(headers={"message-ID": "<x@y>"})
    assert get_message_id(email) == "<x@y>"
    assert get_message_id(EmailMessage()) is None
    assert get_message_id(None) is None


def test_undecodable_message_properties_never_raise():
    m = Message(message_data="garbage", pk=3)
    assert m.email is None
    assert m.to_addresses == []
    assert m.subject == ""
    assert str(m) == "<Message repr unavailable>"
    log = MessageLog(message_data=None)
    assert (log.email, log.to_addresses, log.subject) == (None, None, None)
    assert str(log)


@pytest.mark.django_db
def test_make_message_filters_and_stays_unsaved():
    DontSendEntry.objects.create(to_address="no@example.com")
    msg = make_message("S", "b", "f@example.com", ["no@example.com", "ok@example.com"],
                       bcc=["NO@example.com"], priority=models.PRIORITY_LOW)
    assert msg.pk is None
    assert msg.email.to == ["ok@example.com"] and msg.email.bcc == []
    msg.save()
    assert Message.objects.get().priority == models.PRIORITY_LOW
    assert Message.objects.get().message_id  # assigned when saved


@pytest.mark.django_db
def test_replacing_email_before_save():
    msg = make_message("S", "b", "f@example.com", ["t@example.com"])
    email = EmailMessage("Other", "b", "f@example.com", ["t@example.com"])
    email.attach("a.txt", "x", "text/plain")
    msg.email = email
    msg.save()
    stored = Message.objects.get()
    assert stored.subject == "Other" and stored.subject_text == "Other"
    assert stored.email.attachments[0][0] == "a.txt"


@pytest.mark.django_db
def test_filter_recipient_list():
    assert filter_recipient_list(None) is None
    DontSendEntry.objects.create(to_address="No@Example.com")
    assert filter_recipient_list(["no@example.COM", "yes@example.com"]) == ["yes@example.com"]
    assert DontSendEntry.objects.has_address("NO@example.com")
    assert not DontSendEntry.objects.has_address("yes@example.com")


@pytest.mark.django_db
def test_queryset_helpers():
    for p in (1, 2, 2, 3, 4):
        msg = make_message("S", "b", "f@example.com", ["t@example.com"], priority=p)
        msg.save()
    assert Message.objects.high_priority().count() == 1
    assert Message.objects.medium_priority().count() == 2
    assert Message.objects.low_priority().count() == 1
    assert Message.objects.deferred().count() == 1
    assert Message.objects.non_deferred().count() == 4
    assert Message.objects.retry_deferred(new_priority=models.PRIORITY_HIGH) == 1
    assert Message.objects.high_priority().count() == 2


@pytest.mark.django_db
def test_log_copies_the_message():
    msg = make_message("S", "b", "f@example.com", ["t@example.com"], priority=1)
    msg.save()
    log = MessageLog.objects.log(msg, models.RESULT_FAILURE, "boom")
    assert (log.priority, log.when_added, log.log_message) == (1, msg.when_added, "boom")
    assert log.message_id == msg.message_id
    assert log.to_addresses == ["t@example.com"] and log.subject == "S"
    assert str(log) == f'On {log.when_attempted}, "S" to t@example.com'


# --- str(): 2.3.2's words, which sites' own tests compare against ------------------


@pytest.mark.django_db
def test_str_of_a_message():
    when = timezone.now()
    msg = make_message("Hello", "b", "f@example.com", ["a@example.com", "b@example.com"])
    msg.when_added = when
    assert str(msg) == f'On {when}, "Hello" to a@example.com, b@example.com'
    for data in ("", "garbage", "AAAA\n"):
        assert str(Message(message_data=data, when_added=when)) == "<Message repr unavailable>"


@pytest.mark.django_db
def test_str_of_a_log_entry():
    when = timezone.now()
    msg = make_message("Hello", "b", "f@example.com", ["a@example.com"])
    with_data = MessageLog(message_data=msg.message_data, when_attempted=when, message_id="<m@x>")
    assert str(with_data) == f'On {when}, "Hello" to a@example.com'
    # Content not kept (MAILER_EMAIL_LOG_MESSAGE_DATA = False) or unreadable:
    # the Message-ID stands in for it.
    for data in (None, "", "garbage"):
        entry = MessageLog(message_data=data, when_attempted=when, message_id="<m@x>")
        assert str(entry) == f'On {when}, "<m@x>"'


def test_str_of_a_log_entry_never_raises():
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    entry = MessageLog(message_data=None, message_id="<m@x>")
    entry.when_attempted = Unprintable()
    assert str(entry) == "<MessageLog repr unavailable>"
