"""Delivery through Django's tasks framework (``mailer.tasks``).

In-process with the framework's DummyBackend: what is enqueued, when and how
often. With django-tasks-db: its DatabaseBackend and its ``db_worker``
command as real subprocesses, delivering to a real SMTP server (SQLite,
PostgreSQL and MariaDB). Core ``django.tasks`` on Django 6.x, the
django-tasks backport on 4.2/5.2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import django
import pytest
from django.db import connection, transaction
from django.utils import timezone

import mailer
from mailer import engine, taskhook, tasks
from mailer.conf import conf
from mailer.models import Message, MessageLog
from tests import settings as test_settings


def _unavailable(what: str) -> None:
    """Skip, naming what is missing; in CI (MAILER_TEST_STRICT=1) fail instead:
    tox installs it for every Django version (tox.ini)."""
    reason = f"{what} is not installed for Django {django.get_version()} (tox.ini installs it)"
    if os.environ.get("MAILER_TEST_STRICT") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def framework():
    if not test_settings.HAS_TASKS_FRAMEWORK:
        _unavailable("Django's tasks framework (django-tasks, the backport)")
    return tasks.framework()


@pytest.fixture
def dummy(framework, settings, transactional_db):
    """MAILER_TASK_BACKEND on the framework's DummyBackend ("default");
    returns the backend, emptied."""
    settings.MAILER_TASK_BACKEND = "default"
    backend = tasks.backend("default")
    backend.clear()
    yield backend
    backend.clear()


def _runs(backend) -> list:
    """The run_after of each enqueued send_queued_mail (None: at once)."""
    assert all(r.task.module_path == "mailer.tasks.send_queued_mail" for r in backend.results)
    return [r.task.run_after for r in backend.results]


def _context(alias: str = "default") -> SimpleNamespace:
    """What a worker passes as the task's context (its result's backend)."""
    return SimpleNamespace(task_result=SimpleNamespace(backend=alias))


# --- enqueueing ---------------------------------------------------------------------


def test_off_by_default(framework, transactional_db):
    backend = tasks.backend("default")
    backend.clear()
    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    with transaction.atomic():
        mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    assert backend.results == []


def test_a_committed_transaction_enqueues_once(dummy):
    with transaction.atomic():
        for i in range(3):
            mailer.send_mail(f"s{i}", "b", "f@example.com", ["t@example.com"])
        mailer.send_mass_mail([("m", "b", "f@example.com", ["t@example.com"])] * 5)
        Message.objects.create(priority=2, message_data="")  # a row saved the 2.3.2 way
        assert dummy.results == []  # nothing before the commit
    assert _runs(dummy) == [None]
    assert Message.objects.count() == 9


def test_a_rolled_back_transaction_enqueues_nothing(dummy):
    with contextlib.suppress(RuntimeError), transaction.atomic():
        mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
        raise RuntimeError("roll back")
    assert dummy.results == []
    # The next transaction still gets its run (nothing stale was kept).
    with transaction.atomic():
        mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    assert _runs(dummy) == [None]


def test_a_rolled_back_savepoint_then_more_mail_enqueues_once(dummy):
    with transaction.atomic():
        with contextlib.suppress(RuntimeError), transaction.atomic():
            mailer.send_mail("gone", "b", "f@example.com", ["t@example.com"])
            raise RuntimeError("roll back the savepoint")
        mailer.send_mail("kept", "b", "f@example.com", ["t@example.com"])
        mailer.send_mail("kept too", "b", "f@example.com", ["t@example.com"])
    assert _runs(dummy) == [None]
    assert Message.objects.count() == 2


def test_mail_before_a_rolled_back_savepoint_keeps_its_one_run(dummy):
    with transaction.atomic():
        mailer.send_mail("before", "b", "f@example.com", ["t@example.com"])
        with contextlib.suppress(RuntimeError), transaction.atomic():
            raise RuntimeError("roll back a savepoint that queued nothing")
        mailer.send_mail("after", "b", "f@example.com", ["t@example.com"])
    assert _runs(dummy) == [None]


def test_autocommit_each_call_is_its_own_transaction(dummy):
    mailer.send_mail("a", "b", "f@example.com", ["t@example.com"])
    mailer.send_mail("b", "b", "f@example.com", ["t@example.com"])
    assert _runs(dummy) == [None, None]


def test_scheduled_mail_gets_a_run_at_its_time(dummy):
    later = timezone.now() + timedelta(hours=1, microseconds=1)
    with transaction.atomic():
        for _ in range(3):
            mailer.send_mail("news", "b", "f@example.com", ["t@example.com"], send_at=later)
        mailer.send_mail("now", "b", "f@example.com", ["t@example.com"])
    runs = _runs(dummy)
    assert runs[0] is None  # for the mail due now
    # One run for the three scheduled messages, on the second after their time.
    second = later.replace(microsecond=0)
    assert runs[1:] == [second + timedelta(seconds=1) if later.microsecond else second]


def test_a_backend_that_cant_defer_gets_no_scheduled_run(dummy, settings, caplog):
    settings.TASKS = {**settings.TASKS, "nodefer": {"BACKEND": "tests.backends.NoDeferTaskBackend"}}
    settings.MAILER_TASK_BACKEND = "nodefer"
    backend = tasks.backend("nodefer")
    with caplog.at_level(logging.WARNING, logger="mailer.tasks"):
        mailer.send_mail("later", "b", "f@example.com", ["t@example.com"],
                         send_at=timezone.now() + timedelta(hours=1))
    assert backend.results == []
    assert "can't defer a task" in caplog.text and "mailer.W021" in caplog.text


def test_enqueue_failure_keeps_the_mail_and_the_callers_transaction(dummy, settings, caplog):
    settings.MAILER_TASK_BACKEND = "missing"  # not in TASKS (mailer.E020 says so at start)
    with caplog.at_level(logging.ERROR, logger="mailer.tasks"), transaction.atomic():
        mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    assert Message.objects.count() == 1
    assert "Could not enqueue mailer.tasks.send_queued_mail on TASKS['missing']" in caplog.text


def test_an_automatic_retry_and_retry_deferred_enqueue_runs(dummy, settings, smtp_settings,
                                                           smtp_server):
    settings.MAILER_AUTO_RETRY = True
    smtp_server.fail_first = 1
    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    dummy.clear()
    before = timezone.now()
    engine.send_all()  # the 451: deferred, an automatic retry a minute on
    retry_at = Message.objects.get().not_before
    assert retry_at > before
    assert _runs(dummy) == [retry_at.replace(microsecond=0) + timedelta(seconds=1)]
    dummy.clear()
    Message.objects.retry_deferred()  # an operator puts it back now
    assert _runs(dummy) == [None]


def test_the_admins_retry_action_enqueues_a_run(dummy, admin_client):
    from django.urls import reverse

    from mailer.models import PRIORITY_DEFERRED

    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    Message.objects.update(priority=PRIORITY_DEFERRED)
    dummy.clear()
    admin_client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": "retry", "_selected_action": [Message.objects.get().pk]},
    )
    assert _runs(dummy) == [None]


# --- the task -----------------------------------------------------------------------


def test_a_task_pass_is_bounded_and_enqueues_its_successor(dummy, smtp_settings, smtp_server,
                                                          monkeypatch):
    monkeypatch.setattr(tasks, "TASK_BATCH", 3)
    mailer.send_mass_mail([("s", "b", "f@example.com", ["t@example.com"])] * 7)
    dummy.clear()
    task = tasks.send_queued_mail
    outcomes = []
    for _ in range(3):
        outcomes.append(task.call(_context()))
    assert [o["sent"] for o in outcomes] == [3, 3, 1]
    assert [o["successor"] for o in outcomes] == ["now", "now", None]
    assert _runs(dummy) == [None, None]  # each on the backend the task ran on
    assert len(smtp_server.messages) == 7 and Message.objects.count() == 0


def test_a_route_over_its_quota_gets_a_successor_when_it_is_free(dummy, settings, smtp_settings,
                                                                  smtp_server):
    """Not at once (the worker would spin on the held route): when the quota
    frees, at most MAILER_EMPTY_QUEUE_SLEEP later."""
    from mailer.compat import HAS_MAILERS

    settings.MAILER_ROUTES = {("smtp" if HAS_MAILERS else "default"): {"RATE": "2/d"}}
    mailer.send_mass_mail([("s", "b", "f@example.com", ["t@example.com"])] * 3)
    dummy.clear()
    before = timezone.now()
    outcome = tasks.send_queued_mail.call(_context())
    assert outcome["sent"] == 2 and outcome["held_for"] > 0
    assert outcome["successor"] != "now"
    (run_after,) = _runs(dummy)
    assert before < run_after <= timezone.now() + timedelta(seconds=conf.EMPTY_QUEUE_SLEEP)


def test_a_held_route_does_not_delay_a_batch_that_ran_out(dummy, settings, two_providers):
    """MAILER_EMAIL_MAX_BATCH ended the other route's part: its successor
    runs at once, whatever the held route waits for."""
    settings.MAILER_EMAIL_MAX_BATCH = 2
    settings.MAILER_ROUTES = {
        **settings.MAILER_ROUTES,
        "ses": {**settings.MAILER_ROUTES.get("ses", {}), "RATE": "1/d"},
    }
    mailer.send_mass_mail([("s", "b", "f@example.com", ["t@example.com"])] * 2, using="ses")
    mailer.send_mass_mail([("p", "b", "f@example.com", ["t@example.com"])] * 4)
    dummy.clear()
    outcome = tasks.send_queued_mail.call(_context())
    assert outcome["held_for"] is not None and outcome["successor"] == "now"


def test_max_batch_bounds_the_task_pass(dummy, settings, smtp_settings, smtp_server):
    settings.MAILER_EMAIL_MAX_BATCH = 2
    mailer.send_mass_mail([("s", "b", "f@example.com", ["t@example.com"])] * 3)
    dummy.clear()
    outcome = tasks.send_queued_mail.call(_context())
    assert outcome["sent"] == 2 and outcome["successor"] == "now"


@contextlib.contextmanager
def lock_held_elsewhere():
    """The send_mail file lock held by another thread (as by another pass)."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        acquired, lock = engine.acquire_lock()
        assert acquired
        taken.set()
        done.wait(30)
        engine.release_lock(lock)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        yield
    finally:
        done.set()
        holder.join()


def test_lock_held_the_task_returns_and_looks_again_shortly(dummy, settings, smtp_settings,
                                                           smtp_server, caplog):
    settings.TASKS = {**settings.TASKS, "nodefer": {"BACKEND": "tests.backends.NoDeferTaskBackend"}}
    dummy = tasks.backend("default")  # TASKS changed: a new instance
    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    dummy.clear()
    with lock_held_elsewhere(), caplog.at_level(logging.INFO, logger="mailer"):
        start = timezone.now()
        outcome = tasks.send_queued_mail.call(_context())
        assert outcome["locked_out"] and outcome["sent"] == 0
        # Routine for a task, not cron's ERROR.
        (refusal,) = [r for r in caplog.records if r.msg == "lock already in place. quitting."]
        assert refusal.levelno == logging.INFO
        (run_after,) = _runs(dummy)
        assert start + timedelta(seconds=4) < run_after < timezone.now() + timedelta(seconds=6)
        # A backend that can't defer: no successor (it would run at once,
        # again and again, while the lock is held).
        nodefer = tasks.backend("nodefer")
        outcome = tasks.send_queued_mail.call(_context("nodefer"))
        assert outcome["locked_out"] and outcome["successor"] is None
        assert nodefer.results == []
    assert tasks.send_queued_mail.call(_context())["sent"] == 1


def test_paused_the_task_sends_nothing_and_looks_again_later(dummy, settings, smtp_settings,
                                                            smtp_server):
    settings.MAILER_PAUSE_SEND = True
    settings.MAILER_EMPTY_QUEUE_SLEEP = 30
    mailer.send_mail("s", "b", "f@example.com", ["t@example.com"])
    dummy.clear()
    outcome = tasks.send_queued_mail.call(_context())
    assert outcome["paused"] and smtp_server.messages == []
    (run_after,) = _runs(dummy)
    assert run_after > timezone.now() + timedelta(seconds=25)


def test_a_task_for_one_route(dummy, settings, smtp_settings, smtp_server, second_smtp_server):
    from django.core.exceptions import ImproperlyConfigured

    from mailer.compat import HAS_MAILERS

    ses = {
        "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "OPTIONS": {"host": "127.0.0.1", "port": second_smtp_server.port, "timeout": 10},
    }
    if HAS_MAILERS:
        settings.MAILERS = {**settings.MAILERS, "ses": ses}
    else:
        settings.MAILER_ROUTES = {"ses": ses}
    mailer.send_mail("plain", "b", "f@example.com", ["t@example.com"])
    mailer.send_mail("ses", "b", "f@example.com", ["t@example.com"], using="ses")
    tasks.send_queued_mail.call(_context(), route="ses")
    assert second_smtp_server.subjects() == ["ses"] and smtp_server.messages == []
    with pytest.raises(ImproperlyConfigured, match="'transactional' is not a route"):
        tasks.send_queued_mail.call(_context(), route="transactional")


def test_the_task_is_found_by_its_path(framework):
    from django.utils.module_loading import import_string

    task = import_string("mailer.tasks.send_queued_mail")
    assert task is tasks.send_queued_mail
    assert task.module_path == "mailer.tasks.send_queued_mail" and task.takes_context


# --- checks --------------------------------------------------------------------------


def _task_checks():
    from mailer.checks import check_task_backend

    return [(m.id, f"{m.msg} {m.hint}") for m in check_task_backend()]


def test_checks(framework, settings):
    assert _task_checks() == []  # off
    settings.MAILER_TASK_BACKEND = "default"  # a DummyBackend: defers, has workers (none)
    assert _task_checks() == []
    settings.MAILER_TASK_BACKEND = 3
    assert [i for i, _ in _task_checks()] == ["mailer.E020"]
    settings.MAILER_TASK_BACKEND = "nope"
    ((check_id, text),) = _task_checks()
    assert check_id == "mailer.E020" and "'nope'" in text and "'default'" in text
    prefix = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
    settings.TASKS = {
        **settings.TASKS,
        "now": {"BACKEND": f"{prefix}.backends.immediate.ImmediateBackend"},
        "narrow": {"BACKEND": f"{prefix}.backends.dummy.DummyBackend", "QUEUES": ["other"]},
    }
    settings.MAILER_TASK_BACKEND = "now"
    found = _task_checks()
    assert [i for i, _ in found] == ["mailer.W020", "mailer.W021"]
    assert "inside the request" in found[0][1]
    settings.MAILER_TASK_BACKEND = "narrow"
    ((check_id, text),) = _task_checks()
    assert check_id == "mailer.E020" and "default" in text


def test_check_without_the_framework(settings, monkeypatch):
    monkeypatch.setattr(taskhook, "_framework", None)
    settings.MAILER_TASK_BACKEND = "default"
    ((check_id, text),) = _task_checks()
    assert check_id == "mailer.E020" and "django-tasks" in text


# --- django-tasks-db's worker, real subprocesses --------------------------------------


@pytest.fixture
def tasks_db(framework, settings, manage):
    """django-tasks-db's backend ("mail") for this process and its workers."""
    if test_settings.TASKS_DB_UNSUPPORTED:
        pytest.skip(test_settings.TASKS_DB_UNSUPPORTED)
    if not test_settings.HAS_TASKS_DB:
        _unavailable("django-tasks-db")
    settings.MAILER_TASK_BACKEND = "mail"
    manage.env["MAILER_TEST_TASK_BACKEND"] = "mail"
    return manage


@contextlib.contextmanager
def db_workers(manage, tmp_path, count: int = 1):
    """``count`` ``db_worker`` processes (polling every 0.1 s); stopped with
    SIGTERM on the way out, their output shown if the test failed."""
    procs = []
    for n in range(count):
        out = open(tmp_path / f"worker{n}.log", "w")  # closed below
        proc = subprocess.Popen(
            manage.command("db_worker", "--backend", "mail", "--interval", "0.1",
                           "--no-startup-delay", "--no-reload"),
            cwd=test_settings.__file__.rsplit("/tests/", 1)[0], env=manage.env,
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        procs.append((proc, out))
    try:
        yield [p for p, _ in procs]
    except BaseException:
        for n in range(count):
            print(f"--- worker{n}.log ---\n" + (tmp_path / f"worker{n}.log").read_text())
        raise
    finally:
        for proc, _out in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, out in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()


def _task_results():
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.all()


def _wait_idle(timeout: float = 30) -> None:
    """Until every enqueued task has run (none ready now or running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _task_results().ready().exists() and not _task_results().running().exists():
            return
        time.sleep(0.1)
    raise AssertionError("tasks still waiting or running")


@pytest.mark.slow
def test_db_worker_delivers_committed_mail_at_its_time(tasks_db, tmp_path, smtp_server):
    """No cron, no runmailer: a committed transaction's mail arrives, a
    rolled-back one's never does; a scheduled message and an automatic
    retry go out at their time."""
    tasks_db.env.update(MAILER_TEST_AUTO_RETRY="1", MAILER_TEST_RETRY_DELAY="1")
    smtp_server.fail_first = 1  # the first message gets a 451, then is retried
    with db_workers(tasks_db, tmp_path):
        with transaction.atomic():
            mailer.send_mail("committed", "b", "f@example.com", ["t@example.com"])
        with contextlib.suppress(RuntimeError), transaction.atomic():
            mailer.send_mail("rolled back", "b", "f@example.com", ["t@example.com"])
            raise RuntimeError
        send_at = timezone.now() + timedelta(seconds=3)
        mailer.send_mail("scheduled", "b", "f@example.com", ["t@example.com"], send_at=send_at)
        smtp_server.wait_for(2, timeout=30)
        _wait_idle()
    assert sorted(smtp_server.subjects()) == ["committed", "scheduled"]
    assert smtp_server.attempts == 3  # one 451, then both accepted
    failed_at, *accepted_at = smtp_server.attempt_times
    by_subject = dict(zip(smtp_server.subjects(), accepted_at, strict=True))
    assert by_subject["committed"] >= failed_at + 0.85  # the retry's time (1 s, jitter)
    assert by_subject["scheduled"] >= send_at.timestamp()
    assert Message.objects.count() == 0
    # One task for the commit, one for the schedule, one for the retry: none
    # for the rolled-back transaction, and none failed.
    results = _task_results()
    assert results.count() == 3
    assert results.successful().count() == 3


@pytest.mark.slow
def test_two_db_workers_and_cron_send_1000_messages_exactly_once(tasks_db, tmp_path,
                                                                 smtp_server):
    if connection.vendor != "sqlite":
        # Row locks keep the workers apart; the file lock would only take turns.
        tasks_db.env["MAILER_TEST_NO_FILE_LOCK"] = "1"
    total, per_transaction = 1000, 50
    with db_workers(tasks_db, tmp_path, count=2):
        cron: list = []
        for start in range(0, total, per_transaction):
            with transaction.atomic():
                if start % 100:
                    mailer.send_mass_mail(
                        [(f"m{start + i}", "b", "f@example.com", ["t@example.com"])
                         for i in range(per_transaction)]
                    )
                else:
                    for i in range(per_transaction):
                        mailer.send_mail(f"m{start + i}", "b", "f@example.com", ["t@example.com"])
            if start == total // 2:  # cron's send_mail joins in halfway
                thread = threading.Thread(target=lambda: cron.append(tasks_db.run("send_mail")))
                thread.start()
        smtp_server.wait_for(total, timeout=120)
        thread.join(timeout=60)
        _wait_idle(60)
    assert cron and cron[0].returncode == 0
    ids = smtp_server.message_ids()
    assert len(ids) == total and len(set(ids)) == total
    assert sorted(smtp_server.subjects()) == sorted(f"m{i}" for i in range(total))
    assert Message.objects.count() == 0
    assert MessageLog.objects.count() == total
    assert not _task_results().failed().exists()
