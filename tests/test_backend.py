"""mailer.backend.DbBackend."""

import pytest
from django.core import mail
from django.core.mail import EmailMessage, EmailMultiAlternatives

from mailer.backend import DbBackend
from mailer.compat import HAS_MAILERS
from mailer.models import PRIORITY_LOW, RESULT_DONT_SEND, DontSendEntry, Message, MessageLog

pytestmark = pytest.mark.django_db


@pytest.fixture
def queue_backend(settings):
    if HAS_MAILERS:
        settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend"}}
    else:
        settings.EMAIL_BACKEND = "mailer.backend.DbBackend"


def test_django_send_mail_is_queued(queue_backend):
    assert mail.send_mail("S", "b", "f@example.com", ["t@example.com"]) == 1
    assert Message.objects.get().email.subject == "S"


def test_send_mass_mail_is_one_bulk_insert(queue_backend, django_assert_max_num_queries):
    data = [(f"S{i}", "b", "f@example.com", [f"t{i}@example.com"]) for i in range(30)]
    with django_assert_max_num_queries(4):
        assert mail.send_mass_mail(data) == 30
    assert Message.objects.count() == 30


def test_batch_size(settings, django_assert_num_queries):
    settings.MAILER_MESSAGES_BATCH_SIZE = 10
    messages = [EmailMessage("S", "b", "f@example.com", [f"t{i}@example.com"]) for i in range(25)]
    backend = DbBackend()
    # Three INSERTs of at most 10 rows; no don't-send lookup at queue time.
    with django_assert_num_queries(3):
        assert backend.send_messages(messages) == 25


def test_one_message_is_one_statement(queue_backend, django_assert_num_queries):
    DontSendEntry.objects.create(to_address="no@example.com")
    with django_assert_num_queries(1):
        assert mail.send_mail("S", "b", "f@example.com", ["no@example.com", "t@example.com"]) == 1


@pytest.mark.django_db(transaction=True)
def test_dont_send_list_applies_at_delivery(queue_backend, smtp_settings, smtp_server):
    from mailer.engine import send_all

    email = EmailMessage("S", "b", "f@example.com", ["no@example.com", "yes@example.com"],
                         cc=["NO@example.com"], bcc=["no@example.com", "b@example.com"])
    email.send()
    # Added after queueing: still honoured when the message's turn comes.
    DontSendEntry.objects.create(to_address="no@example.com")
    assert send_all().sent == 1
    (received,) = smtp_server.messages
    assert sorted(received["to"]) == ["b@example.com", "yes@example.com"]
    assert received["message"]["To"] == "yes@example.com"
    assert received["message"]["Cc"] is None
    # The caller's object is not changed (only its Message-ID is added).
    assert email.to == ["no@example.com", "yes@example.com"]


@pytest.mark.django_db(transaction=True)
def test_all_recipients_blocked_logs_dont_send(queue_backend, smtp_settings, smtp_server):
    from mailer.engine import send_all

    DontSendEntry.objects.create(to_address="no@example.com")
    assert mail.send_mail("S", "b", "f@example.com", ["no@example.com"]) == 1
    assert send_all().dont_send == 1
    assert smtp_server.messages == []
    assert not Message.objects.exists()
    log = MessageLog.objects.get()
    assert log.result == RESULT_DONT_SEND
    assert log.email.subject == "S"
    assert log.message_id
    assert log.recipients == "no@example.com"  # who was suppressed


def test_invalid_message_raises_and_stores_nothing(queue_backend):
    with pytest.raises(ValueError):
        mail.send_mail("S\nBcc: x@example.com", "b", "f@example.com", ["t@example.com"])
    assert not Message.objects.exists()


def test_priority_option():
    DbBackend(priority=PRIORITY_LOW).send_messages(
        [EmailMessage("S", "b", "f@example.com", ["t@example.com"])]
    )
    assert Message.objects.get().priority == PRIORITY_LOW


def test_no_messages():
    assert DbBackend().send_messages([]) == 0


def test_connection_not_pickled(queue_backend):
    backend = DbBackend()
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.__dict__["_connection" if HAS_MAILERS else "connection"] = backend
    backend.send_messages([email])
    stored = Message.objects.get().email
    assert getattr(stored, "_connection" if HAS_MAILERS else "connection") is None
    assert email.__dict__["_connection" if HAS_MAILERS else "connection"] is backend


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_mailers_entry_with_options(settings):
    settings.MAILERS = {
        "default": {"BACKEND": "mailer.backend.DbBackend"},
        "bulk": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"batch_size": 5, "priority": 3}},
    }
    backend = mail.mailers["bulk"]
    assert (backend.alias, backend.batch_size, backend.priority) == ("bulk", 5, 3)
    EmailMessage("S", "b", "f@example.com", ["t@example.com"]).send(using="bulk")
    assert Message.objects.get().priority == 3


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_unknown_mailers_option_is_reported(settings):
    from django.core.mail import InvalidMailer

    settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"nope": 1}}}
    with pytest.raises(InvalidMailer, match="nope"):
        mail.mailers["default"]


@pytest.mark.django_db(transaction=True)
def test_lazy_subject_is_delivered_in_the_language_it_was_queued_in(smtp_settings, smtp_server):
    """Queued under "ru", sent by a worker whose language is English."""
    from django.utils import translation
    from django.utils.translation import gettext_lazy

    from mailer.engine import send_all

    email = EmailMultiAlternatives(
        gettext_lazy("Password"), gettext_lazy("Save"), "f@example.com", ["t@example.com"]
    )
    email.attach_alternative(gettext_lazy("Email address"), "text/html")
    with translation.override("ru"):
        DbBackend().send_messages([email])
    assert Message.objects.get().subject_text == "Пароль"  # what the admin shows
    assert translation.get_language() != "ru"
    assert send_all().sent == 1
    (received,) = smtp_server.wait_for(1)
    message = received["message"]
    assert message["Subject"] == "Пароль"
    assert message.get_body(("plain",)).get_content().strip() == "Сохранить"
    assert message.get_body(("html",)).get_content().strip() == "Адрес электронной почты"
