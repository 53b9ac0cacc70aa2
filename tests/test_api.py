"""The enqueue API in mailer/__init__.py."""

import pytest
from django.db import transaction
from django.utils.translation import gettext_lazy

import mailer
from mailer.models import (
    PRIORITY_DEFERRED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    RESULT_DONT_SEND,
    DontSendEntry,
    Message,
    MessageLog,
)

pytestmark = pytest.mark.django_db


def only_message():
    (row,) = Message.objects.all()
    return row, row.email


def test_send_mail_queues_one_plain_message():
    assert mailer.send_mail("Subject", "Body", "from@example.com", ["to@example.com"]) == 1
    row, email = only_message()
    assert (email.subject, email.body, email.from_email, email.to) == (
        "Subject", "Body", "from@example.com", ["to@example.com"],
    )
    assert row.priority == PRIORITY_MEDIUM
    assert not getattr(email, "alternatives", [])


def test_lazy_strings_are_forced_at_queue_time():
    mailer.send_mail(gettext_lazy("Lazy subject"), gettext_lazy("Lazy body"), None, ["a@example.com"])
    _, email = only_message()
    assert type(email.subject) is str and type(email.body) is str
    assert email.from_email == "from@example.com"  # DEFAULT_FROM_EMAIL


@pytest.mark.parametrize(
    "priority, expected",
    [(None, PRIORITY_MEDIUM), (PRIORITY_HIGH, PRIORITY_HIGH), (PRIORITY_LOW, PRIORITY_LOW)],
)
def test_priority(priority, expected):
    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"], priority=priority)
    assert Message.objects.get().priority == expected


def test_priority_labels_are_deprecated_but_work():
    with pytest.deprecated_call():
        assert mailer.get_priority("high") == PRIORITY_HIGH
    with pytest.deprecated_call():
        assert mailer.get_priority("deferred") == PRIORITY_DEFERRED


@pytest.mark.parametrize("bad", ["urgent", 0, 5, 2.5, True])
def test_invalid_priority_raises(bad):
    with pytest.raises(ValueError, match="Invalid priority"):
        mailer.get_priority(bad)


def test_send_html_mail_keeps_alternative_and_headers():
    mailer.send_html_mail(
        "S", "text", "<p>html</p>", "f@example.com", ["t@example.com"],
        headers={"X-Campaign": "autumn"},
    )
    row, email = only_message()
    assert email.body == "text"
    assert [tuple(a) for a in email.alternatives] == [("<p>html</p>", "text/html")]
    assert email.extra_headers["X-Campaign"] == "autumn"


def test_send_mail_html_message_like_django():
    mailer.send_mail("S", "text", "f@example.com", ["t@example.com"], html_message="<b>x</b>")
    _, email = only_message()
    assert [tuple(a) for a in email.alternatives] == [("<b>x</b>", "text/html")]


def test_send_mass_mail_is_one_insert(django_assert_max_num_queries):
    data = [(f"S{i}", "b", "f@example.com", [f"t{i}@example.com"]) for i in range(50)]
    # One don't-send lookup, one bulk insert (plus transaction bookkeeping).
    with django_assert_max_num_queries(4):
        assert mailer.send_mass_mail(data) == 50
    assert Message.objects.count() == 50


def test_message_id_assigned_at_queue_time():
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    row, email = only_message()
    msg_id = email.extra_headers["Message-ID"]
    assert msg_id.startswith("<") and msg_id.endswith(">")
    assert row.message_id == msg_id


def test_caller_message_id_is_kept():
    mailer.send_html_mail(
        "S", "b", "<p/>", "f@example.com", ["t@example.com"], headers={"message-id": "<mine@x>"}
    )
    _, email = only_message()
    assert email.extra_headers == {"message-id": "<mine@x>"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": "Hello\nBcc: victim@example.com"},
        {"recipient_list": ["bad\n@example.com"]},
        {"recipient_list": ["not an address <<>>"]},
        {"from_email": "evil@example.com\r\nX-Injected: 1"},
    ],
)
def test_message_django_would_refuse_raises_and_stores_nothing(kwargs):
    args = {"subject": "S", "message": "b", "from_email": "f@example.com",
            "recipient_list": ["t@example.com"], **kwargs}
    with pytest.raises(ValueError):
        mailer.send_mail(**args)
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_dont_send_list_filters_to_at_delivery(smtp_settings, smtp_server):
    from mailer.engine import send_all

    DontSendEntry.objects.create(to_address="Blocked@Example.com")
    mailer.send_mail("S", "b", "f@example.com", ["blocked@example.com", "ok@example.com"])
    assert send_all().sent == 1
    assert [m["to"] for m in smtp_server.messages] == [["ok@example.com"]]
    log = MessageLog.objects.get()
    assert log.recipients == "ok@example.com"
    assert log.email.to == ["ok@example.com"]  # the log keeps the message as sent


@pytest.mark.django_db(transaction=True)
def test_everyone_blocked_is_queued_then_logged_dont_send(smtp_settings, smtp_server):
    """As in 2.3.2: the row is queued, and logged "don't send" when its turn comes."""
    from mailer.engine import send_all

    DontSendEntry.objects.create(to_address="blocked@example.com")
    assert mailer.send_mail("S", "b", "f@example.com", ["blocked@example.com"]) == 1
    assert mailer.send_html_mail("H", "b", "<p>b</p>", "f@example.com", ["BLOCKED@example.com"]) == 1
    assert Message.objects.count() == 2
    result = send_all()
    assert (result.dont_send, result.sent) == (2, 0)
    assert smtp_server.messages == []
    assert not Message.objects.exists()
    logs = MessageLog.objects.order_by("id")
    assert [log.result for log in logs] == [RESULT_DONT_SEND] * 2
    assert [log.recipients for log in logs] == ["blocked@example.com", "BLOCKED@example.com"]
    assert all("don't-send list" in log.log_message for log in logs)
    assert logs[1].email.alternatives  # the content is kept


@pytest.mark.parametrize(
    "call",
    [
        lambda: mailer.send_mail("S", "b", "f@example.com", ["t@example.com"]),
        lambda: mailer.send_html_mail("S", "b", "<p>b</p>", "f@example.com", ["t@example.com"]),
    ],
    ids=["send_mail", "send_html_mail"],
)
def test_queueing_one_message_is_one_statement(call, django_assert_num_queries):
    DontSendEntry.objects.create(to_address="someone@example.com")
    with django_assert_num_queries(1) as captured:
        assert call() == 1
    assert captured.captured_queries[0]["sql"].startswith("INSERT")


def test_mail_admins_accepts_pairs(settings):
    settings.ADMINS = [("Ada", "ada@example.com"), ("Bob", "bob@example.com")]
    settings.EMAIL_SUBJECT_PREFIX = "[Site] "
    mailer.mail_admins("Oops", "trace", priority=PRIORITY_HIGH)
    row, email = only_message()
    assert email.to == ["ada@example.com", "bob@example.com"]
    assert email.subject == "[Site] Oops"
    assert email.from_email == "server@example.com"
    assert row.priority == PRIORITY_HIGH


def test_mail_admins_accepts_plain_addresses_and_html(settings):
    settings.ADMINS = ["ada@example.com", "bob@example.com"]
    mailer.mail_admins("Oops", "trace", html_message="<p>trace</p>")
    _, email = only_message()
    assert email.to == ["ada@example.com", "bob@example.com"]
    assert [tuple(a) for a in email.alternatives] == [("<p>trace</p>", "text/html")]


def test_mail_managers(settings):
    settings.MANAGERS = ["m@example.com"]
    mailer.mail_managers("Hi", "b")
    _, email = only_message()
    assert email.to == ["m@example.com"]


def test_mail_admins_with_nobody_queues_nothing(settings):
    settings.ADMINS = []
    assert mailer.mail_admins("Oops", "x") == 0
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_leaves_no_row():
    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
        assert Message.objects.count() == 1
        raise Boom
    assert Message.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_committed_transaction_keeps_row():
    with transaction.atomic():
        mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    assert Message.objects.count() == 1


def test_newline_in_an_extra_header_is_refused():
    with pytest.raises(ValueError, match="newline"):
        mailer.send_html_mail("S", "b", "<p/>", "f@example.com", ["t@example.com"],
                              headers={"X-Tag": "a\r\nBcc: victim@example.com"})
    assert not Message.objects.exists()


def test_display_names_and_unicode_addresses_are_accepted():
    mailer.send_mail("S", "b", "Jürgen Müller <juergen@example.com>",
                     ['"Doe, Jane" <jane@example.com>', "webmaster"])
    _, email = only_message()
    assert email.to == ['"Doe, Jane" <jane@example.com>', "webmaster"]


@pytest.mark.parametrize(
    "call",
    [
        lambda to: mailer.send_mail("S", "b", "f@example.com", to),
        lambda to: mailer.send_html_mail("S", "b", "<p>b</p>", "f@example.com", to),
        lambda to: mailer.send_mass_mail([("S", "b", "f@example.com", to)]),
    ],
    ids=["send_mail", "send_html_mail", "send_mass_mail"],
)
def test_a_string_instead_of_a_recipient_list_is_refused_like_django(call):
    with pytest.raises(TypeError, match='"to" argument must be a list or tuple'):
        call("a@example.com")
    assert not Message.objects.exists()


def test_nobody_to_send_to_returns_0():
    """The functions return how many were queued (docs/usage.rst), not a constant 1."""
    assert mailer.send_mail("S", "b", "f@example.com", []) == 0
    assert mailer.send_html_mail("S", "b", "<p>b</p>", "f@example.com", ()) == 0
    assert not Message.objects.exists()
    # Blocked addresses are somebody: queued as in 2.3.2, dropped at delivery.
    DontSendEntry.objects.create(to_address="blocked@example.com")
    assert mailer.send_html_mail("S", "b", "<p>b</p>", "f@example.com", ["blocked@example.com"]) == 1
    assert mailer.send_mail("S", "b", "f@example.com", ("t@example.com",)) == 1
