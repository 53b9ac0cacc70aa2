"""Django 6.1 MAILERS: the whole flow, with every warning an error."""

import warnings

import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.core.management import call_command

import mailer
from mailer.compat import HAS_MAILERS
from mailer.models import Message, MessageLog

pytestmark = [
    pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+"),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def mailers(settings, smtp_server):
    settings.MAILERS = {
        "default": {"BACKEND": "mailer.backend.DbBackend"},
        "newsletter": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"priority": 3}},
        "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": smtp_server.host, "port": smtp_server.port, "timeout": 10},
        },
    }
    settings.MAILER_USING = "smtp"
    settings.ADMINS = ["ada@example.com"]
    settings.MANAGERS = ["mia@example.com"]


def test_whole_flow_without_warnings(mailers, smtp_server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mail.send_mail("django send_mail", "b", "f@example.com", ["t@example.com"],
                       html_message="<p>hi</p>")
        mail.mail_admins("django mail_admins", "b")
        mail.mail_managers("django mail_managers", "b")
        EmailMessage("EmailMessage.send", "b", "f@example.com", ["t@example.com"]).send(
            using="newsletter"
        )
        mail.send_mass_mail([("mass 1", "b", "f@example.com", ["a@example.com"]),
                             ("mass 2", "b", "f@example.com", ["b@example.com"])])
        mailer.send_mail("mailer send_mail", "b", "f@example.com", ["t@example.com"])
        mailer.mail_admins("mailer mail_admins", "b", html_message="<b>x</b>")
        assert Message.objects.count() == 8
        assert Message.objects.get(subject_text="EmailMessage.send").priority == 3
        call_command("send_mail", verbosity=0)
    assert sorted(smtp_server.subjects()) == sorted([
        "django send_mail", "[Django] django mail_admins", "[Django] django mail_managers",
        "EmailMessage.send", "mass 1", "mass 2", "mailer send_mail", "[Django] mailer mail_admins",
    ])
    assert MessageLog.objects.count() == 8


def test_mailer_send_mail_using_a_real_mailer_queues_for_that_route(mailers, smtp_server):
    """mailer.send_mail queues: using= names the route (issue 28), it no
    longer sends at once (a backend instance as connection= still does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mailer.send_mail("routed", "b", "f@example.com", ["t@example.com"], using="smtp")
    assert smtp_server.subjects() == []
    assert Message.objects.get().route == "smtp"
    call_command("send_mail", verbosity=0)
    assert smtp_server.subjects() == ["routed"]


def test_mailer_send_mail_using_a_queue_alias(mailers):
    mailer.send_mail("queued", "b", "f@example.com", ["t@example.com"], using="newsletter")
    assert Message.objects.get().subject == "queued"


def test_legacy_mailer_email_backend_still_works(settings, smtp_server):
    """A 2.3.2-style MAILER_EMAIL_BACKEND keeps working next to MAILERS."""
    settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend"}}
    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mailer.send_mail("legacy", "b", "f@example.com", ["t@example.com"])
    call_command("send_mail", verbosity=0)
    assert [m.subject for m in mail.outbox] == ["legacy"]
