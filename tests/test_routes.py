"""Routes: one queue, several providers (Django 6.1's MAILERS aliases, and
MAILER_ROUTES on 4.2-6.0), against real SMTP servers."""

from __future__ import annotations

import logging

import pytest
from django.core import checks, mail
from django.core.management import CommandError, call_command
from django.db import transaction

import mailer
from mailer.compat import HAS_MAILERS
from mailer.engine import send_all
from mailer.models import PRIORITY_DEFERRED, PRIORITY_LOW, Message, MessageLog
from mailer.routes import UnknownRoute
from tests.conftest import SMTP, _smtp, configure, free_port

pytestmark = pytest.mark.django_db(transaction=True)

def _send(subject, **kwargs):
    return mailer.send_mail(subject, "body", "f@example.com", ["t@example.com"], **kwargs)


def test_using_records_the_route(two_providers):
    _send("plain")
    _send("by route", using="ses")
    _send("by smtp", using="smtp")
    mailer.send_html_mail("html", "b", "<p>b</p>", "f@example.com", ["t@example.com"], using="ses")
    mailer.send_mass_mail([("mass", "b", "f@example.com", ["a@example.com"])], using="ses")
    routes = dict(Message.objects.values_list("subject_text", "route"))
    assert routes == {
        "plain": None,
        "by route": "ses",
        "by smtp": "smtp",
        "html": "ses",
        "mass": "ses",
    }


def test_mail_admins_and_managers_take_using(two_providers, settings):
    settings.ADMINS = ["ada@example.com"]
    settings.MANAGERS = ["mia@example.com"]
    mailer.mail_admins("admins", "b", using="ses")
    mailer.mail_managers("managers", "b", using="smtp")
    assert dict(Message.objects.values_list("subject_text", "route")) == {
        "[Django] admins": "ses",
        "[Django] managers": "smtp",
    }


def test_unknown_route_is_refused_naming_the_routes(two_providers):
    with pytest.raises(UnknownRoute, match="'nope' is not a route.*ses, smtp"):
        _send("x", using="nope")
    assert not Message.objects.exists()


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_queue_alias_resolves_to_its_route_and_options(two_providers):
    _send("mailer bulk", using="bulk")
    mail.send_mail("django bulk", "b", "f@example.com", ["t@example.com"], using="bulk")
    mail.send_mail("django default", "b", "f@example.com", ["t@example.com"])
    rows = {m.subject_text: (m.route, m.priority) for m in Message.objects.all()}
    assert rows == {
        "mailer bulk": ("ses", PRIORITY_LOW),
        "django bulk": ("ses", PRIORITY_LOW),
        "django default": ("smtp", 2),
    }


@pytest.mark.skipif(HAS_MAILERS, reason="MAILER_ROUTES' backends are for Django 4.2-6.0")
def test_get_connection_dbbackend_using(two_providers):
    connection = mail.get_connection("mailer.backend.DbBackend", using="ses")
    mail.EmailMessage("via connection", "b", "f@example.com", ["t@example.com"],
                      connection=connection).send()
    assert Message.objects.get().route == "ses"
    with pytest.raises(UnknownRoute):
        mail.get_connection("mailer.backend.DbBackend", using="nope")


def test_each_route_goes_to_its_provider(two_providers):
    smtp_server, ses_server = two_providers
    _send("plain")
    _send("smtp 1", using="smtp")
    _send("ses 1", using="ses")
    _send("ses 2", using="ses")
    result = send_all()
    assert result.sent == 4
    assert sorted(smtp_server.subjects()) == ["plain", "smtp 1"]
    assert sorted(ses_server.subjects()) == ["ses 1", "ses 2"]
    assert dict(MessageLog.objects.values_list("subject_text", "route")) == {
        "plain": None,
        "smtp 1": "smtp",
        "ses 1": "ses",
        "ses 2": "ses",
    }


def test_a_refusing_provider_defers_only_its_own_mail(two_providers):
    smtp_server, ses_server = two_providers
    ses_server.fail_with = "451 4.3.0 Temporary failure"
    for i in range(3):
        _send(f"ses {i}", using="ses")
        _send(f"smtp {i}")
    result = send_all()
    assert (result.sent, result.deferred) == (3, 3)
    assert sorted(smtp_server.subjects()) == ["smtp 0", "smtp 1", "smtp 2"]
    assert set(Message.objects.values_list("route", "priority")) == {("ses", PRIORITY_DEFERRED)}
    # The failure names the route's own settings, not the default delivery's.
    where = "MAILERS" if HAS_MAILERS else "MAILER_ROUTES"
    log = MessageLog.objects.filter(route="ses").first()
    assert f"{where}['ses']['OPTIONS'] host/port" in log.log_message


def test_a_silent_provider_stops_only_its_own_lanes(
    settings, smtp_server, second_smtp_server, silent_server
):
    configure(settings, smtp_server, silent_server, ses_timeout=0.5)
    for i in range(2):
        _send(f"ses {i}", using="ses")
    for i in range(5):
        _send(f"smtp {i}")
    result = send_all()
    assert result.timed_out
    assert sorted(smtp_server.subjects()) == [f"smtp {i}" for i in range(5)]
    # The silent route's pass ended at its first timeout: the rest stays queued.
    assert Message.objects.filter(route="ses").count() == 2
    assert Message.objects.filter(route="ses", priority=PRIORITY_DEFERRED).count() == 1


def test_route_concurrency(settings, smtp_server, second_smtp_server):
    configure(settings, smtp_server, second_smtp_server, routes={"ses": {"CONCURRENCY": 3}})
    second_smtp_server.delay = 0.2
    for i in range(6):
        _send(f"ses {i}", using="ses")
    assert send_all().sent == 6
    assert second_smtp_server.max_active == 3
    assert second_smtp_server.connections == 3
    # A command's --concurrency overrides it for that process.
    second_smtp_server.max_active = 0
    for i in range(3):
        _send(f"ses again {i}", using="ses")
    call_command("send_mail", concurrency=1, verbosity=0)
    assert second_smtp_server.max_active == 1
    assert not Message.objects.exists()


def test_route_option_restricts_the_pass(two_providers):
    smtp_server, ses_server = two_providers
    _send("plain")
    _send("ses", using="ses")
    _send("smtp", using="smtp")
    call_command("send_mail", route=["ses"], verbosity=0)
    assert ses_server.subjects() == ["ses"]
    assert smtp_server.subjects() == []
    unrouted = "smtp" if HAS_MAILERS else "default"
    call_command("send_mail", route=[unrouted], verbosity=0)
    expected = ["plain", "smtp"] if HAS_MAILERS else ["plain"]
    assert sorted(smtp_server.subjects()) == expected


def test_route_option_names_a_route(two_providers):
    with pytest.raises(CommandError, match="'nope' is not a route"):
        call_command("send_mail", route=["nope"], verbosity=0)


def test_a_route_no_longer_configured_is_deferred_with_the_reason(two_providers, settings):
    _send("orphan", using="ses")
    _send("plain")
    if HAS_MAILERS:
        del settings.MAILERS["ses"]
        settings.MAILERS["bulk"]["OPTIONS"].pop("using")
    else:
        del settings.MAILER_ROUTES["ses"]
    result = send_all()
    assert (result.sent, result.deferred) == (1, 1)
    log = MessageLog.objects.get(subject_text="orphan")
    assert "route 'ses' is not in" in log.log_message
    assert log.route == "ses"


def test_unrouted_queue_keeps_todays_pass(settings, smtp_server):
    """Without routes configured, a pass is the single group it always was:
    no query asks about routes (on 6.1 the one real alias is no extra route)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.MAILER_ROUTES = {}
    if HAS_MAILERS:
        settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend"}, "smtp": _smtp(smtp_server)}
    else:
        settings.MAILER_EMAIL_BACKEND = SMTP
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", smtp_server.port
    _send("plain")
    if HAS_MAILERS:
        _send("routed to the same alias", using="smtp")
    with CaptureQueriesContext(connection) as queries:
        assert send_all().sent == (2 if HAS_MAILERS else 1)
    selects = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    claims = [sql for sql in selects if "mailer_routequota" not in sql]  # one look for pauses
    assert not [sql for sql in claims if "route" in sql.split("WHERE")[-1]]
    assert "plain" in smtp_server.subjects()


def _errors(ids):
    return sorted(e.id for e in checks.run_checks() if e.id in ids)


ROUTE_IDS = {"mailer.E030", "mailer.E031", "mailer.E032", "mailer.E033"}


def test_checks_route_shape(settings, two_providers):
    settings.MAILER_ROUTES = {"ses": {"CONCURRENCY": 0, "SPEED": "14/s"}}
    assert _errors(ROUTE_IDS) == ["mailer.E030", "mailer.E030"]
    settings.MAILER_ROUTES = ["ses"]
    assert _errors(ROUTE_IDS) == ["mailer.E030"]


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_checks_queue_using(settings, two_providers):
    assert _errors(ROUTE_IDS) == []
    settings.MAILERS["bulk"]["OPTIONS"]["using"] = "missing"
    settings.MAILERS["default"]["OPTIONS"]["using"] = "bulk"
    settings.MAILER_USING = "smtp"
    assert _errors(ROUTE_IDS) == ["mailer.E031", "mailer.E031"]


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_checks_routes_next_to_mailers(settings, two_providers, smtp_server):
    settings.MAILER_ROUTES = {"ses": {"CONCURRENCY": 2}}
    assert _errors(ROUTE_IDS) == []
    settings.MAILER_ROUTES = {"ses": _smtp(smtp_server), "bulk": {}}
    assert _errors(ROUTE_IDS) == ["mailer.E032", "mailer.E032"]


@pytest.mark.skipif(HAS_MAILERS, reason="MAILER_ROUTES' backends are for Django 4.2-6.0")
def test_checks_route_backends(settings, two_providers):
    assert _errors(ROUTE_IDS) == []
    settings.MAILER_ROUTES = {
        "loop": {"BACKEND": "mailer.backend.DbBackend"},
        "typo": {"BACKEND": "no.such.Backend"},
    }
    assert _errors(ROUTE_IDS) == ["mailer.E033", "mailer.E033"]


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
def test_default_queue_names_the_unrouted_delivery(two_providers, settings):
    """No MAILER_USING: "default"'s using option is the implicit choice (no E004)."""
    assert not hasattr(settings, "MAILER_USING")
    assert _errors({"mailer.E004"}) == []


def test_runmailer_and_retry_deferred_take_route(two_providers):
    smtp_server, ses_server = two_providers
    _send("plain")
    _send("ses", using="ses")
    call_command("runmailer", route=["ses"], max_passes=1, verbosity=0)
    assert ses_server.subjects() == ["ses"]
    assert smtp_server.subjects() == []
    Message.objects.update(priority=PRIORITY_DEFERRED)
    _send("ses 2", using="ses")
    Message.objects.filter(subject_text="ses 2").update(priority=PRIORITY_DEFERRED)
    call_command("retry_deferred", route=["ses"], verbosity=0)
    assert dict(Message.objects.values_list("subject_text", "priority")) == {
        "plain": PRIORITY_DEFERRED,
        "ses 2": 2,
    }


def test_worker_with_route_waits_when_its_routes_are_empty(two_providers):
    from mailer.worker import Worker

    _send("plain")
    worker = Worker(routes=["ses"], max_passes=1, install_signal_handlers=False)
    assert not worker.has_work()
    _send("ses", using="ses")
    assert worker.has_work()


# --- seen everywhere: status, mailer_status, admin, signals ---------------------


def _message_id(subject):
    return Message.objects.get(subject_text=subject).message_id


def test_status_gives_the_route(two_providers):
    _send("ses", using="ses")
    _send("plain")
    ses_id, plain_id = _message_id("ses"), _message_id("plain")
    assert mailer.status(ses_id).route == "ses"
    assert mailer.status(plain_id).route is None
    send_all()
    assert (mailer.status(ses_id).state, mailer.status(ses_id).route) == ("sent", "ses")


def test_mailer_status_per_route(two_providers, capsys):
    import json

    _send("ses 1", using="ses")
    _send("ses 2", using="ses")
    Message.objects.filter(subject_text="ses 2").update(priority=PRIORITY_DEFERRED)
    _send("plain")
    call_command("mailer_status", json=True)
    routes = json.loads(capsys.readouterr().out)["routes"]
    unrouted = "smtp" if HAS_MAILERS else "default"
    assert routes["ses"]["queued"] == 1 and routes["ses"]["deferred"] == 1
    assert routes[unrouted]["queued"] == 1
    assert routes["ses"]["oldest_queued_seconds"] is not None
    assert routes["ses"]["configured"] and routes[unrouted]["configured"]
    call_command("mailer_status")
    text = capsys.readouterr().out
    assert "Route ses: 1 queued, 0 scheduled, 1 deferred" in text


def test_signals_pass_the_route(two_providers):
    from mailer.signals import message_deferred, message_sent

    seen = []

    def receiver(sender, **kwargs):
        seen.append((kwargs["email"].subject, kwargs["route"]))

    two_providers[1].fail_with = "451 4.3.0 Temporary failure"
    message_sent.connect(receiver)
    message_deferred.connect(receiver)
    try:
        _send("ses", using="ses")
        _send("plain")
        send_all()
    finally:
        message_sent.disconnect(receiver)
        message_deferred.disconnect(receiver)
    assert sorted(seen, key=str) == sorted([("ses", "ses"), ("plain", None)], key=str)


def test_admin_lists_filters_and_searches_by_route(two_providers, admin_client):
    from django.urls import reverse

    _send("to ses", using="ses")
    _send("to smtp", using="smtp")
    url = reverse("admin:mailer_message_changelist")
    page = admin_client.get(url).content.decode()
    assert "column-route_display" in page
    page = admin_client.get(url, {"route": "ses"}).content.decode()
    assert "to ses" in page and "to smtp" not in page
    page = admin_client.get(url, {"q": "ses"}).content.decode()
    assert "to ses" in page and "to smtp" not in page
    send_all()
    log_url = reverse("admin:mailer_messagelog_changelist")
    page = admin_client.get(log_url, {"route": "smtp"}).content.decode()
    assert "to smtp" in page and "to ses" not in page
    entry = MessageLog.objects.get(subject_text="to ses")
    page = admin_client.get(reverse("admin:mailer_messagelog_change", args=[entry.pk]))
    assert "ses" in page.content.decode()


def test_admin_requeue_keeps_the_route(two_providers, admin_client):
    from django.urls import reverse

    _send("to ses", using="ses")
    send_all()
    entry = MessageLog.objects.get()
    admin_client.post(
        reverse("admin:mailer_messagelog_changelist"),
        {"action": "requeue", "_selected_action": [entry.pk]},
    )
    assert Message.objects.get().route == "ses"


def test_admin_without_routes_shows_no_route_column(settings, smtp_settings, admin_client):
    from django.urls import reverse

    settings.MAILER_ROUTES = {}
    _send("plain")
    page = admin_client.get(reverse("admin:mailer_message_changelist")).content.decode()
    assert "column-route_display" not in page


@pytest.mark.postgres
def test_runmailer_pg_serves_only_its_routes(two_providers, settings):
    import threading
    import time

    from django.db import connections

    from mailer.postgres import PostgresWorker

    smtp_server, ses_server = two_providers
    settings.MAILER_EMPTY_QUEUE_SLEEP = 60
    worker = PostgresWorker(install_signal_handlers=False, routes=["ses"])
    thread = threading.Thread(target=lambda: (worker.run(), connections.close_all()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while worker.listener.conn is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _send("plain")
        _send("ses", using="ses")
        ses_server.wait_for(1)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert smtp_server.subjects() == []
    assert list(Message.objects.values_list("subject_text", flat=True)) == ["plain"]
    with pytest.raises(CommandError, match="'nope' is not a route"):
        call_command("runmailer_pg", route=["nope"], verbosity=0)


def test_an_outage_of_every_route_is_one_warning(settings, smtp_server, caplog):
    """Two routes down: the pass's outage warning (heard at -v 0) still comes,
    counting both routes' deferrals."""
    down = free_port()
    configure(settings, smtp_server, smtp_server)
    if HAS_MAILERS:
        settings.MAILERS["smtp"]["OPTIONS"]["port"] = down
        settings.MAILERS["ses"]["OPTIONS"]["port"] = down
    else:
        settings.EMAIL_PORT = down
        for route in settings.MAILER_ROUTES.values():
            route["OPTIONS"]["port"] = down
    caplog.set_level(logging.INFO, logger="mailer")
    _send("ses", using="ses")
    _send("smtp", using="smtp")
    result = send_all()
    assert (result.deferred, result.unreachable) == (2, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(w.startswith("No mail went out: 2 message(s) deferred") for w in warnings), warnings


def test_the_throttle_is_the_process_rate_across_routes(two_providers, settings):
    """MAILER_EMAIL_THROTTLE paces the whole process: with two routes' lanes
    running at once the slots are handed out in turn, not per route."""
    settings.MAILER_EMAIL_THROTTLE = 0.5
    for i in range(2):
        _send(f"ses {i}", using="ses")
        _send(f"smtp {i}", using="smtp")
    asked: list[float] = []
    result = send_all(sleep=asked.append)  # records the waits, sleeps none
    assert result.sent == 4
    # Four slots half a second apart: the last is about 1.5 s away (per
    # route it would be 0.5 s).
    assert max(asked) > 1.0, asked


def test_a_pass_inside_a_transaction_sends_every_route(two_providers):
    """Threads can't see an open transaction's rows: inside one, the route
    groups run one after another in the calling thread."""
    smtp_server, ses_server = two_providers
    with transaction.atomic():
        _send("ses", using="ses")
        _send("smtp", using="smtp")
        result = send_all()
    assert result.sent == 2
    assert ses_server.subjects() == ["ses"] and smtp_server.subjects() == ["smtp"]
