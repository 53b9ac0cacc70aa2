"""The admin, driven through the test client as a logged-in superuser."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.contrib.messages import get_messages
from django.core.mail import EmailMultiAlternatives
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.html import escape

from mailer.admin import HTML_PREVIEW_CSP, MessageAdmin, MessageLogAdmin
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    DontSendEntry,
    Message,
    MessageLog,
    db_to_email,
    queue_emails,
)

pytestmark = pytest.mark.django_db

GARBAGE = "this is !!! not base64, nor a pickle"
XSS = '<script>alert("pwned")</script>'

MESSAGE_LIST = reverse("admin:mailer_message_changelist")
LOG_LIST = reverse("admin:mailer_messagelog_changelist")
DONT_SEND_LIST = reverse("admin:mailer_dontsendentry_changelist")


def queue(
    subject="Hello",
    to=("alice@example.com",),
    body="Plain body",
    html=None,
    priority=PRIORITY_MEDIUM,
    **kwargs,
) -> Message:
    email = EmailMultiAlternatives(subject, body, "sender@example.com", list(to), **kwargs)
    if html is not None:
        email.attach_alternative(html, "text/html")
    assert queue_emails([email], priority=priority) == 1
    return Message.objects.latest("id")


def log_of(message: Message, result=RESULT_SUCCESS, text="", **kwargs) -> MessageLog:
    return MessageLog.objects.log(message, result, text, **kwargs)


def change_url(obj) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])


def page_text(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def user_messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def run_action(client, url, action, objs, **extra):
    data = {"action": action, "_selected_action": [o.pk for o in objs], **extra}
    return client.post(url, data, follow=True)


class IframeFinder(HTMLParser):
    """Collect the attributes of every <iframe> (values unescaped)."""

    def __init__(self):
        super().__init__()
        self.iframes: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "iframe":
            self.iframes.append(dict(attrs))


def iframes(html: str) -> list[dict]:
    finder = IframeFinder()
    finder.feed(html)
    return finder.iframes


# --- Message changelist -----------------------------------------------------------------


def test_message_changelist_shows_the_denormalised_columns(admin_client):
    msg = queue(
        "Quarterly report", to=["alice@example.com", "bob@example.com"], cc=["carol@example.com"]
    )
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "Quarterly report" in text
    assert "alice@example.com, bob@example.com, carol@example.com" in text
    assert msg.message_id and msg.message_id.strip("<>") in text
    assert "medium" in text
    assert change_url(msg) in text


def test_message_changelist_truncates_long_recipient_lists(admin_client):
    queue(to=[f"user{i}@example.com" for i in range(10)])
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "user0@example.com, user1@example.com, user2@example.com (+7 more)" in text
    assert "user9@example.com" not in text


@pytest.mark.parametrize(
    "query", ["bob@example", "BOB@EXAMPLE.COM", "Invoice 42", "carol@example.com", "message-id"]
)
def test_message_search(admin_client, query):
    wanted = queue("Invoice 42", to=["bob@example.com"], bcc=["carol@example.com"])
    other = queue("Newsletter", to=["dave@example.com"])
    if query == "message-id":
        query = wanted.message_id
    text = page_text(admin_client.get(MESSAGE_LIST, {"q": query}))
    assert change_url(wanted) in text
    assert change_url(other) not in text


def test_message_search_by_message_id_without_brackets(admin_client):
    wanted = queue("One")
    other = queue("Two")
    text = page_text(admin_client.get(MESSAGE_LIST, {"q": wanted.message_id.strip("<>")}))
    assert change_url(wanted) in text
    assert change_url(other) not in text


def test_message_filter_by_priority(admin_client):
    high = queue("urgent", priority=PRIORITY_HIGH)
    low = queue("whenever", priority=PRIORITY_LOW)
    deferred = queue("stuck", priority=PRIORITY_DEFERRED)
    text = page_text(admin_client.get(MESSAGE_LIST, {"priority": str(PRIORITY_DEFERRED)}))
    assert change_url(deferred) in text
    assert change_url(high) not in text and change_url(low) not in text
    text = page_text(admin_client.get(MESSAGE_LIST, {"priority": str(PRIORITY_HIGH)}))
    assert change_url(high) in text and change_url(deferred) not in text
    # The 2.3.2 admin's field filter URLs still work.
    text = page_text(admin_client.get(MESSAGE_LIST, {"priority__exact": str(PRIORITY_LOW)}))
    assert change_url(low) in text and change_url(high) not in text


def test_message_date_hierarchy(admin_client):
    old = queue("old")
    Message.objects.filter(pk=old.pk).update(when_added=timezone.now() - timedelta(days=800))
    new = queue("new")
    year = timezone.now().year
    text = page_text(admin_client.get(MESSAGE_LIST, {"when_added__year": str(year)}))
    assert change_url(new) in text and change_url(old) not in text
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "toplinks" in text  # the date hierarchy's links


def test_message_add_and_edit_are_not_offered(admin_client):
    msg = queue()
    assert admin_client.get(reverse("admin:mailer_message_add")).status_code == 403
    text = page_text(admin_client.get(change_url(msg)))
    assert 'name="_save"' not in text
    response = admin_client.post(change_url(msg), {"priority": PRIORITY_LOW})
    assert response.status_code == 403
    msg.refresh_from_db()
    assert msg.priority == PRIORITY_MEDIUM


# --- Message actions --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_send_messages_action_sends_the_selected_messages(admin_client, smtp_settings, smtp_server):
    chosen = queue("send me", to=["alice@example.com"])
    left = queue("not me", to=["bob@example.com"])
    response = run_action(admin_client, MESSAGE_LIST, "send_messages", [chosen])
    notes = user_messages(response)
    assert any("1 sent" in n and "0 deferred" in n and "0 failed" in n for n in notes), notes
    assert smtp_server.subjects() == ["send me"]
    assert smtp_server.message_ids() == [chosen.message_id]
    assert not Message.objects.filter(pk=chosen.pk).exists()
    assert Message.objects.filter(pk=left.pk).exists()
    entry = MessageLog.objects.get(message_id=chosen.message_id)
    assert entry.result == RESULT_SUCCESS


@pytest.mark.django_db(transaction=True)
def test_send_messages_reports_deferred_and_failures(admin_client, smtp_settings, smtp_server):
    stuck = queue("stuck", priority=PRIORITY_DEFERRED)
    refused = queue("refused")
    smtp_server.fail_with = "554 no thanks"
    response = run_action(admin_client, MESSAGE_LIST, "send_messages", [stuck, refused])
    notes = user_messages(response)
    assert any("0 sent" in n and "1 deferred" in n for n in notes), notes
    assert any("1 selected message is deferred and was not sent" in n for n in notes), notes
    assert Message.objects.get(pk=refused.pk).priority == PRIORITY_DEFERRED
    assert Message.objects.get(pk=stuck.pk).priority == PRIORITY_DEFERRED


@pytest.mark.django_db(transaction=True)
def test_send_messages_against_a_silent_server_returns(admin_client, settings, smtp_settings,
                                                       silent_server):
    """A provider that never answers can't hold the web request past the SMTP timeout."""
    import time

    if hasattr(settings, "MAILER_USING"):
        from tests.settings import smtp_mailers

        settings.MAILERS = smtp_mailers(silent_server.port, timeout=1)
    else:
        settings.EMAIL_PORT = silent_server.port
        settings.EMAIL_TIMEOUT = 1
    msgs = [queue(f"to a silent server {i}") for i in range(3)]
    started = time.monotonic()
    response = run_action(admin_client, MESSAGE_LIST, "send_messages", msgs)
    assert time.monotonic() - started < 10  # one timeout, not one per message
    notes = user_messages(response)
    assert any("1 deferred" in n for n in notes), notes
    assert Message.objects.count() == 3


def test_send_messages_reports_a_held_lock(admin_client, settings):
    """Another worker (here: another thread) holds the send lock."""
    import threading

    from mailer import engine

    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    msg = queue()
    held, done = threading.Event(), threading.Event()

    def holder():
        acquired, lock = engine.acquire_lock()
        assert acquired
        held.set()
        done.wait(10)
        engine.release_lock(lock)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        response = run_action(admin_client, MESSAGE_LIST, "send_messages", [msg])
    finally:
        done.set()
        thread.join()
    assert any("another worker is sending" in n for n in user_messages(response))
    assert Message.objects.filter(pk=msg.pk).exists()


def test_send_messages_reports_a_misconfiguration_instead_of_failing(admin_client, settings):
    settings.MAILER_EMAIL_BACKEND = "mailer.backend.DbBackend"  # would loop forever
    msg = queue()
    response = run_action(admin_client, MESSAGE_LIST, "send_messages", [msg])
    assert response.status_code == 200
    assert any("Sending stopped with an error" in n for n in user_messages(response))
    assert Message.objects.filter(pk=msg.pk).exists()


def test_retry_action_undefers_the_selected_deferred_messages(admin_client, settings):
    settings.MAILER_EMAIL_MAX_RETRIES = 0  # limits retry_deferred, not the operator
    one = queue("one", priority=PRIORITY_DEFERRED)
    two = queue("two", priority=PRIORITY_DEFERRED)
    Message.objects.filter(pk=two.pk).update(retry_count=3)
    queued = queue("queued", priority=PRIORITY_HIGH)
    untouched = queue("not selected", priority=PRIORITY_DEFERRED)
    response = run_action(admin_client, MESSAGE_LIST, "retry", [one, two, queued])
    notes = user_messages(response)
    assert "2 deferred messages were put back on the queue." in notes
    assert "1 selected message was not deferred and was left as it was." in notes
    rows = {m.pk: m for m in Message.objects.all()}
    assert (rows[one.pk].priority, rows[one.pk].retry_count) == (PRIORITY_MEDIUM, 1)
    assert (rows[two.pk].priority, rows[two.pk].retry_count) == (PRIORITY_MEDIUM, 4)
    assert (rows[queued.pk].priority, rows[queued.pk].retry_count) == (PRIORITY_HIGH, 0)
    assert rows[untouched.pk].priority == PRIORITY_DEFERRED


def test_delete_action(admin_client):
    doomed = queue("doomed")
    kept = queue("kept")
    undecodable = Message.objects.create(message_data=GARBAGE)
    confirm = admin_client.post(
        MESSAGE_LIST, {"action": "delete_selected", "_selected_action": [doomed.pk, undecodable.pk]}
    )
    assert confirm.status_code == 200
    response = run_action(
        admin_client, MESSAGE_LIST, "delete_selected", [doomed, undecodable], post="yes"
    )
    assert any("Successfully deleted 2" in n for n in user_messages(response))
    assert list(Message.objects.values_list("pk", flat=True)) == [kept.pk]


def test_actions_need_permissions(client, django_user_model):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_message"),
        Permission.objects.get(codename="view_messagelog"),
    )
    client.force_login(viewer)
    text = page_text(client.get(MESSAGE_LIST))
    assert 'value="send_messages"' not in text and 'value="retry"' not in text
    text = page_text(client.get(LOG_LIST))
    assert 'value="requeue"' not in text
    msg = queue(priority=PRIORITY_DEFERRED)
    run_action(client, MESSAGE_LIST, "retry", [msg])
    assert Message.objects.get(pk=msg.pk).priority == PRIORITY_DEFERRED


# --- Message detail ----------------------------------------------------------------------


def test_message_detail_shows_headers_bodies_and_attachments(admin_client):
    msg = queue(
        "Your <order>",
        to=["alice@example.com"],
        cc=["carol@example.com"],
        bcc=["audit@example.com"],
        reply_to=["help@example.com"],
        headers={"X-Campaign": "spring & summer"},
        body="Hi <b>Alice</b>,\nthanks.",
        html=f'<p style="color:red">Hi <b>Alice</b></p>{XSS}<img src="https://tracker.example/p.gif">',
    )
    email = msg.email
    email.attach("invoice.pdf", b"%PDF-" + b"x" * 2043, "application/pdf")
    email.attach("notes.txt", "some notes", "text/plain")
    msg.email = email
    msg.save()

    text = page_text(admin_client.get(change_url(msg)))
    for value in (
        "sender@example.com",
        "alice@example.com",
        "carol@example.com",
        "audit@example.com",
        "help@example.com",
        "Your &lt;order&gt;",
        msg.message_id.replace("<", "&lt;").replace(">", "&gt;"),
        "X-Campaign",
        "spring &amp; summer",
        "Hi &lt;b&gt;Alice&lt;/b&gt;,\nthanks.",
        "invoice.pdf",
        "application/pdf",
        "2.0\xa0KB",
        "notes.txt",
        "text/plain",
        "10\xa0bytes",
    ):
        assert value in text, value

    # The HTML only ever appears escaped, inside the sandboxed srcdoc.
    assert XSS not in text
    assert text.count("&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;") == 1
    frames = iframes(text)
    assert len(frames) == 1
    frame = frames[0]
    assert frame["sandbox"] == ""
    srcdoc = frame["srcdoc"]
    assert srcdoc.startswith(
        f'<meta http-equiv="Content-Security-Policy" content="{HTML_PREVIEW_CSP}">'
    )
    assert XSS in srcdoc
    assert '<p style="color:red">Hi <b>Alice</b></p>' in srcdoc
    assert "default-src 'none'" in HTML_PREVIEW_CSP and "img-src data:" in HTML_PREVIEW_CSP
    assert "style-src 'unsafe-inline'" in HTML_PREVIEW_CSP


def test_html_cannot_break_out_of_the_srcdoc_attribute(admin_client):
    nasty = '"><script>alert(1)</script><iframe src="https://evil.example"></iframe>\'>'
    msg = queue(html=nasty)
    text = page_text(admin_client.get(change_url(msg)))
    assert "<script>alert(1)</script>" not in text
    frames = iframes(text)
    assert len(frames) == 1
    assert frames[0]["srcdoc"].endswith(nasty)


def test_message_detail_html_only_body(admin_client):
    email = EmailMultiAlternatives(
        "html only", f"<h1>Title</h1>{XSS}", "s@example.com", ["a@example.com"]
    )
    email.content_subtype = "html"
    queue_emails([email])
    msg = Message.objects.latest("id")
    text = page_text(admin_client.get(change_url(msg)))
    assert "The body is HTML" in text
    assert XSS not in text
    assert XSS in iframes(text)[0]["srcdoc"]


@pytest.mark.parametrize("data", [GARBAGE, "", "aGVsbG8=\n"])
def test_message_detail_of_undecodable_data(admin_client, data):
    msg = Message.objects.create(message_data=data)
    text = page_text(admin_client.get(change_url(msg)))
    assert "undecodable message data" in text or "no message data" in text
    list_text = page_text(admin_client.get(MESSAGE_LIST))
    assert change_url(msg) in list_text


def test_undecodable_rows_in_the_list_keep_their_denormalised_data(admin_client):
    msg = queue("Still findable", to=["zed@example.com"])
    Message.objects.filter(pk=msg.pk).update(message_data=GARBAGE)
    text = page_text(admin_client.get(MESSAGE_LIST, {"q": "zed@example.com"}))
    assert "Still findable" in text and change_url(msg) in text
    text = page_text(admin_client.get(change_url(msg)))
    assert "undecodable message data" in text
    assert "zed@example.com" in text  # from the denormalised recipients


PICKLES = Path(__file__).parent / "fixtures" / "pickles"
PICKLE_CASES = [
    (version, name, entry)
    for version in ("django42", "django52")
    for name, entry in json.loads((PICKLES / version / "manifest.json").read_text())[
        "files"
    ].items()
]


@pytest.mark.parametrize(
    "version, name, entry", PICKLE_CASES, ids=[f"{v}-{n}" for v, n, _ in PICKLE_CASES]
)
def test_detail_pages_of_stored_pickles(admin_client, version, name, entry):
    """Messages pickled by other Django versions (and 2.3.2's raw form) render."""
    data = (PICKLES / version / entry["file"]).read_text()
    msg = Message.objects.create(message_data=data)
    entry_log = MessageLog.objects.log(msg, RESULT_SUCCESS)
    for obj in (msg, entry_log):
        text = page_text(admin_client.get(change_url(obj)))
        assert "could not be displayed" not in text
        if db_to_email(data) is None:  # e.g. a 5.2 pickle read by Django 4.2
            assert "undecodable message data" in text
            continue
        assert escape(entry["subject"]) in text
        for attachment in entry["attachments"]:
            assert escape(attachment["filename"]) in text
        if entry["alternatives"] or entry["instance_overrides"].get("content_subtype") == "html":
            assert len(iframes(text)) == 1


# --- MessageLog --------------------------------------------------------------------------


def test_messagelog_changelist_filters_and_search(admin_client):
    ok = log_of(queue("Welcome", to=["new@example.com"]))
    failed = log_of(
        queue("Reset password", to=["lost@example.com"]),
        RESULT_FAILURE,
        "550 mailbox unavailable " * 10,
    )
    blocked = log_of(queue("Promo", to=["nope@example.com"]), RESULT_DONT_SEND)

    text = page_text(admin_client.get(LOG_LIST))
    for entry in (ok, failed, blocked):
        assert change_url(entry) in text
    assert (
        "Welcome" in text
        and "new@example.com" in text
        and ok.message_id in text.replace("&lt;", "<").replace("&gt;", ">")
    )
    assert "success" in text and "failure" in text and "don&#x27;t send" in text
    assert "550 mailbox unavailable 550 mailbox" in text
    assert ("550 mailbox unavailable " * 10).strip() not in text  # truncated in the list

    text = page_text(admin_client.get(LOG_LIST, {"result": RESULT_FAILURE}))
    assert change_url(failed) in text and change_url(ok) not in text
    text = page_text(admin_client.get(LOG_LIST, {"result__exact": RESULT_SUCCESS}))
    assert change_url(ok) in text and change_url(failed) not in text

    for query in (failed.message_id, "lost@example", "reset password"):
        text = page_text(admin_client.get(LOG_LIST, {"q": query}))
        assert change_url(failed) in text and change_url(ok) not in text, query


def test_messagelog_date_filter(admin_client):
    old = log_of(queue("old"))
    MessageLog.objects.filter(pk=old.pk).update(when_attempted=timezone.now() - timedelta(days=60))
    new = log_of(queue("new"))
    now = timezone.now()
    text = page_text(
        admin_client.get(
            LOG_LIST,
            {
                "when_attempted__gte": str(now - timedelta(days=7)),
                "when_attempted__lt": str(now + timedelta(days=1)),
            },
        )
    )
    assert change_url(new) in text and change_url(old) not in text


def test_messagelog_detail(admin_client):
    msg = queue("Logged", to=["alice@example.com"], body="Body <text>", html=f"<p>hi</p>{XSS}")
    entry = log_of(msg, RESULT_FAILURE, "Traceback: <boom>")
    text = page_text(admin_client.get(change_url(entry)))
    assert "Body &lt;text&gt;" in text
    assert "Traceback: &lt;boom&gt;" in text
    assert "failure" in text
    assert entry.message_id.replace("<", "&lt;").replace(">", "&gt;") in text
    assert XSS not in text
    assert XSS in iframes(text)[0]["srcdoc"]
    assert 'name="_save"' not in text


def test_messagelog_detail_without_data_and_with_garbage(admin_client):
    kept_none = log_of(queue("Secret", to=["alice@example.com"]), keep_data=False)
    garbage = log_of(queue("Broken", to=["bob@example.com"]))
    MessageLog.objects.filter(pk=garbage.pk).update(message_data=GARBAGE)

    text = page_text(admin_client.get(change_url(kept_none)))
    assert "message content not kept" in text
    assert "alice@example.com" in text and kept_none.message_id.strip("<>") in text

    text = page_text(admin_client.get(change_url(garbage)))
    assert "undecodable message data" in text
    assert "bob@example.com" in text

    text = page_text(admin_client.get(LOG_LIST))
    assert "Secret" in text and "Broken" in text


def test_requeue_action(admin_client):
    sent = queue("Sent once", to=["alice@example.com"], priority=PRIORITY_HIGH, html="<p>x</p>")
    sent_log = log_of(sent, RESULT_SUCCESS)
    stuck = queue("Failed", to=["bob@example.com"])
    stuck.defer()
    stuck_log = log_of(stuck, RESULT_FAILURE, "451 later")
    no_data = log_of(queue("No data"), keep_data=False)
    garbage = log_of(queue("Garbage"))
    MessageLog.objects.filter(pk=garbage.pk).update(message_data=GARBAGE)
    blocked = log_of(queue("Blocked", to=["blocked@example.com"]))
    DontSendEntry.objects.create(to_address="BLOCKED@example.com")
    Message.objects.all().delete()

    response = run_action(
        admin_client, LOG_LIST, "requeue", [sent_log, stuck_log, no_data, garbage, blocked]
    )
    notes = user_messages(response)
    assert "2 messages were put back on the queue." in notes
    assert any("1 message can't be requeued: its content was not kept" in n for n in notes), notes
    assert any("1 message can't be requeued: its stored data can't be decoded" in n for n in notes)
    assert any(
        "1 message was not requeued: all its recipients are on the don't-send list" in n
        for n in notes
    )

    requeued = {m.message_id: m for m in Message.objects.all()}
    assert set(requeued) == {sent_log.message_id, stuck_log.message_id}
    again = requeued[sent_log.message_id]
    assert again.priority == PRIORITY_HIGH
    assert again.subject_text == "Sent once" and again.recipients == "alice@example.com"
    assert again.email.alternatives[0][0] == "<p>x</p>"
    assert requeued[stuck_log.message_id].priority == PRIORITY_MEDIUM  # logged while deferred
    # The log entries themselves stay.
    assert MessageLog.objects.filter(pk=sent_log.pk).exists()


def test_requeue_keeps_the_logged_message_id_of_a_legacy_row(admin_client):
    """A 2.3.2 row had no Message-ID until the worker gave it one at send time."""
    from mailer.models import email_to_db

    email = EmailMultiAlternatives("legacy", "body", "s@example.com", ["a@example.com"])
    entry = MessageLog.objects.create(
        message_data=email_to_db(email),
        message_id="<legacy.1@example.com>",
        when_added=timezone.now(),
        priority=PRIORITY_MEDIUM,
        result=RESULT_SUCCESS,
        log_message="",
    )
    run_action(admin_client, LOG_LIST, "requeue", [entry])
    msg = Message.objects.get()
    assert msg.message_id == "<legacy.1@example.com>"
    assert msg.email.extra_headers["Message-ID"] == "<legacy.1@example.com>"


def test_messagelog_cannot_be_added_or_changed(admin_client):
    entry = log_of(queue())
    assert admin_client.get(reverse("admin:mailer_messagelog_add")).status_code == 403
    assert admin_client.post(change_url(entry), {"result": RESULT_FAILURE}).status_code == 403


# --- DontSendEntry ------------------------------------------------------------------------


def test_dont_send_admin(admin_client):
    a = DontSendEntry.objects.create(to_address="spam-trap@example.com")
    b = DontSendEntry.objects.create(to_address="bounced@example.org")
    text = page_text(admin_client.get(DONT_SEND_LIST))
    assert "spam-trap@example.com" in text and "bounced@example.org" in text
    text = page_text(admin_client.get(DONT_SEND_LIST, {"q": "example.org"}))
    assert change_url(b) in text and change_url(a) not in text
    response = admin_client.post(
        reverse("admin:mailer_dontsendentry_add"),
        {"to_address": "new@example.net", "when_added_0": "2024-01-01", "when_added_1": "10:00:00"},
    )
    assert response.status_code == 302
    assert DontSendEntry.objects.has_address("NEW@example.net")


# --- large tables --------------------------------------------------------------------------

N_ROWS = 3000


def _bulk_messages(n: int) -> None:
    now = timezone.now()
    Message.objects.bulk_create(
        [
            Message(
                message_data=GARBAGE,  # any unpickling would show as a placeholder
                when_added=now - timedelta(seconds=i),
                priority=PRIORITY_DEFERRED if i % 10 == 0 else PRIORITY_MEDIUM,
                recipients=f"user{i}@example.com\ncc{i}@example.com",
                subject_text=f"Subject number {i}",
                message_id=f"<bulk.{i}@example.com>",
            )
            for i in range(n)
        ],
        batch_size=500,
    )


def _bulk_logs(n: int) -> None:
    now = timezone.now()
    MessageLog.objects.bulk_create(
        [
            MessageLog(
                message_data=GARBAGE,
                when_added=now - timedelta(seconds=i),
                priority=PRIORITY_MEDIUM,
                when_attempted=now - timedelta(seconds=i),
                result=RESULT_FAILURE if i % 7 == 0 else RESULT_SUCCESS,
                log_message="" if i % 7 else "421 try again later",
                recipients=f"user{i}@example.com",
                subject_text=f"Logged subject {i}",
                message_id=f"<log.{i}@example.com>",
            )
            for i in range(n)
        ],
        batch_size=500,
    )


def _assert_lean(queries: CaptureQueriesContext) -> None:
    for query in queries.captured_queries:
        sql = query["sql"]
        assert "message_data" not in sql, sql
        if "COUNT(" in sql.upper():
            # Never an unbounded count: capped with LIMIT, or (the overview's
            # chart) a range of the last 48 hours of the outcomes index.
            where = sql.split("WHERE", 1)[-1]
            chart = "mailer_messagelog" in sql and "when_attempted" in where and "GROUP BY" in sql
            assert "LIMIT" in sql.upper() or chart, sql


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": "user1234@example.com"},
        {"priority": str(PRIORITY_DEFERRED)},
        {"p": "3"},
        {"o": "-5"},
    ],
)
def test_large_message_changelist_is_lean(admin_client, django_assert_max_num_queries, params):
    _bulk_messages(N_ROWS)
    with CaptureQueriesContext(connection) as queries:
        # 2 auth + count + rows + 2 date hierarchy + last errors + 3 overview
        # (its counts, its chart, the routes held by a quota or a pause)
        with django_assert_max_num_queries(10):
            text = page_text(admin_client.get(MESSAGE_LIST, params))
    _assert_lean(queries)
    assert "undecodable" not in text
    if params.get("q"):
        assert "Subject number 1234" in text and "user1234@example.com, cc1234@example.com" in text
    elif not params:
        newest = N_ROWS - 1  # the list is newest first
        assert f"Subject number {newest}" in text and f"&lt;bulk.{newest}@example.com&gt;" in text
        assert text.count('name="_selected_action"') == MessageAdmin.list_per_page


@pytest.mark.parametrize(
    "params", [{}, {"q": "<log.77@example.com>"}, {"result": RESULT_FAILURE}, {"p": "2"}]
)
def test_large_messagelog_changelist_is_lean(admin_client, django_assert_max_num_queries, params):
    _bulk_logs(N_ROWS)
    with CaptureQueriesContext(connection) as queries:
        with django_assert_max_num_queries(4):  # 2 auth + count + rows
            text = page_text(admin_client.get(LOG_LIST, params))
    _assert_lean(queries)
    assert "undecodable" not in text
    if params.get("q"):
        assert "Logged subject 77" in text and "421 try again later" in text


def test_count_stops_at_the_cap(admin_client, monkeypatch):
    monkeypatch.setattr(MessageLogAdmin, "count_cap", 1000)
    _bulk_logs(N_ROWS)
    with CaptureQueriesContext(connection) as queries:
        text = page_text(admin_client.get(LOG_LIST, {"result": RESULT_SUCCESS}))
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert len(counts) == 1 and "1001" in counts[0], counts
    assert "Count: more than 1000 (" in text
    # Pages past the counted ones still work: nobody is stuck at the cap.
    text = page_text(admin_client.get(LOG_LIST, {"result": RESULT_SUCCESS, "p": "25"}))
    assert text.count('name="_selected_action"') == 100
    text = page_text(admin_client.get(LOG_LIST, {"result": RESULT_SUCCESS, "p": "2500"}))
    assert 'name="_selected_action"' not in text
    # Below the cap the count is exact and nothing is said.
    text = page_text(admin_client.get(LOG_LIST, {"result": RESULT_FAILURE}))
    assert "Count:" not in text and "429 message logs" in text


@pytest.mark.postgres
def test_unfiltered_count_uses_the_planner_estimate_on_postgres(admin_client, monkeypatch):
    monkeypatch.setattr(MessageLogAdmin, "count_cap", 1000)
    _bulk_logs(N_ROWS)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE mailer_messagelog")
    text = page_text(admin_client.get(LOG_LIST))
    match = re.search(r"Count: about (\d+) ", text)
    assert match, text
    assert abs(int(match.group(1)) - N_ROWS) < N_ROWS * 0.2


# --- translations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "language, expected",
    [
        ("ja", ["メッセージ", "選択したメッセージを今すぐ送信", "再試行回数", "受信者"]),
        (
            "ru",
            [
                "Сообщения",
                "Отправить выбранные сообщения сейчас",
                "Число повторных попыток",
                "Получатели",
            ],
        ),
    ],
)
def test_admin_is_translated(admin_client, language, expected):
    msg = queue("Translated", priority=PRIORITY_DEFERRED)
    with translation.override(language):
        text = page_text(admin_client.get(MESSAGE_LIST))
        for value in expected:
            assert value in text, (language, value)
        detail = page_text(admin_client.get(change_url(msg)))
        log_list = page_text(admin_client.get(LOG_LIST))
        add_form = page_text(admin_client.get(reverse("admin:mailer_dontsendentry_add")))
        response = run_action(admin_client, MESSAGE_LIST, "retry", [msg])
        notes = user_messages(response)
    assert notes and "put back on the queue" not in " ".join(notes)
    assert "Message-ID" in detail
    headers = {"ja": "ヘッダー", "ru": "Заголовки"}[language]
    assert headers in detail and "Headers" not in detail
    when_attempted = {"ja": "試行日時", "ru": "время попытки"}[language]
    assert when_attempted in log_list and "when attempted" not in log_list
    address = {"ja": "アドレス", "ru": "Адрес"}[language]
    assert address in add_form and "To address" not in add_form


@pytest.mark.parametrize("language", ["ja", "ru"])
def test_model_and_label_strings_are_translated(language):
    from mailer.apps import MailerConfig
    from mailer.models import PRIORITY_LABELS, RESULT_LABELS

    strings = [MailerConfig.verbose_name, *PRIORITY_LABELS.values(), *RESULT_LABELS.values()]
    for model in (Message, MessageLog, DontSendEntry):
        strings += [model._meta.verbose_name, model._meta.verbose_name_plural]
    with translation.override("en"):
        english = [str(s) for s in strings]
    with translation.override(language):
        translated = [str(s) for s in strings]
    untranslated = [e for e, t in zip(english, translated, strict=True) if e == t]
    assert not untranslated


def _po_entries(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(msgid, msgstrs, fuzzy)`` for each entry of a .po file (enough for ours)."""

    def unquote(chunks: list[str]) -> str:
        return "".join(json.loads(chunk) for chunk in chunks)

    entries = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        fuzzy = any(line.startswith("#,") and "fuzzy" in line for line in block.splitlines())
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line.startswith('"'):
                fields[key].append(line)
            else:
                key, _, rest = line.partition(" ")
                fields[key] = [rest]
        if "msgid" not in fields:
            continue
        strs = [unquote(v) for k, v in sorted(fields.items()) if k.startswith("msgstr")]
        entries.append((unquote(fields["msgid"]), strs, fuzzy))
    return entries


@pytest.mark.parametrize("language", ["ja", "ru"])
def test_catalogues_are_complete_and_compiled(language):
    """Every string is translated, and the shipped .mo matches the .po."""
    import gettext

    import mailer

    directory = Path(mailer.__file__).parent / "locale" / language / "LC_MESSAGES"
    entries = [e for e in _po_entries(directory / "django.po") if e[0]]
    assert len(entries) > 60
    assert [msgid for msgid, strs, fuzzy in entries if fuzzy or not all(strs)] == []
    with open(directory / "django.mo", "rb") as fh:
        compiled = gettext.GNUTranslations(fh)
    for msgid, strs, _fuzzy in entries:
        if len(strs) == 1:
            assert compiled.gettext(msgid) == strs[0], msgid
        else:
            assert compiled._catalog[(msgid, 0)] == strs[0], msgid


# --- 2.3.2's public names in a project's own admin (tests/urls.py) ----------------------

PROJECT_MESSAGE_LIST = reverse("project_admin:mailer_message_changelist")
PROJECT_LOG_LIST = reverse("project_admin:mailer_messagelog_changelist")


def test_project_admin_built_on_the_old_names_passes_the_system_checks():
    from tests.urls import ProjectMessageAdmin, ProjectMessageLogAdmin, project_site

    assert ProjectMessageAdmin(Message, project_site).check() == []
    assert ProjectMessageLogAdmin(MessageLog, project_site).check() == []


def test_show_to_and_show_subject():
    from mailer.admin import show_subject, show_to

    msg = queue("Old columns", to=["a@example.com", "b@example.com"], bcc=["c@example.com"])
    assert show_to(msg) == "a@example.com, b@example.com"
    assert show_subject(msg) == "Old columns"
    entry = log_of(msg)
    assert (show_to(entry), show_subject(entry)) == ("a@example.com, b@example.com", "Old columns")
    bcc_only = queue("Bcc only", to=[], bcc=["hidden@example.com"])
    assert show_to(bcc_only) == "hidden@example.com"
    not_kept = log_of(msg, keep_data=False)
    broken = Message(message_data=GARBAGE)
    for obj in (not_kept, broken):
        assert (show_to(obj), show_subject(obj)) == ("", "")
    assert str(show_to.short_description) == "To"
    assert str(show_subject.short_description) == "Subject"


def test_project_changelists_use_the_old_columns(admin_client):
    msg = queue("Listed the old way", to=["old@example.com"])
    log_of(msg)
    Message.objects.create(message_data=GARBAGE)
    text = page_text(admin_client.get(PROJECT_MESSAGE_LIST))
    assert "Listed the old way" in text and "old@example.com" in text
    text = page_text(admin_client.get(PROJECT_LOG_LIST))
    assert "Listed the old way" in text and "old@example.com" in text


def test_plain_text_body_of_the_mixin(admin_client):
    from mailer.admin import MessageAdminMixin

    mixin = MessageAdminMixin()
    msg = queue("Body", body="line one\nline <two>")
    entry = log_of(msg)
    assert mixin.plain_text_body(msg) == "line one\nline <two>"
    assert mixin.plain_text_body(entry) == "line one\nline <two>"
    assert "undecodable" in mixin.plain_text_body(Message(message_data=GARBAGE))
    assert "not kept" in mixin.plain_text_body(log_of(msg, keep_data=False))
    url = reverse("project_admin:mailer_messagelog_change", args=[entry.pk])
    text = page_text(admin_client.get(url))
    assert "line one<br>line &lt;two&gt;" in text


@pytest.mark.django_db(transaction=True)
def test_project_action_send_messages(admin_client, smtp_settings, smtp_server):
    chosen = queue("sent from the project's admin")
    queue("left alone")
    response = run_action(admin_client, PROJECT_MESSAGE_LIST, "send_messages", [chosen])
    assert response.status_code == 200
    assert smtp_server.subjects() == ["sent from the project's admin"]
    assert not Message.objects.filter(pk=chosen.pk).exists()
    assert Message.objects.count() == 1


# --- "why wasn't this sent?" -------------------------------------------------------------


def _smtp_down(settings):
    """Point the worker at a port nothing listens on; return the port."""
    from mailer.compat import HAS_MAILERS
    from tests.conftest import free_port
    from tests.settings import smtp_mailers

    port = free_port()
    if HAS_MAILERS:
        settings.MAILERS = smtp_mailers(port)
    else:
        settings.EMAIL_PORT = port
    return port


def test_send_now_with_the_server_down_says_why(admin_client, smtp_settings, settings):
    port = _smtp_down(settings)
    msg = queue("Order #1001", to=["alice@example.com"])
    notes = user_messages(run_action(admin_client, MESSAGE_LIST, "send_messages", [msg]))
    assert any("1 deferred" in n for n in notes), notes
    (why,) = [n for n in notes if n.startswith("Not sent:")]
    assert "Order #1001" in why and "alice@example.com" in why
    assert f"Connection refused by 127.0.0.1:{port}" in why


def test_deferred_message_page_shows_last_error_and_attempts(admin_client, smtp_settings, settings):
    from mailer.engine import send_all

    msg = queue("Order #1002")
    other = queue("Someone else's")
    log_of(other, RESULT_FAILURE, "not this one")
    port = _smtp_down(settings)
    send_all()  # both deferred
    Message.objects.filter(pk=msg.pk).update(priority=PRIORITY_MEDIUM)  # as retry_deferred does
    send_all()  # deferred again: two attempts
    msg.refresh_from_db()
    text = page_text(admin_client.get(change_url(msg)))
    error = f"Connection refused by 127.0.0.1:{port}"
    assert "Delivery attempts" in text and "Last error" in text
    assert text.count(error) == 3  # last error + two rows of the history
    assert "not this one" not in text
    entries = MessageLog.objects.filter(message_id=msg.message_id)
    assert entries.count() == 2
    for entry in entries:
        assert change_url(entry) in text
    assert f"{LOG_LIST}?q={msg.message_id.replace('<', '%3C').replace('>', '%3E').replace('@', '%40')}" in text


def test_message_list_shows_the_last_error(admin_client):
    failing = queue("Failing", priority=PRIORITY_DEFERRED)
    log_of(failing, RESULT_FAILURE, "first error")
    log_of(failing, RESULT_FAILURE, "(451, b'4.3.0 later') (from smtp.example.com:587, EMAIL_HOST/EMAIL_PORT)")
    queue("Fine")
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "column-last_error_column" in text
    assert "(451, b&#x27;4.3.0 later&#x27;) (from smtp.example.com:587" in text
    assert "first error" not in text


def test_never_attempted_message_page(admin_client):
    msg = queue("Waiting")
    text = page_text(admin_client.get(change_url(msg)))
    assert "not attempted yet" in text


def test_log_list_puts_the_result_first_and_shortens_long_ids(admin_client):
    long_id = "<20260504101502.123456.98765.verylonglocalpart@mail-01.shop.example.com>"
    msg = queue("Long id", headers={"Message-ID": long_id})
    log_of(msg, RESULT_FAILURE, "refused")
    text = page_text(admin_client.get(LOG_LIST))
    start = text.index("<thead>")
    header = text[start : text.index("</thead>", start)]
    columns = re.findall(r'class="sortable column-(\w+)|class="column-(\w+)', header)
    names = [a or b for a, b in columns]
    assert names.index("result_display") < names.index("recipients_display")
    assert names.index("message_id_column") > names.index("log_message_display")
    assert f'title="{escape(long_id)}"' in text  # in full in the tooltip
    assert f">{escape(long_id)}<" not in text  # shortened in the cell


def test_detail_titles_name_what_to_whom_and_a_formatted_date(admin_client, settings):
    from django.utils.formats import date_format

    settings.TIME_ZONE = "Europe/Paris"
    msg = queue("Order #1003", to=["bob@example.com"])
    with timezone.override("Europe/Paris"):
        expected = date_format(timezone.localtime(msg.when_added), "DATETIME_FORMAT")
    text = page_text(admin_client.get(change_url(msg)))
    title = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
    assert f"Order #1003 to bob@example.com, queued {escape(expected)}" in title
    assert "+00:00" not in title and "+01:00" not in title
    entry = log_of(msg, RESULT_FAILURE, "refused")
    text = page_text(admin_client.get(change_url(entry)))
    title = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
    assert title.startswith("failure: Order #1003 to bob@example.com, ")
    assert "+00:00" not in title


def test_dont_send_entry_title_names_the_suppressed_recipients(admin_client, settings):
    from mailer.engine import send_all

    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    DontSendEntry.objects.create(to_address="eve@example.com")
    queue("Blocked", to=["eve@example.com"])
    assert send_all().dont_send == 1
    entry = MessageLog.objects.get(result=RESULT_DONT_SEND)
    text = page_text(admin_client.get(change_url(entry)))
    title = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
    assert "Blocked to eve@example.com" in title


def test_reply_to_given_through_headers_is_shown_as_the_reply_to(admin_client):
    import mailer

    mailer.send_html_mail(
        "With Reply-To", "b", "<p>b</p>", "sender@example.com", ["alice@example.com"],
        headers={"Reply-To": "support@example.com"},
    )
    msg = Message.objects.get()
    text = page_text(admin_client.get(change_url(msg)))
    reply_to = text[text.index("field-reply_to_display") :]
    reply_to = reply_to[: reply_to.index("</div>\n")]
    assert "support@example.com" in reply_to
    other = text[text.index("field-extra_headers_display") :]
    assert "<th>Reply-To</th>" not in other[: other.index("</div>\n")]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_not_executed_by_the_admin(admin_client, tmp_path):
    """Opening a row holding a code-running pickle runs nothing (mailer.storage)."""
    import base64
    import pickle

    marker = tmp_path / "pwned"
    data = base64.encodebytes(pickle.dumps(_Evil(str(marker)))).decode("ascii")
    msg = Message.objects.create(message_data=data)
    entry = MessageLog.objects.create(
        message_data=data, when_added=msg.when_added, priority=msg.priority,
        result=RESULT_FAILURE, log_message="x",
    )
    for url in (change_url(msg), change_url(entry), MESSAGE_LIST,
                LOG_LIST):
        page_text(admin_client.get(url))
        assert not marker.exists(), url
    assert "undecodable message data" in page_text(admin_client.get(change_url(msg)))
    assert not marker.exists()


# --- stored attachments (MAILER_ATTACHMENT_STORAGE) -------------------------------------------


def _stored_message(storage_content: bytes) -> Message:
    from mailer.models import queue_emails

    email = EmailMultiAlternatives("Report", "b", "from@example.com", ["to@example.com"])
    email.attach("small.txt", "tiny", "text/plain")
    email.attach("report.html", storage_content, "application/octet-stream")
    queue_emails([email])
    return Message.objects.get()


def test_detail_shows_stored_attachments_with_a_download_link(admin_client, attachment_storage):
    content = b"<script>alert(1)</script>" + b"x" * 3000
    msg = _stored_message(content)
    text = page_text(admin_client.get(change_url(msg)))
    url = reverse("admin:mailer_message_attachment", args=[msg.pk, 0])
    assert "report.html" in text and "application/octet-stream" in text and "3.0\xa0KB" in text
    assert f'href="{url}"' in text
    assert "small.txt" in text

    response = admin_client.get(url)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == content
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"].startswith("attachment;")
    assert 'filename="report.html"' in response["Content-Disposition"]
    assert admin_client.get(
        reverse("admin:mailer_message_attachment", args=[msg.pk, 1])
    ).status_code == 404

    # The log entry of the sent message shows and serves the same file.
    entry = MessageLog.objects.log(msg, RESULT_SUCCESS, keep_data=True)
    text = page_text(admin_client.get(change_url(entry)))
    log_url = reverse("admin:mailer_messagelog_attachment", args=[entry.pk, 0])
    assert f'href="{log_url}"' in text
    assert b"".join(admin_client.get(log_url).streaming_content) == content


def test_stored_attachment_download_needs_the_change_permission(
    client, django_user_model, attachment_storage
):
    from django.contrib.auth.models import Permission

    msg = _stored_message(b"y" * 3000)
    url = reverse("admin:mailer_message_attachment", args=[msg.pk, 0])
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_message"))
    client.force_login(viewer)
    text = page_text(client.get(change_url(msg)))
    assert "report.html" in text and "stored" in text and url not in text
    assert client.get(url).status_code == 403
    viewer.user_permissions.add(Permission.objects.get(codename="change_message"))
    viewer = django_user_model.objects.get(pk=viewer.pk)  # fresh permission cache
    client.force_login(viewer)
    assert f'href="{url}"' in page_text(client.get(change_url(msg)))
    assert client.get(url).status_code == 200
    client.logout()
    assert client.get(url).status_code == 302  # to the login page, not the file


# --- scheduled sending and automatic retries --------------------------------------------


def _waiting_rows():
    """A scheduled message, one waiting for its automatic retry, one for an operator, one due."""
    soon = timezone.now() + timedelta(hours=2)
    scheduled = queue("scheduled one")
    Message.objects.filter(pk=scheduled.pk).update(not_before=soon)
    retrying = queue("retrying one", priority=PRIORITY_DEFERRED)
    Message.objects.filter(pk=retrying.pk).update(not_before=soon + timedelta(minutes=5))
    operator = queue("stuck one", priority=PRIORITY_DEFERRED)
    due = queue("due one")
    return scheduled, retrying, operator, due


def test_next_attempt_column_and_filter(admin_client):
    scheduled, retrying, operator, due = _waiting_rows()
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "Next attempt" in text
    assert "(scheduled)" in text and "(automatic retry)" in text
    assert "when an operator retries it" in text
    for value, expected in [
        ("scheduled", scheduled),
        ("retrying", retrying),
        ("operator", operator),
    ]:
        text = page_text(admin_client.get(MESSAGE_LIST, {"waiting": value}))
        assert change_url(expected) in text, value
        others = {scheduled, retrying, operator, due} - {expected}
        assert not any(change_url(o) in text for o in others), value


def test_next_attempt_on_the_message_page(admin_client):
    scheduled, retrying, operator, _ = _waiting_rows()
    scheduled.refresh_from_db()
    text = page_text(admin_client.get(change_url(scheduled)))
    assert "Next attempt" in text and "(scheduled)" in text
    text = page_text(admin_client.get(change_url(operator)))
    assert "when an operator retries it" in text


def test_retry_action_sends_now_whatever_the_due_time(admin_client, smtp_settings, smtp_server):
    scheduled, retrying, operator, due = _waiting_rows()
    response = run_action(admin_client, MESSAGE_LIST, "retry", [scheduled, retrying, operator])
    notes = user_messages(response)
    assert "2 deferred messages were put back on the queue." in notes
    assert "1 scheduled message is due now instead of at its time." in notes
    assert not any("left as" in note for note in notes)
    assert list(Message.objects.values_list("not_before", flat=True)) == [None] * 4
    from mailer.engine import send_all

    assert send_all().sent == 4


def test_send_now_says_a_scheduled_message_was_not_sent(admin_client, smtp_settings, smtp_server):
    scheduled, _, _, due = _waiting_rows()
    response = run_action(admin_client, MESSAGE_LIST, "send_messages", [scheduled, due])
    notes = user_messages(response)
    assert any("1 sent" in note for note in notes)
    assert (
        "1 selected message is scheduled for later and was not sent: retry it to send it now."
        in notes
    )
    assert Message.objects.filter(pk=scheduled.pk).exists()

# --- the overview at the top of the message list ---------------------------------------------


def _overview_queries(queries: CaptureQueriesContext) -> list[str]:
    """The queue's capped state counts (one statement) and the chart's aggregate."""
    return [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith("SELECT (SELECT COUNT(*) FROM")
        or ("GROUP BY" in q["sql"] and "mailer_messagelog" in q["sql"])
    ]


def _outcome_logs(now, spec) -> None:
    """``spec``: (hours ago, result, priority, how many)."""
    rows = []
    for hours_ago, result, priority, count in spec:
        when = now - timedelta(hours=hours_ago)
        rows += [
            MessageLog(
                when_added=when,
                when_attempted=when,
                priority=priority,
                result=result,
                log_message="",
                message_id=f"<o.{hours_ago}.{result}.{i}@example.com>",
            )
            for i in range(count)
        ]
    MessageLog.objects.bulk_create(rows)


def test_overview_counts_and_chart(admin_client):
    now = timezone.now()
    queue("waiting")
    queue("also waiting", priority=PRIORITY_HIGH)
    queue("stuck", priority=PRIORITY_DEFERRED)
    later = queue("later")
    Message.objects.filter(pk=later.pk).update(not_before=now + timedelta(hours=2))
    _outcome_logs(
        now,
        [
            (0, RESULT_SUCCESS, PRIORITY_MEDIUM, 7),
            (0, RESULT_FAILURE, PRIORITY_DEFERRED, 2),
            (5, RESULT_FAILURE, PRIORITY_MEDIUM, 1),
            (47, RESULT_SUCCESS, PRIORITY_MEDIUM, 3),
            (49, RESULT_SUCCESS, PRIORITY_MEDIUM, 100),  # older than the chart
        ],
    )
    with CaptureQueriesContext(connection) as queries:
        text = page_text(admin_client.get(MESSAGE_LIST))
    states, chart = _overview_queries(queries)  # exactly these two
    assert states.count("LIMIT 10001") == 4 and "mailer_messagelog" in chart
    assert "<strong>2 queued</strong>" in text and "1 scheduled" in text
    assert f'?priority={PRIORITY_DEFERRED}">1 deferred</a>' in text
    assert "1 waiting for an operator" in text
    svg = re.search(r"<svg class=\"mailer-chart\".*?</svg>", text, re.S).group(0)
    assert "<script" not in svg and "href" not in svg
    assert svg.count('class="mailer-hour"') == 48
    assert "10 sent, 2 deferred, 1 failed." in svg  # the whole chart, in its title
    assert svg.count('class="mailer-bar-sent"') == 2
    assert svg.count('class="mailer-bar-deferred"') == 1
    assert svg.count('class="mailer-bar-failed"') == 1
    assert ": 7 sent, 2 deferred, 0 failed</title>" in svg
    # Only the message list has it.
    assert "mailer-chart" not in page_text(admin_client.get(LOG_LIST))


def test_overview_is_escaped_and_empty_safe(admin_client):
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "<strong>0 queued</strong>" in text
    assert "0 sent, 0 deferred, 0 failed." in text


def test_overview_costs_no_query_on_an_action_redirect(admin_client, django_assert_max_num_queries):
    msg = queue("Retry me", priority=PRIORITY_DEFERRED)
    with CaptureQueriesContext(connection) as queries:
        admin_client.post(MESSAGE_LIST, {"action": "retry", "_selected_action": [msg.pk]})
    assert _overview_queries(queries) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_overview_on_a_log_of_a_million_rows_is_one_indexed_aggregate(admin_user, client):
    """1M log rows over ~23 days: the chart is one GROUP BY over the outcomes index."""
    import time

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO mailer_messagelog (message_data, message_id, when_added, priority, "
            "when_attempted, result, log_message, recipients, subject_text) "
            "SELECT NULL, '<' || i || '@bulk.example.com>', now() - i * interval '2 seconds', "
            "CASE WHEN i % 50 = 0 THEN 4 ELSE 2 END, now() - i * interval '2 seconds', "
            "CASE WHEN i % 50 = 0 OR i % 997 = 0 THEN '3' WHEN i % 499 = 0 THEN '2' ELSE '1' END, "
            "'', 'user@example.com', 'bulk' FROM generate_series(1, 1000000) AS i"
        )
        cursor.execute("VACUUM ANALYZE mailer_messagelog")
    client.force_login(admin_user)
    started = time.monotonic()
    with CaptureQueriesContext(connection) as queries:
        text = page_text(client.get(MESSAGE_LIST))
    seconds = time.monotonic() - started
    assert len(queries.captured_queries) <= 9, [q["sql"] for q in queries.captured_queries]
    log_queries = [q["sql"] for q in queries.captured_queries if "mailer_messagelog" in q["sql"]]
    chart = [sql for sql in log_queries if "GROUP BY" in sql.upper()]
    assert len(chart) == 1, log_queries
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + chart[0])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "mailer_log_outcomes" in plan, plan
    assert "Seq Scan on mailer_messagelog" not in plan, plan
    # One row every 2 seconds; the chart covers 47 whole hours and the current
    # one so far (don't-send entries, 1 in 499, are not charted).
    match = re.search(r"over the last 48 hours: (\d+) sent, (\d+) deferred, (\d+) failed", text)
    assert match, text
    sent, deferred, failed = (int(n) for n in match.groups())
    assert 47 * 1800 * 0.99 < sent + deferred + failed <= 48 * 1800
    assert 0.019 < deferred / (sent + deferred + failed) < 0.021  # 1 in 50
    assert seconds < 10, seconds


def test_overview_counts_stop_at_the_cap(admin_client, monkeypatch):
    import mailer.admin.overview

    monkeypatch.setattr(mailer.admin.overview, "COUNT_CAP", 5)
    _bulk_messages(30)  # 3 deferred, 27 sendable
    text = page_text(admin_client.get(MESSAGE_LIST))
    assert "<strong>5+ queued</strong>" in text
    assert f'?priority={PRIORITY_DEFERRED}">3 deferred</a>' in text


@pytest.mark.parametrize(
    "language, expected", [("ja", ["待機中 1 件", "送信済み"]), ("ru", ["в очереди: 1", "отправлено"])]
)
def test_overview_is_translated(admin_client, language, expected):
    queue("Translated overview")
    with translation.override(language):
        text = page_text(admin_client.get(MESSAGE_LIST))
    for value in expected:
        assert value in text, (language, value)


# --- "Send selected messages now" on a large selection (issue #30) ---------------------------


@pytest.fixture
def message_admin():
    from django.contrib import admin

    return admin.site._registry[Message]


@pytest.mark.django_db(transaction=True)
def test_send_now_sends_one_batch_and_hands_the_rest_to_the_worker(
    admin_client, smtp_settings, smtp_server, message_admin, monkeypatch
):
    """"Select all" on 100,000 rows ran the whole pass inside the request."""
    monkeypatch.setattr(message_admin, "send_now_batch", 3)
    msgs = [queue(f"bulk {i}", priority=PRIORITY_LOW if i % 2 else PRIORITY_MEDIUM)
            for i in range(8)]
    stuck = queue("stuck", priority=PRIORITY_DEFERRED)
    data = {"action": "send_messages", "select_across": "1", "index": "0",
            "_selected_action": [msgs[0].pk]}
    notes = user_messages(admin_client.post(MESSAGE_LIST, data, follow=True))
    assert len(smtp_server.wait_for(3)) == 3
    assert any("3 sent" in n for n in notes), notes
    # In sending order: the medium ones first.
    assert sorted(smtp_server.subjects()) == ["bulk 0", "bulk 2", "bulk 4"]
    assert (
        "5 more selected messages were not sent now (this action sends at most 3 messages, "
        "for at most 20 seconds): they were moved to the top of the queue (high priority) and "
        "the worker sends them next." in notes
    ), notes
    left = Message.objects.exclude(pk=stuck.pk)
    assert left.count() == 5 and set(left.values_list("priority", flat=True)) == {PRIORITY_HIGH}
    assert Message.objects.get(pk=stuck.pk).priority == PRIORITY_DEFERRED  # left as it was
    assert any("1 selected message is deferred" in n for n in notes), notes


@pytest.mark.django_db(transaction=True)
def test_send_now_stops_at_its_time_bound(
    admin_client, smtp_settings, smtp_server, message_admin, monkeypatch
):
    monkeypatch.setattr(message_admin, "send_now_seconds", 0)
    msgs = [queue(f"slow {i}") for i in range(2)]
    notes = user_messages(run_action(admin_client, MESSAGE_LIST, "send_messages", msgs))
    assert smtp_server.subjects() == []
    assert any("2 more selected messages were not sent now" in n for n in notes), notes
    assert set(Message.objects.values_list("priority", flat=True)) == {PRIORITY_HIGH}


@pytest.mark.django_db(transaction=True)
def test_send_now_within_the_batch_changes_no_priority(
    admin_client, smtp_settings, smtp_server
):
    msgs = [queue(f"few {i}") for i in range(2)]
    smtp_server.fail_with = "451 later"
    notes = user_messages(run_action(admin_client, MESSAGE_LIST, "send_messages", msgs))
    assert not any("not sent now" in n for n in notes), notes
    assert set(Message.objects.values_list("priority", flat=True)) == {PRIORITY_DEFERRED}


def test_download_name_loses_bidirectional_controls(admin_client, attachment_storage):
    """U+202E made "invoice\u202egpj.exe" read as "invoiceexe.jpg" in the
    browser's download bar; it was echoed in the Content-Disposition."""
    from urllib.parse import unquote

    email = EmailMultiAlternatives("Bill", "b", "from@example.com", ["to@example.com"])
    email.attach("invoice\u202egpj\u200b.exe", b"MZ" + b"x" * 3000, "application/octet-stream")
    email.attach("Übersicht «2026».pdf", b"%PDF" + b"y" * 3000, "application/pdf")
    queue_emails([email])
    msg = Message.objects.get()
    bidi = admin_client.get(reverse("admin:mailer_message_attachment", args=[msg.pk, 0]))
    header = bidi["Content-Disposition"]
    assert header == "attachment; filename=\"invoicegpj.exe\"; filename*=UTF-8''invoicegpj.exe"
    assert "%E2%80%AE" not in header.upper() and "\u202e" not in header
    header = admin_client.get(
        reverse("admin:mailer_message_attachment", args=[msg.pk, 1])
    )["Content-Disposition"]
    assert header.startswith('attachment; filename="_bersicht _2026_.pdf"; filename*=UTF-8\'\'')
    assert unquote(header.split("''", 1)[1]) == "Übersicht «2026».pdf"


def _breadcrumbs(text: str) -> str:
    return re.search(r'class="breadcrumbs">(.*?)</(?:div|ol)>', text, re.S).group(1)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris"])
def test_detail_pages_format_their_dates_as_the_admin_does(admin_client, settings, zone):
    """The breadcrumb and "When added" showed 2026-12-07 04:16:48.944187+00:00."""
    from django.utils.formats import date_format

    settings.TIME_ZONE = zone
    msg = queue("Order #1004", to=["bob@example.com"])
    entry = log_of(msg, RESULT_FAILURE, "refused")
    with timezone.override(zone):
        added = date_format(timezone.localtime(msg.when_added), "DATETIME_FORMAT")
        attempted = date_format(timezone.localtime(entry.when_attempted), "DATETIME_FORMAT")
    raw = str(msg.when_added)[:19]  # "2026-12-07 04:16:48"
    text = page_text(admin_client.get(change_url(msg)))
    crumbs = _breadcrumbs(text)
    assert escape(f"Order #1004 to bob@example.com, queued {added}") in crumbs, crumbs
    assert raw not in text and "+00:00" not in text
    assert re.search(r'field-when_added_display.*?<div class="readonly">' + re.escape(escape(added)),
                     text, re.S)
    text = page_text(admin_client.get(change_url(entry)))
    assert escape(attempted) in _breadcrumbs(text)
    assert raw not in text and "+00:00" not in text
    assert re.search(r'field-when_attempted_display.*?<div class="readonly">'
                     + re.escape(escape(attempted)), text, re.S)
    # str() keeps 2.3.2's form for the sites that rely on it.
    assert str(msg).startswith(f"On {msg.when_added}, ")
