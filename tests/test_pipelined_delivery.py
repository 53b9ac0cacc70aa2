"""Delivery with RFC 2920 pipelining (mailer.connection, mailer.engine)
against a server of our own that records which commands arrived before it
answered, on every database: every guarantee of docs/delivery.rst holds per
message. And the deadline on each SMTP exchange (a greeting that never ends)."""

from __future__ import annotations

import email
import os
import signal
import threading
import time

import pytest
from django.core.mail import EmailMessage

import mailer
from mailer import quotas
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
from tests.conftest import ScriptedServer
from tests.settings import smtp_mailers

pytestmark = pytest.mark.django_db(transaction=True)


def queue(n: int, start: int = 0, to=None) -> list[str]:
    """Queue n messages with known Message-IDs; return the IDs."""
    ids = [f"<p{i}@example.com>" for i in range(start, start + n)]
    queue_emails(
        [
            EmailMessage(f"S{i}", f"Body {i}\n.dot\n", "from@example.com",
                         to or [f"to{i}@example.com"], headers={"Message-ID": ids[i - start]})
            for i in range(start, start + n)
        ]
    )
    return ids


def use(settings, server: ScriptedServer, timeout: float = 5, backend: str | None = None) -> None:
    if HAS_MAILERS:
        mailers = smtp_mailers(server.port, timeout=timeout)
        if backend:
            mailers["smtp"]["BACKEND"] = backend
        settings.MAILERS = mailers
        settings.MAILER_USING = "smtp"
    else:
        settings.MAILER_EMAIL_BACKEND = backend or "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST = server.host
        settings.EMAIL_PORT = server.port
        settings.EMAIL_TIMEOUT = timeout


def verbs(server: ScriptedServer) -> list[list[str]]:
    out = []
    for n in range(1, server.connections + 1):
        out.extend(server.groups(n))
    return out


def test_a_pass_sends_each_envelope_as_one_group_and_overlaps_messages(settings, scripted_server):
    use(settings, scripted_server)
    scripted_server.end_delay = 0.05  # the provider's work on each message
    ids = queue(8)
    result = send_all()
    assert (result.sent, result.deferred, result.failed) == (8, 0, 0)
    assert sorted(scripted_server.message_ids()) == sorted(ids)
    groups = verbs(scripted_server)
    assert ["MAIL", "RCPT", "DATA"] in groups
    # The end of one message's data and the next message's envelope arrived
    # together (the lane's second thread wrote it behind the first).
    assert [".", "MAIL", "RCPT", "DATA"] in groups
    assert all(g in (["EHLO"], ["MAIL", "RCPT", "DATA"], ["."], [".", "MAIL", "RCPT", "DATA"], ["QUIT"])
               for g in groups), groups
    assert scripted_server.connections == 1
    assert not Message.objects.exists()
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == 8


def test_max_batch_counts_both_threads_of_a_lane(settings, scripted_server):
    use(settings, scripted_server)
    scripted_server.end_delay = 0.02
    settings.MAILER_EMAIL_MAX_BATCH = 5
    queue(12)
    result = send_all()
    assert result.sent == 5
    assert len(scripted_server.message_ids()) == 5
    assert Message.objects.count() == 7


@pytest.mark.parametrize("why", ["setting off", "not offered", "another backend"])
def test_command_by_command_otherwise(settings, why):
    server = ScriptedServer(pipelining=why != "not offered")
    try:
        use(settings, server, backend="tests.backends.PlainSMTP" if why == "another backend" else None)
        if why == "setting off":
            settings.MAILER_SMTP_PIPELINING = False
        ids = queue(3, to=["a@example.com", "b@example.com"])
        assert send_all().sent == 3
        assert sorted(server.message_ids()) == sorted(ids)
        assert all(len(g) == 1 for g in verbs(server)), verbs(server)
    finally:
        server.close()


def test_some_recipients_refused_inside_a_group(settings, scripted_server):
    use(settings, scripted_server)
    scripted_server.refuse["bad@example.com"] = "550 5.1.1 no such user"
    queue(3, to=["ok@example.com", "bad@example.com"])
    assert send_all().sent == 3
    entries = MessageLog.objects.filter(result=RESULT_SUCCESS)
    assert entries.count() == 3
    for entry in entries:
        assert "bad@example.com (550 5.1.1 no such user)" in entry.log_message
    assert all(m["to"] == ["ok@example.com"] for m in scripted_server.messages)


def test_a_5xx_to_data_defers_that_message_only(settings, scripted_server):
    use(settings, scripted_server)
    scripted_server.script[("DATA", 2)] = "554 5.7.1 not this one"
    ids = queue(4)
    result = send_all()
    assert (result.sent, result.deferred) == (3, 1)
    deferred = Message.objects.get()
    assert deferred.priority == PRIORITY_DEFERRED
    assert "554" in MessageLog.objects.get(result=RESULT_FAILURE).log_message
    assert len(scripted_server.message_ids()) == 3
    assert set(scripted_server.message_ids()) | {deferred.email.extra_headers["Message-ID"]} == set(ids)


def test_421_mid_group_pauses_the_route_and_nothing_is_lost(settings, scripted_server, monkeypatch):
    """A 421 to a RCPT inside a group is the provider's "slow down": the
    route pauses, that message goes back on the queue without an attempt
    counted (no failure logged), and after the pause it and the rest go out
    on a new connection, each exactly once."""
    monkeypatch.setattr(quotas, "PAUSE_FIRST", 0.3)
    use(settings, scripted_server)
    scripted_server.script[("RCPT", 3)] = "421 4.3.2 shutting down"
    ids = queue(5, to=["a@example.com", "b@example.com"])
    result = send_all()
    assert result.held == 1 and (result.deferred, result.failed) == (0, 0)
    assert result.held_for is not None
    assert not MessageLog.objects.filter(result=RESULT_FAILURE).exists()
    assert not Message.objects.filter(retry_count__gt=0).exists()
    assert Message.objects.non_deferred().count() == 5 - len(scripted_server.message_ids())
    time.sleep(0.5)
    assert send_all().held == 0
    assert scripted_server.connections >= 2
    assert sorted(scripted_server.message_ids()) == sorted(ids)  # each exactly once


def test_connection_closed_after_the_last_group(settings, scripted_server):
    """The server closes instead of answering the end of message 3's data,
    with message 4's envelope behind it: message 3 was not accepted, it is
    deferred and goes out later with the same Message-ID; message 4 never
    got past its envelope and goes out at once on a new connection."""
    use(settings, scripted_server)
    scripted_server.end_delay = 0.05
    scripted_server.script[(".", 3)] = "CLOSE"
    ids = queue(6)
    result = send_all()
    assert result.sent + result.deferred == 6 and result.deferred == 1
    failed = MessageLog.objects.get(result=RESULT_FAILURE)
    assert failed.message_id in ids
    assert sorted(scripted_server.message_ids() + [failed.message_id]) == sorted(ids)
    # A later pass after retry_deferred: the same Message-ID, once.
    Message.objects.retry_deferred()
    assert send_all().sent == 1
    arrived = scripted_server.message_ids()
    assert sorted(arrived) == sorted(ids)  # each exactly once


def test_stored_attachments_stream_through_the_pipeline(settings, scripted_server, attachment_storage):
    use(settings, scripted_server)
    content = os.urandom(200_000)
    for i in range(3):
        message = EmailMessage(f"A{i}", "see attached", "from@example.com", ["to@example.com"],
                               headers={"Message-ID": f"<att{i}@example.com>"})
        message.attach("data.bin", content, "application/octet-stream")
        queue_emails([message])
    assert Message.objects.filter(attachment_bundle__gt="").count() == 3
    assert send_all().sent == 3
    assert ["MAIL", "RCPT", "DATA"] in verbs(scripted_server)
    for received in scripted_server.messages:
        parsed = email.message_from_bytes(received["data"], policy=email.policy.default)
        [part] = list(parsed.iter_attachments())
        assert part.get_content() == content


# --- a deadline on every exchange (issue #30) -----------------------------------------


def test_a_greeting_that_never_ends_does_not_hold_send_all(settings, scripted_server):
    """220- lines every half second: each read is quick, the greeting never
    ends. Before, send_all waited for ever."""
    use(settings, scripted_server, timeout=1)
    scripted_server.endless_greeting = True
    queue(2)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(send_all()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(15)
    alive = thread.is_alive()
    scripted_server.close()  # lets a stuck pass end either way
    assert not alive, "send_all still waiting for the greeting after 15 s"
    assert time.monotonic() - start < 8
    result = outcome[0]
    assert result.timed_out and result.sent == 0
    assert Message.objects.count() == 2  # deferred or still queued, never lost


def test_runmailer_honours_sigterm_during_an_endless_greeting(manage, scripted_server):
    scripted_server.endless_greeting = True
    mailer.send_mail("S", "B", "from@example.com", ["to@example.com"])
    manage.env.update(MAILER_TEST_SMTP_PORT=str(scripted_server.port), MAILER_TEST_EMAIL_TIMEOUT="2")
    proc = manage.popen("runmailer")
    try:
        deadline = time.monotonic() + 20
        while scripted_server.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scripted_server.connections >= 1, "the worker never connected"
        time.sleep(0.5)  # well inside the greeting
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        proc.wait(timeout=20)
        assert time.monotonic() - sent_at < 8  # the timeout (2 s), and start-up slack
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert Message.objects.count() == 1


@pytest.mark.django_db(transaction=False)
def test_a_pass_inside_a_transaction_groups_but_works_alone(settings, scripted_server):
    """A TestCase, or send_all() in an atomic block: a second thread would
    not see the uncommitted queue, so the lane works alone (still grouped)."""
    use(settings, scripted_server)
    ids = queue(5)
    result = send_all()
    assert (result.sent, result.deferred, result.failed) == (5, 0, 0)
    assert sorted(scripted_server.message_ids()) == sorted(ids)
    groups = verbs(scripted_server)
    assert ["MAIL", "RCPT", "DATA"] in groups
    assert [".", "MAIL", "RCPT", "DATA"] not in groups
    assert not Message.objects.exists()
