"""Provider quotas and pushback per route (mailer.quotas, mailer.pushback),
against real SMTP servers and the real databases, in one process and in
several."""

from __future__ import annotations

import json
import logging
import signal
import smtplib
import time
from datetime import timedelta

import pytest
from django.core import checks
from django.core.management import call_command

import mailer
from mailer import pushback, quotas
from mailer.compat import HAS_MAILERS
from mailer.engine import send_all
from mailer.models import PRIORITY_DEFERRED, Message, MessageLog
from mailer.pool import PassResult
from mailer.routequota import RouteQuota
from mailer.worker import Worker
from tests import settings as test_settings
from tests.conftest import Manage

pytestmark = pytest.mark.django_db(transaction=True)

#: The name of unrouted mail's quota (the delivery alias on Django 6.1).
UNROUTED = "smtp" if HAS_MAILERS else "default"


def rate(settings, value, route=UNROUTED):
    """Give ``route`` (default: unrouted mail) the RATE ``value``."""
    routes = dict(getattr(settings, "MAILER_ROUTES", {}) or {})
    routes[route] = {**routes.get(route, {}), "RATE": value}
    settings.MAILER_ROUTES = routes


def queue(n, using=None, prefix="m"):
    kwargs = {"using": using} if using else {}
    for i in range(n):
        mailer.send_mail(f"{prefix}{i}", "body", "f@example.com", ["t@example.com"], **kwargs)


def most_in_a_second(times):
    """The most arrivals in any window [t, t + 1s)."""
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + 1) for t in times), default=0)


def clear_of_window_edge(seconds, margin=5.0):
    """Wait until the current window of ``seconds`` has ``margin`` left."""
    left = seconds - time.time() % seconds
    if left < margin:
        time.sleep(left + 0.05)


# --- RATE ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "limits"),
    [
        ("14/s", ["14/s"]),
        (["50000/d", " 14 / s "], ["14/s", "50000/d"]),
        (("600/m", "5000/h"), ["600/m", "5000/h"]),
        (None, []),
    ],
)
def test_rates_parse(value, limits):
    assert [str(limit) for limit in quotas.parse_rate(value)] == limits


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("14 per second", "not a rate"),
        ("0/s", "not a rate"),
        ("14/w", "not a rate"),
        (14, "not a rate"),
        ([], "not a rate"),
        (["1/s", "2/s"], "two limits per second"),
    ],
)
def test_bad_rates_are_named(value, words):
    with pytest.raises(ValueError, match=words):
        quotas.parse_rate(value)


def test_check_names_a_bad_rate(settings, two_providers):
    settings.MAILER_ROUTES = {**settings.MAILER_ROUTES, "ses": {**settings.MAILER_ROUTES.get("ses", {}), "RATE": "fast"}}
    errors = [e for e in checks.run_checks() if e.id == "mailer.E034"]
    assert len(errors) == 1
    assert "MAILER_ROUTES['ses']['RATE']" in errors[0].msg and "'fast'" in errors[0].msg
    rate(settings, ["14/s", "50000/d"], "ses")
    assert not [e for e in checks.run_checks() if e.id == "mailer.E034"]


@pytest.mark.skipif(HAS_MAILERS, reason="MAILER_ROUTES['default'] for unrouted mail is 4.2-6.0's")
def test_unrouted_mail_takes_its_rate_from_default(settings, smtp_settings):
    settings.MAILER_ROUTES = {"default": {"RATE": "3/d", "CONCURRENCY": 2}}
    assert not [e for e in checks.run_checks() if e.id.startswith("mailer.E03")]
    from mailer import routes

    assert routes.route_names() == [] and not routes.is_route("default")
    assert routes.concurrency(None) == 2
    settings.MAILER_ROUTES = {"default": {"RATE": "3/d", "OPTIONS": {"host": "x"}}}
    assert [e.id for e in checks.run_checks() if e.id.startswith("mailer.E03")] == ["mailer.E033"]


# --- the limits in one process -----------------------------------------------------


def test_per_second_limit_spaces_the_sends(settings, smtp_settings, smtp_server):
    rate(settings, "10/s")
    queue(15)
    start = time.monotonic()
    result = send_all(concurrency=3)
    assert result.sent == 15 and result.held_for is None
    assert time.monotonic() - start >= 1.3  # 15 at 10/s: slots 0.1 s apart
    assert most_in_a_second(smtp_server.attempt_times) <= 11
    row = RouteQuota.objects.get(route=UNROUTED)
    assert row.slot_at / quotas.US > time.time() - 1


def test_a_route_over_its_quota_waits_and_the_others_go_on(settings, two_providers, caplog):
    smtp_server, ses_server = two_providers
    rate(settings, "3/m", "ses")
    clear_of_window_edge(60)
    queue(5, using="ses", prefix="ses")
    queue(2, prefix="plain")
    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        result = send_all()
    assert (result.sent, result.deferred, result.failed) == (5, 0, 0)
    assert len(ses_server.messages) == 3 and len(smtp_server.messages) == 2
    assert 0 < result.held_for <= 60
    # The two left wait as they were: queued, no attempt counted, nothing logged.
    left = Message.objects.all()
    assert [(m.route, m.priority != PRIORITY_DEFERRED, m.retry_count) for m in left] == [
        ("ses", True, 0)
    ] * 2
    assert MessageLog.objects.filter(route="ses").count() == 3
    assert "Route ses has used its quota (3/m: 3 sent this minute)" in caplog.text
    # The count is the database's: the next pass (any worker) sends none.
    again = send_all()
    assert again.sent == 0 and again.held_for is not None
    assert RouteQuota.objects.get(route="ses").m_count == 3


def test_one_statement_per_message_on_a_limited_route(settings, smtp_settings, smtp_server):
    """The quota costs one UPDATE per sent message, outside the message's
    transaction; the pass adds the slot given back when the queue is empty."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from mailer.engine import Session

    rate(settings, "1000/s")
    session = Session()  # a worker's: its connection stays open between passes
    queue(1)
    send_all(session=session)  # the route's row exists from here on
    queue(5)
    with CaptureQueriesContext(connection) as captured:
        assert send_all(session=session).sent == 5
    session.close()
    quota = [q["sql"] for q in captured if "mailer_routequota" in q["sql"]]
    # Five sent, the look that finds the queue empty, its slot given back (a
    # worker's pass reads the paused routes at most every 5 s: not here).
    assert len(quota) == 6 + 1, quota  # MariaDB too: the slot comes back as LAST_INSERT_ID
    assert sum(sql.startswith("UPDATE") for sql in quota) == 6 + 1


def test_a_slot_not_used_is_given_back(settings, smtp_settings, smtp_server):
    """Slots are counted by what reaches the provider: a message on the
    don't-send list and an empty queue cost the route nothing."""
    rate(settings, "2/h")
    clear_of_window_edge(3600)
    mailer.send_mail("s", "b", "f@example.com", ["blocked@example.com"])
    from mailer.models import DontSendEntry

    DontSendEntry.objects.create(to_address="blocked@example.com")
    assert send_all().dont_send == 1
    queue(2)
    assert send_all().sent == 2


def test_the_worker_sleeps_until_the_route_is_free(settings):
    worker = Worker(sleep=30, install_signal_handlers=False)
    assert worker.pause_after(PassResult(held_for=0.4)) == pytest.approx(0.4)
    assert worker.pause_after(PassResult(held_for=3600)) == 30


def test_a_worker_waits_out_a_pause_set_elsewhere(settings, smtp_settings, smtp_server):
    """Another worker's pause holds this one's mail (an unlimited route):
    runmailer's loop sleeps until it ends, then sends."""
    quotas.ensure_row("default", UNROUTED)
    RouteQuota.objects.update(
        paused_until=quotas.now_us() + int(0.8 * quotas.US), pause_reason="421 elsewhere"
    )
    queue(2)
    worker = Worker(sleep=5, max_passes=2, install_signal_handlers=False)
    started = time.monotonic()
    worker.run()
    assert len(smtp_server.messages) == 2
    assert 0.7 <= time.monotonic() - started < 4


def test_a_held_route_with_scheduled_mail_does_not_spin_the_worker(settings, smtp_settings):
    """The held message is due (its not_before is past): the worker still
    sleeps its idle period, not the 0.05 s of mail falling due."""
    from django.utils import timezone

    rate(settings, "1/h")
    clear_of_window_edge(3600)
    queue(2)
    Message.objects.update(not_before=timezone.now() - timedelta(seconds=5))
    worker = Worker(sleep=0.4, max_passes=4, install_signal_handlers=False)
    started = time.monotonic()
    worker.run()
    assert Message.objects.count() == 1
    assert time.monotonic() - started >= 0.7  # two idle waits at least, not 0.05 s each


def test_a_window_only_moves_forward(settings, smtp_settings, smtp_server):
    """A worker whose clock is behind counts in the window a faster one has
    begun (and finds it full) rather than starting its own again."""
    rate(settings, "3/h")
    clear_of_window_edge(3600)
    quotas.ensure_row("default", UNROUTED)
    ahead = quotas.window_of(quotas.Limit(3, "h"), quotas.now_us()) + 1
    RouteQuota.objects.update(h_window=ahead, h_count=3)
    queue(1)
    result = send_all()
    assert result.sent == 0 and result.held_for is not None
    assert RouteQuota.objects.get().h_window == ahead


def test_a_held_route_goes_on_while_other_routes_still_send(settings, two_providers):
    """Paused for 0.4 s while the other route has a longer pass: it sends in
    the same pass once the pause is over, not at the next one."""
    smtp_server, ses_server = two_providers
    smtp_server.delay = 0.15
    quotas.ensure_row("default", "ses")
    RouteQuota.objects.filter(route="ses").update(
        paused_until=quotas.now_us() + int(0.4 * quotas.US), pause_reason="421 wait"
    )
    queue(2, using="ses", prefix="ses")
    queue(8, prefix="plain")
    result = send_all()
    assert result.sent == 10 and len(ses_server.messages) == 2


def test_a_pause_read_from_the_database_is_logged_once(settings, smtp_settings, caplog):
    quotas.ensure_row("default", UNROUTED)
    RouteQuota.objects.update(paused_until=quotas.now_us() + 30 * quotas.US, pause_reason="421 x")
    queue(1)
    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        for _ in range(3):
            assert send_all().held_for is not None
    assert caplog.text.count("is paused at its provider's request") == 1


# --- pushback --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "is_pushback"),
    [
        (smtplib.SMTPSenderRefused(421, b"4.7.0 Too many connections", "f@x"), True),
        (smtplib.SMTPDataError(421, b"closing"), True),
        (smtplib.SMTPDataError(451, b"4.7.1 Rate limit exceeded"), True),
        (smtplib.SMTPDataError(450, b"4.7.1 Throttled, try later"), True),
        (smtplib.SMTPDataError(452, b"Too many messages"), True),
        (smtplib.SMTPRecipientsRefused({"a@x": (450, b"rate limited"), "b@x": (421, b"bye")}), True),
        # Gmail's reply for one mailbox receiving too fast: that recipient's.
        (smtplib.SMTPRecipientsRefused({"a@x": (450, b"4.2.1 receiving mail at a rate")}), False),
        (smtplib.SMTPDataError(451, b"4.3.0 Temporary failure"), False),
        (smtplib.SMTPDataError(451, b"4.3.0 Try again later"), False),
        (smtplib.SMTPDataError(554, b"5.7.1 rate of spam too high"), False),
        (smtplib.SMTPRecipientsRefused({"a@x": (450, b"rate"), "b@x": (550, b"no such user")}), False),
        (smtplib.SMTPServerDisconnected("gone"), False),
        (ConnectionRefusedError(), False),
    ],
)
def test_which_replies_mean_slow_down(exc, is_pushback):
    assert (pushback.classify(exc) is not None) is is_pushback


def test_http_429_and_retry_after():
    import requests
    from anymail.exceptions import AnymailAPIError

    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = "7"
    push = pushback.classify(AnymailAPIError("slow", status_code=429, response=response))
    assert push is not None and push.retry_after == 7.0
    assert pushback.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert pushback.retry_after("soon") is None and pushback.retry_after(None) is None
    # A reply text as str (some backends) reads as bytes does.
    assert pushback.classify(smtplib.SMTPDataError(451, "4.7.1 rate limited")) is not None


def test_pauses_grow_and_are_capped():
    assert 0.8 <= quotas.pause_seconds(1, None) <= 1.2
    assert 3.2 <= quotas.pause_seconds(3, None) <= 4.8
    assert quotas.pause_seconds(40, None) == quotas.PAUSE_MAX or quotas.pause_seconds(
        40, None
    ) <= quotas.PAUSE_MAX
    assert quotas.pause_seconds(1, 12.0) == 12.0


def test_421_pauses_only_its_route_and_the_message_waits(settings, two_providers, caplog, monkeypatch):
    monkeypatch.setattr(quotas, "PAUSE_FIRST", 0.4)
    smtp_server, ses_server = two_providers
    ses_server.fail_first = 1
    ses_server.fail_first_reply = "421 4.7.0 Try again later, closing connection"
    queue(3, using="ses", prefix="ses")
    queue(3, prefix="plain")
    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        result = send_all()
    assert (result.sent, result.held, result.deferred, result.failed) == (3, 1, 0, 0)
    assert len(smtp_server.messages) == 3 and not ses_server.messages
    assert 0 < result.held_for <= 0.6
    paused = [r for r in caplog.records if "paused for" in r.getMessage()]
    assert len(paused) == 1 and paused[0].levelno == logging.WARNING
    assert "421 4.7.0 Try again later" in paused[0].getMessage()
    assert not MessageLog.objects.filter(route="ses").exists()
    assert sorted(Message.objects.values_list("retry_count", "priority")) == [(0, 2)] * 3
    row = RouteQuota.objects.get(route="ses")
    assert row.pauses == 1 and "421" in row.pause_reason
    # Another pass during the pause sends nothing of it (and logs no new pause).
    caplog.clear()
    assert send_all().held_for is not None and not ses_server.messages
    assert "paused for" not in caplog.text
    time.sleep(0.6)
    assert send_all().sent == 3
    assert len(ses_server.messages) == 3


def test_http_429_pauses_for_its_retry_after(settings, smtp_settings):
    from tests.backends import TooFastOnce

    TooFastOnce.calls, TooFastOnce.sent = 0, []
    if HAS_MAILERS:
        settings.MAILERS = {**settings.MAILERS, "smtp": {"BACKEND": "tests.backends.TooFastOnce"}}
    else:
        settings.MAILER_EMAIL_BACKEND = "tests.backends.TooFastOnce"
    queue(2)
    result = send_all()
    assert result.held == 1 and result.sent == 0
    assert 0.2 < result.held_for <= 0.3
    assert Message.objects.count() == 2
    time.sleep(0.35)
    assert send_all().sent == 2 and len(TooFastOnce.sent) == 2


# --- several processes --------------------------------------------------------------


def test_a_killed_worker_keeps_its_slot_counted(manage, smtp_settings, smtp_server, settings):
    """A worker killed while its message is in DATA has used its slot: the
    next worker doesn't get it again within the window, and the message goes
    out later with its Message-ID."""
    rate(settings, "2/h")
    clear_of_window_edge(3600, margin=30)
    smtp_server.delay = 5
    queue(3)
    proc = Manage(env={**manage.env, "MAILER_TEST_RATE": "2/h"}).popen("send_mail")
    deadline = time.monotonic() + 20
    while smtp_server.active < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert smtp_server.active == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    smtp_server.delay = 0
    time.sleep(0.3)
    assert RouteQuota.objects.get(route=UNROUTED).h_count == 1
    result = send_all()
    assert result.sent == 1 and result.held_for is not None
    assert len(smtp_server.messages) == 1 and Message.objects.count() == 2
    assert RouteQuota.objects.get(route=UNROUTED).h_count == 2


@pytest.mark.rowlocks
def test_two_machines_hold_one_rate_together(manage, smtp_server):
    """Two worker processes with their own connections and three lanes each
    share 5/s: never more than 5 (plus the edge) in any second at the
    server, every message once."""
    queue(16)
    workers = Manage(env={**manage.env, "MAILER_TEST_RATE": "5/s", "MAILER_TEST_NO_FILE_LOCK": "1"})
    procs = [workers.popen("send_mail", "--concurrency", "3") for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert not Message.objects.exists()
    ids = smtp_server.message_ids()
    assert len(ids) == 16 and len(set(ids)) == 16
    times = sorted(smtp_server.attempt_times)
    assert most_in_a_second(times) <= 7
    assert times[-1] - times[0] >= 2.5  # 16 at 5/s


def test_status_of_a_held_message(settings, two_providers, monkeypatch, capsys):
    monkeypatch.setattr(quotas, "PAUSE_FIRST", 5)
    _, ses_server = two_providers
    rate(settings, "1/d", "ses")
    clear_of_window_edge(86400)
    queue(2, using="ses", prefix="ses")
    send_all()
    waiting = Message.objects.get()
    status = mailer.status(waiting.message_id)
    assert status.state == "queued" and status.waiting_for == "rate limit"
    ses_server.fail_first = 10
    ses_server.fail_first_reply = "421 4.7.0 slow down"
    RouteQuota.objects.filter(route="ses").update(d_count=0)
    send_all()
    assert mailer.status(waiting.message_id).waiting_for == "provider pause"
    call_command("mailer_status", json=True)
    ses = json.loads(capsys.readouterr().out)["routes"]["ses"]
    assert ses["limits"] == [
        {"rate": "1/d", "per": "day", "used": 1, "resets_in_seconds": ses["limits"][0]["resets_in_seconds"]}
    ]
    assert ses["paused"] and 0 < ses["paused_for_seconds"] <= 6
    assert ses["pause_reason"] == "421 4.7.0 slow down" and ses["waiting_for"] == "provider pause"
    call_command("mailer_status")
    text = capsys.readouterr().out
    assert "Route ses: 1 queued" in text and "limits 1/d (1 used this day)" in text
    assert "PAUSED for" in text and "(421 4.7.0 slow down)" in text


def test_admin_overview_names_a_paused_route(settings, two_providers, admin_client):
    from django.urls import reverse

    _, ses_server = two_providers
    ses_server.fail_with = "421 4.7.0 Too many connections <b>now</b>"
    queue(1, using="ses")
    send_all()
    page = admin_client.get(reverse("admin:mailer_message_changelist")).content.decode()
    assert "Route ses is paused for" in page
    assert "at its provider&#x27;s request (421 4.7.0 Too many connections &lt;b&gt;now&lt;/b&gt;)" in page
    RouteQuota.objects.update(paused_until=0)
    page = admin_client.get(reverse("admin:mailer_message_changelist")).content.decode()
    assert "mailer-held" not in page


# --- the gate and what operators see, directly -------------------------------------


def test_a_bad_or_missing_rate_limits_nothing(settings):
    settings.MAILER_ROUTES = {"x": {"RATE": "fast"}, "y": "not a dict"}
    assert quotas.route_limits("x") == [] and quotas.route_limits("y") == []
    settings.MAILER_ROUTES = ["x"]
    assert quotas.rated_routes() == [] and quotas.route_limits("x") == []


def test_a_per_second_route_booked_far_ahead_is_held(settings, caplog):
    """Slots taken more than HORIZON ahead (many workers): the lane doesn't
    wait in the pass; status and mailer_status say the quota is used up."""
    from mailer.quotastatus import quota_line, quota_state

    rate(settings, "2/s", "q")
    quotas.ensure_row("default", "q")
    ahead = quotas.now_us() + 10 * quotas.US
    RouteQuota.objects.filter(route="q").update(slot_at=ahead)
    gate = quotas.Gate("q", "default", quotas.route_limits("q"))
    with caplog.at_level(logging.INFO, logger="mailer.engine"):
        assert gate.take(time.sleep) is None
    assert 7 < gate.held_for < 8.1
    assert "2/s: slots taken 2s ahead" in caplog.text
    state = quota_state("q", RouteQuota.objects.get(route="q"))
    assert state["limits"][0]["used"] == 2 and state["waiting_for"] == "rate limit"
    assert "its quota is used up" in quota_line("q", state)
    assert quota_state("q", None)["limits"][0]["used"] == 0


def test_a_pause_is_set_once_and_for_the_messages_own_route(caplog):
    push = pushback.Pushback("421 4.7.0 slow down")
    gate = quotas.Gate("a", "default", [])
    with caplog.at_level(logging.WARNING, logger="mailer.engine"):
        first = gate.pause(push, "b")  # a message of route b through a's lane
        again = quotas.Gate("b", "default", []).pause(push)
    assert first > 0 and 0 < again <= first
    assert caplog.text.count("Route b paused for") == 1
    assert RouteQuota.objects.get(route="b").pauses == 1
    assert not RouteQuota.objects.filter(route="a", paused_until__gt=0).exists()


def test_a_stopping_worker_gives_its_slot_back(settings):
    """Woken early (SIGTERM) while waiting for a slot: no message goes, the
    slot is given back; a paused route without limits is held at once."""
    rate(settings, "2/s", "q")
    quotas.ensure_row("default", "q")
    RouteQuota.objects.filter(route="q").update(slot_at=quotas.now_us() + quotas.US)
    gate = quotas.Gate("q", "default", quotas.route_limits("q"))
    assert gate.take(lambda seconds: None, stopping=lambda: True) is None
    assert RouteQuota.objects.get(route="q").slot_at <= quotas.now_us() + quotas.US
    paused = quotas.Gate("z", "default", [], paused_until=quotas.now_us() + quotas.US)
    assert paused.take(time.sleep) is None and paused.held_for is not None


@pytest.mark.skipif(test_settings.DB != "sqlite", reason="SQLite's RETURNING")
def test_sqlite_before_returning_reads_its_slot_back(settings, smtp_settings, smtp_server,
                                                     monkeypatch):
    import sqlite3

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))  # Ubuntu 20.04's
    rate(settings, "20/s")
    queue(3)
    assert send_all().sent == 3
    assert most_in_a_second(smtp_server.attempt_times) <= 21
