"""Crafted rows (tests/crafted.py) run nothing and change nothing in the
worker and on the admin's four pages, in the queue and in the log."""

from __future__ import annotations

import pytest
from django.urls import reverse

from mailer.engine import send_all
from mailer.models import RESULT_FAILURE, Message, MessageLog
from mailer.storage import decode
from tests.crafted import CRAFTED, process_state_watched

pytestmark = pytest.mark.django_db


def change_url(obj) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])


@pytest.mark.parametrize("name", CRAFTED)
def test_decoding_refuses(name, tmp_path):
    with process_state_watched():
        obj, reason = decode(CRAFTED[name](tmp_path))
    assert obj is None and reason
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", CRAFTED)
def test_worker_and_admin_run_nothing(name, tmp_path, admin_client, smtp_settings, smtp_server):
    import mailer

    data = CRAFTED[name](tmp_path)
    with process_state_watched():
        msg = Message.objects.create(message_data=data)
        entry = MessageLog.objects.create(
            message_data=data, when_added=msg.when_added, priority=msg.priority,
            result=RESULT_FAILURE, log_message="crafted",
        )
        for url in (
            change_url(msg),
            change_url(entry),
            reverse("admin:mailer_message_changelist"),
            reverse("admin:mailer_messagelog_changelist"),
        ):
            assert admin_client.get(url).status_code == 200, url
        mailer.send_mail("after", "b", "f@example.com", ["t@example.com"])
        result = send_all()
        assert (result.sent, result.failed) == (1, 1)
        failure = MessageLog.objects.filter(result=RESULT_FAILURE).exclude(pk=entry.pk).get()
        assert failure.message_data == data  # kept, with the reason
        assert failure.log_message
        assert admin_client.get(change_url(failure)).status_code == 200
    assert not (tmp_path / "pwned").exists()
    (arrived,) = smtp_server.wait_for(1)
    assert arrived["message"]["Content-Type"].startswith("text/plain")
