"""Delivery errors name the server (mailer/errors.py), against a real SMTP server."""

import socket
from types import SimpleNamespace

import pytest

import mailer
from mailer.compat import HAS_MAILERS
from mailer.engine import send_all
from mailer.errors import describe_delivery_error
from mailer.models import RESULT_FAILURE, Message, MessageLog
from tests.conftest import free_port
from tests.settings import smtp_mailers

pytestmark = pytest.mark.django_db

WHERE = "MAILERS['smtp']['OPTIONS'] host/port" if HAS_MAILERS else "EMAIL_HOST/EMAIL_PORT"


def queue_one():
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])


def point_at(settings, port):
    if HAS_MAILERS:
        settings.MAILERS = smtp_mailers(port)
    else:
        settings.EMAIL_PORT = port


def test_connection_refused_names_host_port_and_settings(smtp_settings, settings):
    port = free_port()  # nothing listens there
    point_at(settings, port)
    queue_one()
    assert send_all().deferred == 1
    log = MessageLog.objects.get(result=RESULT_FAILURE)
    assert log.log_message == f"Connection refused by 127.0.0.1:{port} ({WHERE})"
    assert Message.objects.deferred().count() == 1


def test_a_server_reply_keeps_its_words_and_says_who(smtp_settings, smtp_server):
    smtp_server.fail_with = "451 4.3.0 try again later"
    queue_one()
    send_all()
    text = MessageLog.objects.get().log_message
    assert "451" in text and "try again later" in text
    assert text.endswith(f"(from 127.0.0.1:{smtp_server.port}, {WHERE})")


def test_a_dropped_connection_names_the_server(smtp_settings, smtp_server):
    smtp_server.drop = True
    queue_one()
    send_all()
    text = MessageLog.objects.get().log_message
    assert f"127.0.0.1:{smtp_server.port}" in text


@pytest.mark.parametrize(
    "exc, expected",
    [
        (TimeoutError("timed out"), "Timed out talking to mail.example.com:587"),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "Can't resolve mail.example.com:587",
        ),
        (OSError(113, "No route to host"), "No route to host mail.example.com:587"),
    ],
)
def test_network_errors(exc, expected, settings):
    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    backend = SimpleNamespace(host="mail.example.com", port=587)  # what SMTP backends have
    text = describe_delivery_error(exc, backend)
    assert text.startswith(expected) and "(EMAIL_HOST/EMAIL_PORT)" in text


def test_a_backend_without_a_host_keeps_the_plain_text():
    assert describe_delivery_error(ConnectionRefusedError(111, "Connection refused"), object()) == (
        "[Errno 111] Connection refused"
    )
