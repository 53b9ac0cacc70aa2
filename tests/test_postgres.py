"""``runmailer_pg``: LISTEN/NOTIFY delivery, collapse, faults, shutdown, no duplicates.

Most tests run the command in a subprocess (``manage``) with
``MAILER_EMPTY_QUEUE_SLEEP`` at 60 s, so a delivery within the test's deadline
comes from a notification, never from the periodic pass. Nothing here asserts
a duration: every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from django.db import connection, transaction

import mailer
from mailer import engine
from mailer.models import Message, MessageLog
from mailer.postgres import (
    CHANNEL,
    FUNCTION_NAME,
    LISTEN_CONNECTION_DEFAULTS,
    TRIGGER_NAME,
    Listener,
    PostgresWorker,
    get_driver,
    install_trigger,
    listen_connection_params,
)
from tests.conftest import Manage, free_port

pytestmark = [pytest.mark.postgres]

LISTENER_APP = LISTEN_CONNECTION_DEFAULTS["application_name"]
IDLE = "60"  # seconds: far beyond every deadline below


# --- helpers ---------------------------------------------------------------------------


class Running:
    """A ``runmailer_pg`` subprocess whose output is collected as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (proc.stdout, proc.stderr)
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self.lock:
            return "\n".join(self.lines)

    def count(self, text: str) -> int:
        with self.lock:
            return sum(text in line for line in self.lines)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(text) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"{text!r} not logged {count} time(s) (exit code {self.proc.poll()}):\n{self.log}"
        )

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop on {signum!r}:\n{self.log}") from None
        for reader in self.readers:
            reader.join(5)
        return code


@pytest.fixture
def start(manage, tmp_path):
    """Start ``runmailer_pg`` subprocesses; each is stopped after the test."""
    started: list[Running] = []

    def start_one(*args: str, env: dict | None = None, wait: bool = True) -> Running:
        full_env = {**manage.env, "MAILER_TEST_EMPTY_QUEUE_SLEEP": IDLE, **(env or {})}
        proc = Manage(env=full_env).popen("runmailer_pg", *args)
        running = Running(proc)
        started.append(running)
        if wait:
            running.wait_for_log("Listening on channel")
        return running

    yield start_one
    for running in started:
        if running.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                running.signal(signal.SIGTERM, timeout=15)


def queue(n: int, prefix: str = "msg") -> list[str]:
    """Queue ``n`` messages in one transaction (committed on return)."""
    subjects = [f"{prefix} {i}" for i in range(n)]
    with transaction.atomic():
        for subject in subjects:
            mailer.send_mail(subject, "body", "from@example.com", ["to@example.com"])
    return subjects


def wait_until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def backend_pids(where: str = "", params: tuple = ()) -> list[int]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()" + where,
            params,
        )
        return [row[0] for row in cur.fetchall()]


def terminate(pids: list[int]) -> None:
    with connection.cursor() as cur:
        for pid in pids:
            cur.execute("SELECT pg_terminate_backend(%s)", [pid])


def raw_connection():
    driver = get_driver("default")
    params = listen_connection_params("default", driver)
    conn = driver.module.connect(**params)
    conn.autocommit = True
    return driver, conn


def table() -> str:
    return connection.ops.quote_name(Message._meta.db_table)


# --- the trigger -------------------------------------------------------------------------


def trigger_rows() -> list[tuple]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT t.tgname, t.tgtype, p.proname FROM pg_trigger t "
            "JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE t.tgrelid = %s::regclass AND NOT t.tgisinternal",
            [table()],
        )
        return cur.fetchall()


def test_install_replaces_a_row_trigger_and_is_idempotent(transactional_db):
    # The row-level form django-mailer 2.3.2 installs.
    with connection.cursor() as cur:
        cur.execute(f"DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {table()}")
        cur.execute(
            f"CREATE OR REPLACE FUNCTION {FUNCTION_NAME}() RETURNS trigger AS $$ BEGIN "
            f"PERFORM pg_notify('{CHANNEL}', NEW.id::text); RETURN NEW; END; $$ "
            "LANGUAGE plpgsql"
        )
        cur.execute(
            f"CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT ON {table()} "
            f"FOR EACH ROW EXECUTE FUNCTION {FUNCTION_NAME}()"
        )
    driver, conn = raw_connection()
    try:
        assert install_trigger(conn, table(), driver) == "replaced"
        assert install_trigger(conn, table(), driver) == "kept"
    finally:
        conn.close()
    # AFTER INSERT (4) FOR EACH STATEMENT (no ROW bit), one trigger.
    assert trigger_rows() == [(TRIGGER_NAME, 4, FUNCTION_NAME)]


def read_notifications(driver, conn, quiet: float = 0.3, first: float = 10) -> int:
    """Count notifications on ``conn``: wait up to ``first`` s, then until ``quiet`` s of silence."""
    count = 0
    timeout = first
    while select.select([conn.fileno()], [], [], timeout)[0]:
        timeout = quiet
        if driver.is_psycopg3:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                count += 1
        else:
            conn.poll()
            count += len(conn.notifies)
            del conn.notifies[:]
    return count


def test_one_notification_per_transaction_none_on_rollback(transactional_db):
    driver, conn = raw_connection()
    try:
        install_trigger(conn, table(), driver)
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        queue(50, "single")  # 50 INSERT statements, one transaction
        assert read_notifications(driver, conn) == 1
        datatuple = [(f"mass {i}", "b", "f@example.com", ["t@example.com"]) for i in range(100)]
        assert mailer.send_mass_mail(datatuple) == 100  # one bulk INSERT
        assert read_notifications(driver, conn) == 1
        with transaction.atomic():
            queue(5, "doomed")
            transaction.set_rollback(True)
        queue(1, "marker")
        # The marker's notification only: the rolled-back one sent none.
        assert read_notifications(driver, conn) == 1
    finally:
        conn.close()


# --- delivery -------------------------------------------------------------------------------


def test_delivers_on_commit_not_on_rollback(start, smtp_server):
    running = start("--debug")
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            queue(1, "rolled back")
            raise RuntimeError("roll back")
    queue(1, "committed")
    smtp_server.wait_for(1)
    # --debug: the notification itself is logged.
    running.wait_for_log("notification(s) on django_mailer_new_message")
    queue(1, "second")
    smtp_server.wait_for(2)
    wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    assert sorted(smtp_server.subjects()) == ["committed 0", "second 0"]
    assert running.signal() == 0


def test_burst_is_sent_in_a_few_passes(start, smtp_server):
    running = start()
    queue(300, "burst")
    smtp_server.wait_for(300, timeout=120)
    wait_until(lambda: running.count("Pass done") >= 1 and not Message.objects.exists())
    passes = running.count("Pass done")
    assert 1 <= passes <= 3, running.log
    assert len(set(smtp_server.message_ids())) == 300


def test_probe_keeps_an_idle_connection_checked(start, smtp_server):
    running = start("--debug", "--probe-interval", "0.2")
    running.wait_for_log("Probe of the LISTEN connection: alive", count=3)
    queue(1)
    smtp_server.wait_for(1)


def test_worker_in_process(transactional_db, smtp_settings, smtp_server, settings):
    """The same loop without a subprocess: notification, collapse, stop."""
    from django.db import connections

    settings.MAILER_EMPTY_QUEUE_SLEEP = 60
    worker = PostgresWorker(install_signal_handlers=False)
    result: dict = {}

    def run() -> None:
        try:
            result["passes"] = worker.run()
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.listener.conn is not None, what="the listener")
        queue(20, "in process")
        smtp_server.wait_for(20)
        queue(1, "again")
        smtp_server.wait_for(21)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert 1 <= result["passes"] <= 4
    assert worker.listener.conn is None


def test_woken_whenever_mail_becomes_sendable(
    transactional_db, smtp_settings, smtp_server, settings, admin_client
):
    """Not only INSERTs wake the worker: retry_deferred, the admin's Retry,
    requeue(), and a deferral with an automatic retry made by another process
    (send_mail, the admin's Send now) all do, long before the idle pass."""
    import datetime as dt

    from django.core.management import call_command
    from django.db import connections
    from django.urls import reverse
    from django.utils import timezone

    from mailer.models import PRIORITY_DEFERRED

    settings.MAILER_EMPTY_QUEUE_SLEEP = 60
    settings.MAILER_AUTO_RETRY = True
    worker = PostgresWorker(install_signal_handlers=False)
    thread = threading.Thread(
        target=lambda: (worker.run(), connections.close_all()), daemon=True
    )
    later = timezone.now() + dt.timedelta(hours=2)

    def waiting(subject: str) -> Message:
        """Queued (an INSERT: the worker looks), but nothing it can send."""
        mailer.send_mail(subject, "b", "f@example.com", ["t@example.com"], send_at=later)
        message = Message.objects.get(subject_text=subject)
        time.sleep(0.3)  # the worker has looked and gone back to its 60 s wait
        return message

    thread.start()
    try:
        wait_until(lambda: worker.listener.conn is not None, what="the listener")
        # retry_deferred (the command)
        msg = waiting("retried")
        # Deferred by a plain UPDATE (which wakes nobody), then retried.
        Message.objects.filter(pk=msg.pk).update(priority=PRIORITY_DEFERRED, not_before=None)
        time.sleep(0.3)
        call_command("retry_deferred")
        smtp_server.wait_for(1, timeout=10)
        # the admin's Retry
        msg = waiting("admin")
        Message.objects.filter(pk=msg.pk).update(priority=PRIORITY_DEFERRED, not_before=None)
        time.sleep(0.3)
        admin_client.post(
            reverse("admin:mailer_message_changelist"),
            {"action": "retry", "_selected_action": [msg.pk]},
        )
        smtp_server.wait_for(2, timeout=10)
        # requeue()
        waiting("requeued").requeue()
        smtp_server.wait_for(3, timeout=10)
        # Deferred by another process with an automatic retry in 1 s.
        retry_at = timezone.now() + dt.timedelta(seconds=1)
        waiting("auto retry").defer(retry_at)
        smtp_server.wait_for(4, timeout=10)
    finally:
        worker.stop()
        thread.join(30)
    assert smtp_server.subjects() == ["retried", "admin", "requeued", "auto retry"]
    assert 0 <= smtp_server.attempt_times[3] - retry_at.timestamp() < 1.0


def test_runmailer_goes_on_at_once_after_its_backend_is_killed_mid_pass(
    transactional_db, smtp_settings, smtp_server, settings, caplog
):
    """pg_terminate_backend in the middle of a pass: reconnect and go on,
    not after the 60 s idle period (runmailer's loop, on PostgreSQL)."""
    from django.db import connections

    from mailer.worker import Worker

    queue(200, "killed")
    worker = Worker(sleep=60, install_signal_handlers=False)
    thread = threading.Thread(
        target=lambda: (worker.run(), connections.close_all()), daemon=True
    )
    thread.start()
    try:
        wait_until(lambda: len(smtp_server.messages) >= 20, what="a pass under way")
        terminate(backend_pids())
        killed_at = time.monotonic()
        smtp_server.wait_for(200, timeout=15)
        assert time.monotonic() - killed_at < 10
    finally:
        worker.stop()
        thread.join(30)
    assert "Database connection lost (" in caplog.text
    assert "Traceback" not in caplog.text and "Pass failed" not in caplog.text


def test_paced_messages_one_connection_and_no_has_work_query(
    transactional_db, smtp_settings, smtp_server, settings
):
    """Commit, notification, delivery: the pass runs on the SMTP connection
    and the statements kept from the pass before, without first asking
    whether there is work, and without looking again once the queue is empty."""
    from django.db import connections

    settings.MAILER_EMPTY_QUEUE_SLEEP = 60
    worker = PostgresWorker(install_signal_handlers=False)
    statements: list[str] = []
    sessions: set[int] = set()
    result: dict = {}

    def record(execute, sql, params, many, context):
        statements.append(sql)
        raw = context["connection"].connection
        info = getattr(raw, "info", None)  # psycopg 3, else psycopg2
        sessions.add(info.backend_pid if info is not None else raw.get_backend_pid())
        return execute(sql, params, many, context)

    def run() -> None:
        try:
            with connections["default"].execute_wrapper(record):
                result["passes"] = worker.run()
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.listener.conn is not None, what="the listener")
        queue(1, "first")
        smtp_server.wait_for(1)
        time.sleep(0.2)
        before = len(statements)
        sessions.clear()
        for n in range(2, 7):
            queue(1, f"paced {n}")
            smtp_server.wait_for(n)
            time.sleep(0.1)
        paced = statements[before:]
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert smtp_server.connections == 1
    assert len(sessions) == 1  # one database connection, kept between passes
    # Per message: the don't-send list (read once per pass), the claim, the
    # log entry with the delete (one statement), the claim that finds the
    # queue empty, and the look at the not_before index for the earliest
    # scheduled message or retry to wake for (a notification doesn't say
    # when its message is due).
    assert not any("EXISTS" in sql.upper() for sql in paced), paced
    assert len(paced) == 5 * 5, paced
    assert sum('"not_before" IS NOT NULL' in sql for sql in paced) == 5, paced


def test_scheduled_message_and_due_retry_go_out_on_time(start, smtp_server):
    """Woken by the NOTIFY of a scheduled message, the worker sleeps until it
    is due (not the 60 s idle period); the same for an automatic retry."""
    import datetime as dt

    from django.utils import timezone

    running = start(env={"MAILER_TEST_AUTO_RETRY": "1", "MAILER_TEST_RETRY_DELAY": "2"})
    smtp_server.fail_first = 1
    queue(1, "now")
    send_at = timezone.now() + dt.timedelta(seconds=3)
    mailer.send_mail("scheduled", "b", "f@example.com", ["t@example.com"], send_at=send_at)
    smtp_server.wait_for(2, timeout=20)
    first, retried, scheduled = smtp_server.attempt_times
    assert 1.8 <= retried - first < 3.0, running.log
    assert 0 <= scheduled - send_at.timestamp() < 1.0, running.log


def test_claim_is_one_scan_of_the_sending_order_index(transactional_db):
    """EXPLAIN of the compiled claim: the keyset and the due filter use one
    index scan, whatever the table holds."""
    import datetime as dt

    from django.utils import timezone

    from mailer.engine import _PassQueries, prioritize

    now = timezone.now()
    rows = []
    for i in range(3000):
        row = Message(priority=1 + i % 4, not_before=now + dt.timedelta(hours=i % 3) if i % 5 else None)
        row.message_data = "x"
        rows.append(row)
    Message.objects.bulk_create(rows)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE " + table())
    queries = _PassQueries(prioritize(), "default", lock_rows=True)
    with transaction.atomic(), connection.cursor() as cursor:
        sql, params, positions, _, _ = queries._compile()
        params = list(params)
        for position, value in zip(positions, (*queries.first_key(), now), strict=True):
            params[position] = value
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(line for (line,) in cursor.fetchall())
    assert "Index Scan using mailer_msg_sending_order" in plan, plan
    assert "Sort" not in plan and "Seq Scan" not in plan, plan
    assert "not_before" in plan, plan
    # The loops' "when is the next message due": a walk of the not_before index.
    for retries in (False, True):
        qs = Message.objects.filter(not_before__isnull=False)
        if not retries:
            qs = qs.non_deferred()
        sql, params = qs.order_by("not_before").values_list("not_before")[:1].query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN " + sql, params)
            plan = "\n".join(line for (line,) in cursor.fetchall())
        assert "Scan using mailer_msg_not_before" in plan, plan
        assert "Sort" not in plan, plan


# --- faults -------------------------------------------------------------------------------


def test_reconnects_after_the_listener_is_killed(start, smtp_server):
    running = start()
    queue(1, "before")
    smtp_server.wait_for(1)
    pids = backend_pids(" AND application_name = %s", (LISTENER_APP,))
    assert len(pids) == 1
    terminate(pids)
    running.wait_for_log("Reconnected after")
    assert running.count("Reconnecting the LISTEN connection in") >= 1
    queue(1, "after")
    smtp_server.wait_for(2)
    assert sorted(smtp_server.subjects()) == ["after 0", "before 0"]


PERSISTENT = {"MAILER_TEST_CONN_MAX_AGE": "none"}  # Django's connection outlives a pass


@pytest.mark.parametrize("env", [{}, PERSISTENT], ids=["conn-per-pass", "persistent-conn"])
def test_recovers_when_every_connection_is_killed(start, smtp_server, env):
    """As after a server restart: the listener and Django's connection both die."""
    running = start(env=env)
    queue(1, "before")
    smtp_server.wait_for(1)
    # Killing the worker between the SMTP server's "250" and its COMMIT would
    # (rightly, at-least-once) send "before" again: wait for the record.
    wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    killed = backend_pids()
    # The listener, and Django's connection when it is open (always, when
    # persistent; usually otherwise, as the idle worker's last query opened it).
    assert len(killed) >= (2 if env else 1)
    # Queue in the same transaction that kills them: whether or not the
    # notification reaches the listener before it dies, the message must go
    # (by notification, or by the full pass after reconnecting).
    with transaction.atomic():
        queue(1, "during")
        terminate(killed)
    running.wait_for_log("Reconnected after")
    smtp_server.wait_for(2)
    queue(1, "after")
    smtp_server.wait_for(3)
    assert sorted(smtp_server.subjects()) == ["after 0", "before 0", "during 0"]
    assert running.proc.poll() is None
    assert "Traceback" not in running.log


def test_recovers_when_djangos_connection_is_killed(start, smtp_server):
    """Only the connection the passes use dies; the next pass replaces it."""
    running = start(env=PERSISTENT)
    queue(1, "before")
    smtp_server.wait_for(1)
    wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    pids = backend_pids(" AND application_name <> %s", (LISTENER_APP,))
    assert len(pids) == 1
    terminate(pids)
    queue(1, "after")
    smtp_server.wait_for(2)
    running.wait_for_log("Database error")
    assert sorted(smtp_server.subjects()) == ["after 0", "before 0"]
    assert "Traceback" not in running.log


class FreezingProxy:
    """A TCP proxy to PostgreSQL whose open connections can go silent.

    ``freeze()`` stops forwarding on every connection open now, without
    closing anything: to the client the server looks alive at the TCP level
    but never answers (a dropped NAT entry, a dead host). New connections are
    forwarded as usual.
    """

    def __init__(self, host: str, port: int, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.server.getsockname()[1]
        self.frozen: set[int] = set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.generation = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            gen = self.generation
            self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, gen), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if gen in self.frozen:
                    continue  # swallowed
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def freeze(self) -> None:
        self.frozen.add(self.generation)
        self.generation += 1

    def close(self) -> None:
        self.stopped = True
        self.server.close()
        for pair in self.pairs:
            for sock in pair:
                # shutdown() first: close() alone leaves the connection open
                # while a forwarding thread is blocked in recv() on it.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


def test_probe_detects_a_silently_dead_connection(transactional_db):
    """A connection that stops answering is found by the probe and replaced."""
    settings_dict = connection.settings_dict
    proxy = FreezingProxy(settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432))
    notified = threading.Event()
    reconnected = threading.Event()
    listener = Listener(
        "default",
        get_driver("default"),
        on_notify=lambda count: notified.set(),
        on_reconnect=reconnected.set,
        probe_interval=0.3,
        probe_timeout=1.0,
    )
    listener.params.update(host="127.0.0.1", port=proxy.port)
    try:
        listener.start()
        assert listener.conn is not None
        queue(1, "alive")
        assert notified.wait(10)
        proxy.freeze()
        assert reconnected.wait(20), "the silent connection was not replaced"
        notified.clear()
        queue(1, "after")
        assert notified.wait(10)
    finally:
        listener.stop()
        proxy.close()


# --- several workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_lock", [True, False], ids=["file-lock", "no-file-lock"])
def test_two_listeners_and_cron_send_each_message_once(start, manage, smtp_server, file_lock):
    env = {} if file_lock else {"MAILER_TEST_NO_FILE_LOCK": "1"}
    workers = [start(env=env), start(env=env)]
    cron_env = Manage(env={**manage.env, **env})
    crons = []
    for batch in range(20):
        queue(10, f"b{batch}")
        if batch % 5 == 0:
            crons.append(cron_env.popen("send_mail"))
    smtp_server.wait_for(200, timeout=120)
    for cron in crons:
        cron.communicate(timeout=60)
        assert cron.returncode == 0
    wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    for worker in workers:
        assert worker.signal() == 0, worker.log
    # Everything has stopped: whatever was sent has arrived.
    ids = smtp_server.message_ids()
    assert len(ids) == 200
    assert len(set(ids)) == 200
    assert MessageLog.objects.count() == 200


def test_locked_out_worker_retries_soon(start, smtp_server):
    """A notification taken while another process holds the file lock isn't lost."""
    acquired, lock = engine.acquire_lock()
    assert acquired
    try:
        running = start("--debug")
        queue(1, "while locked")
        running.wait_for_log("File lock held elsewhere; trying again in")
    finally:
        engine.release_lock(lock)
    # Long before the 60 s idle pass.
    smtp_server.wait_for(1, timeout=20)


def test_lock_directory_missing_then_created(start, smtp_server, tmp_path):
    """Reported once, retried with a growing pause (notifications wake it
    early), and mail goes out once the directory exists."""
    lock_dir = tmp_path / "locks"
    running = start(
        "--skip-checks", "--debug", env={"MAILER_TEST_LOCK_PATH": str(lock_dir / "send_mail")}
    )
    queue(1, "no lock dir")
    running.wait_for_log("still can't be created")
    assert smtp_server.messages == []
    lock_dir.mkdir()
    queue(1, "wakes it")
    smtp_server.wait_for(2, timeout=20)
    running.wait_for_log("sending resumes")
    assert running.count("Can't create the send_mail lock file") == 1
    assert "Traceback" not in running.log and "Pass failed" not in running.log
    assert running.signal() == 0


# --- shutdown -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(start, signum):
    running = start()
    assert running.signal(signum) == 0
    assert "Stopped listening on channel" in running.log
    assert "Worker stopped" in running.log
    assert "Traceback" not in running.log
    assert backend_pids(" AND application_name = %s", (LISTENER_APP,)) == []


def test_sigterm_finishes_the_message_in_flight(start, smtp_server):
    smtp_server.delay = 2.0
    running = start()
    queue(3, "slow")
    wait_until(lambda: smtp_server.connections >= 1, what="an SMTP session")
    assert running.signal() == 0
    delivered = len(smtp_server.messages)
    assert delivered >= 1  # the one in flight was finished...
    assert Message.objects.count() == 3 - delivered  # ...and recorded; the rest wait
    assert MessageLog.objects.count() == delivered
    assert "stopped" in running.log


# --- clear errors ---------------------------------------------------------------------------


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "CommandError" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_not_postgresql_is_a_clear_error(manage, tmp_path):
    sqlite = Manage(
        env={
            **manage.env,
            "MAILER_TEST_DB": "sqlite",
            "MAILER_TEST_DB_NAME": str(tmp_path / "queue.sqlite3"),
        }
    )
    proc = sqlite.run("runmailer_pg", check=False, timeout=60)
    assert_clean_error(proc, "PostgreSQL", "sqlite")


ROUTED_SETTINGS = """
from tests.settings import *  # noqa: F401,F403
from tests.settings import DATABASES as _TEST_DATABASES

# The site itself on SQLite; the mail queue routed to PostgreSQL.
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": %(sqlite)r},
    "mailq": _TEST_DATABASES["default"],
}
DATABASE_ROUTERS = ["routed_router.MailerRouter"]
"""

ROUTED_ROUTER = """
class MailerRouter:
    def db_for_read(self, model, **hints):
        return "mailq" if model._meta.app_label == "mailer" else None

    db_for_write = db_for_read
"""


def test_missing_driver_is_a_clear_error(manage, tmp_path):
    """The queue's database is PostgreSQL but neither psycopg nor psycopg2 loads.

    (When the *default* database is PostgreSQL, Django itself can't start
    without a driver: its models need ``connection.ops`` at import, long
    before any command runs. Here the site runs on SQLite and only the queue
    is routed to PostgreSQL, so the command gets to say what is wrong.)
    """
    (tmp_path / "routed_settings.py").write_text(
        ROUTED_SETTINGS % {"sqlite": str(tmp_path / "site.sqlite3")}
    )
    (tmp_path / "routed_router.py").write_text(ROUTED_ROUTER)
    for name in ("psycopg", "psycopg2"):
        (tmp_path / f"{name}.py").write_text('raise ImportError("hidden by the test")\n')
    env = {**manage.env, "PYTHONPATH": os.pathsep.join([str(tmp_path), manage.env["PYTHONPATH"]])}
    proc = subprocess.run(
        [sys.executable, "-m", "django", "runmailer_pg", "--settings=routed_settings"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_error(proc, "psycopg", "driver")


def test_keepalive_defaults_yield_to_database_options(db):
    driver = get_driver("default")
    params = listen_connection_params("default", driver)
    assert params["keepalives"] == 1
    assert "cursor_factory" not in params
    assert params["application_name"] == LISTENER_APP
    assert re.fullmatch(r"\d+", str(params["keepalives_idle"]))
    connection.settings_dict["OPTIONS"]["keepalives_idle"] = 5
    try:
        assert listen_connection_params("default", driver)["keepalives_idle"] == 5
    finally:
        del connection.settings_dict["OPTIONS"]["keepalives_idle"]


def test_shows_its_work_without_logging_config(start, smtp_server):
    """A new project has no LOGGING: the start-up lines of docs/runmailer_pg.rst still show."""
    running = start(env={"MAILER_TEST_NO_LOGGING": "1"})
    assert " INFO mailer.worker: Worker started" in running.log
    assert " INFO mailer.postgres: Listening on channel django_mailer_new_message" in running.log
    queue(1, "shown")
    running.wait_for_log("Pass done: sent 1")
    assert running.signal(signal.SIGTERM) == 0
    assert "Stopped listening on channel" in running.log
    assert "runmailer_pg: stopped after" in running.log


# --- a database user with fewer rights ------------------------------------------------------


@pytest.fixture
def limited_role(transactional_db):
    """A login role that may use the tables but not create functions or triggers.

    (PostgreSQL 15+ lets only the schema's owner create in ``public``.) The
    trigger is put back afterwards, as the superuser installs it.
    """
    role = f"mailer_limited_{os.getpid()}"
    with connection.cursor() as cur:
        cur.execute(f'CREATE ROLE "{role}" LOGIN')
        cur.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
        cur.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    try:
        yield role
    finally:
        with connection.cursor() as cur:
            cur.execute(f'DROP OWNED BY "{role}"')
            cur.execute(f'DROP ROLE "{role}"')
        driver, conn = raw_connection()
        try:
            install_trigger(conn, table(), driver)
        finally:
            conn.close()


def test_no_right_to_install_the_trigger_is_a_clear_error(start, limited_role):
    with connection.cursor() as cur:
        cur.execute(f"DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {table()}")
    running = start(env={"MAILER_TEST_PG_USER": limited_role}, wait=False)
    code = running.proc.wait(60)
    for reader in running.readers:
        reader.join(5)
    assert code == 1, running.log
    assert "CommandError" in running.log
    assert "Traceback" not in running.log, running.log
    assert f"could not install trigger {TRIGGER_NAME}" in running.log
    assert "Grant the database user" in running.log
    assert trigger_rows() == []


def test_no_right_to_update_the_trigger_uses_the_one_in_place(start, limited_role, smtp_server):
    driver, conn = raw_connection()
    try:
        install_trigger(conn, table(), driver)
    finally:
        conn.close()
    running = start(env={"MAILER_TEST_PG_USER": limited_role})
    assert f"Could not update trigger {TRIGGER_NAME}" in running.log
    assert "using the one in place" in running.log
    subjects = queue(2, "limited")
    smtp_server.wait_for(2)
    assert sorted(smtp_server.subjects()) == subjects
    assert running.signal(signal.SIGTERM) == 0


def test_disabled_trigger_is_reported(start):
    driver, conn = raw_connection()
    try:
        install_trigger(conn, table(), driver)
        with conn.cursor() as cur:
            cur.execute(f"ALTER TABLE {table()} DISABLE TRIGGER {TRIGGER_NAME}")
        running = start()
        assert f"Trigger {TRIGGER_NAME} on {table()} is disabled" in running.log
        assert running.signal(signal.SIGTERM) == 0
    finally:
        with conn.cursor() as cur:
            cur.execute(f"ALTER TABLE {table()} ENABLE TRIGGER {TRIGGER_NAME}")
        conn.close()


def test_probe_interval_must_be_positive(manage):
    proc = manage.run("runmailer_pg", "--probe-interval", "0", check=False)
    assert_clean_error(proc, "--probe-interval must be a positive number")


def test_listener_started_while_the_database_is_down_connects_once_it_is_up(
    transactional_db, caplog
):
    """No LISTEN connection at start: retried with backoff in the background until one opens."""
    caplog.set_level(logging.WARNING, logger="mailer")
    settings_dict = connection.settings_dict
    port = free_port()  # nothing listens here until the proxy starts
    notified = threading.Event()
    reconnected = threading.Event()
    listener = Listener(
        "default",
        get_driver("default"),
        on_notify=lambda count: notified.set(),
        on_reconnect=reconnected.set,
        reconnect_delay=0.1,
        reconnect_delay_cap=0.4,
    )
    listener.params.update(host="127.0.0.1", port=port)
    proxy = None
    try:
        listener.start()
        assert listener.conn is None
        assert "Could not open the LISTEN connection" in caplog.text
        wait_until(
            lambda: caplog.text.count("Reconnection attempt") >= 2, what="failed reconnections"
        )
        assert not reconnected.is_set()
        proxy = FreezingProxy(
            settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432), port
        )
        assert reconnected.wait(20), "did not connect once the database was reachable"
        queue(1, "up")
        assert notified.wait(10)
    finally:
        listener.stop()
        if proxy is not None:
            proxy.close()
    # stop() closed it (the server notices through the proxy a moment later).
    wait_until(
        lambda: not backend_pids(" AND application_name = %s", (LISTENER_APP,)),
        what="the LISTEN connection to close",
    )


def test_concurrency_option(start, smtp_server):
    """runmailer_pg --concurrency N: N messages in flight, each sent once."""
    smtp_server.delay = 0.3
    running = start("--concurrency", "3")
    queue(9, "lanes")
    smtp_server.wait_for(9, timeout=60)
    wait_until(lambda: not Message.objects.exists(), what="an empty queue")
    assert smtp_server.max_active == 3
    ids = smtp_server.message_ids()
    assert len(ids) == len(set(ids)) == 9
    assert running.signal() == 0
