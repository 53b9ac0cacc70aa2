"""mailer/connection.py against a real SMTP server on loopback: the
connection a worker keeps between passes."""

import logging
import time
from unittest.mock import patch

import pytest

import mailer
from mailer import engine
from mailer.engine import send_all
from mailer.models import PRIORITY_DEFERRED, RESULT_FAILURE, Message, MessageLog

pytestmark = pytest.mark.django_db(transaction=True)


def queue(n=1, **kwargs):
    for i in range(n):
        mailer.send_mail(f"Subject {i}", f"Body {i}", "from@example.com", [f"to{i}@example.com"],
                         **kwargs)


# --- what a worker keeps between passes (engine.Session) ---------------------------


def test_a_session_keeps_the_smtp_connection_between_passes(smtp_settings, smtp_server):
    session = engine.Session()
    try:
        for n in (1, 2, 3):
            queue(1)
            assert send_all(session=session).sent == 1
            smtp_server.wait_for(n)
        assert smtp_server.connections == 1
    finally:
        session.close()
    assert session.expires_in() is None


def test_a_kept_connection_the_server_closed_is_replaced_not_deferred(
    smtp_settings, smtp_server, caplog
):
    session = engine.Session()
    try:
        queue(1)
        assert send_all(session=session).sent == 1
        smtp_server.close_connections()  # the provider's idle timeout
        queue(2)
        with caplog.at_level(logging.INFO, logger="mailer.engine"):
            result = send_all(session=session)
    finally:
        session.close()
    assert (result.sent, result.deferred, result.failed) == (2, 0, 0)
    assert smtp_server.connections == 2
    assert len(set(smtp_server.message_ids())) == 3
    assert not Message.objects.exists()
    assert not MessageLog.objects.filter(result=RESULT_FAILURE).exists()
    assert "had closed the connection" in caplog.text


def test_a_fresh_connection_that_drops_is_deferred_not_resent(settings, smtp_settings,
                                                              smtp_server):
    smtp_server.drop = True
    queue(1)
    assert send_all(session=engine.Session()).deferred == 1
    assert smtp_server.connections == 1  # no second attempt on a new connection


def test_a_drop_in_the_middle_of_a_pass_is_deferred_not_resent(smtp_settings, smtp_server):
    """Only a connection kept between passes is retried: a server that drops
    the connection on a message it was sent in the same pass means it."""
    smtp_server.drop_matching = "drop me"
    queue(2)
    mailer.send_mail("drop me", "b", "f@example.com", ["t@example.com"])
    session = engine.Session()
    try:
        result = send_all(session=session)
    finally:
        session.close()
    assert (result.sent, result.deferred) == (2, 1)
    assert smtp_server.connections == 1
    assert Message.objects.get().priority == PRIORITY_DEFERRED


def test_a_kept_connection_is_closed_after_its_time(smtp_settings, smtp_server):
    session = engine.Session(keep_seconds=0.2)
    queue(1)
    assert send_all(session=session).sent == 1
    assert 0 < session.expires_in() <= 0.2
    time.sleep(0.25)
    session.close_expired()
    assert session.expires_in() is None
    queue(1)
    assert send_all(session=session).sent == 1
    session.close()
    assert smtp_server.connections == 2


def test_the_worker_closes_an_idle_connection_while_it_waits(settings, smtp_settings,
                                                            smtp_server):
    from mailer.worker import Worker

    worker = Worker(install_signal_handlers=False, sleep=0.3)
    worker.session = engine.Session(keep_seconds=0.1)
    queue(1)
    worker.running = True
    worker.run_pass()
    assert worker.session.expires_in() is not None
    worker.wait(0.3)
    assert worker.session.expires_in() is None  # closed during the wait


def test_a_session_reuses_the_compiled_statements(smtp_settings, smtp_server,
                                                  django_assert_num_queries):
    session = engine.Session()
    try:
        queue(1)
        send_all(session=session)
        queue(1)
        with patch.object(engine._PassQueries, "_compile", wraps=None) as compile_:
            assert send_all(session=session).sent == 1
        compile_.assert_not_called()
    finally:
        session.close()
