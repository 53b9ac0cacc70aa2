"""The management commands, in process and as real subprocesses."""

import signal
import subprocess
import threading
import time
from unittest.mock import patch

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import mailer
from mailer.models import (
    PRIORITY_DEFERRED,
    RESULT_DONT_SEND,
    RESULT_FAILURE,
    RESULT_SUCCESS,
    Message,
    MessageLog,
)
from tests.conftest import ROOT


def queue(n, prefix="S"):
    for i in range(n):
        mailer.send_mail(f"{prefix} {i}", "b", "f@example.com", [f"t{i}@example.com"])


@pytest.mark.django_db(transaction=True)
def test_send_mail_prints_a_summary(smtp_settings, smtp_server, capsys):
    queue(3)
    call_command("send_mail")
    out = capsys.readouterr().out
    assert "send_mail: sent 3, deferred 0, failed 0 in" in out


@pytest.mark.django_db
def test_send_mail_paused(settings, capsys):
    settings.MAILER_PAUSE_SEND = True
    queue(1)
    call_command("send_mail")
    assert "MAILER_PAUSE_SEND" in capsys.readouterr().out
    assert Message.objects.count() == 1


@pytest.mark.django_db
def test_cron_option_is_accepted_with_a_warning(settings, capsys):
    settings.MAILER_PAUSE_SEND = True
    with pytest.warns(DeprecationWarning, match="--cron"):
        call_command("send_mail", "--cron", "1")
    with pytest.warns(DeprecationWarning):
        call_command("retry_deferred", "-c", "1")


@pytest.mark.django_db
def test_retry_deferred(capsys, settings):
    queue(3)
    for m in Message.objects.all()[:2]:
        m.defer()
    call_command("retry_deferred")
    assert "2 message(s)" in capsys.readouterr().out
    assert Message.objects.deferred().count() == 0
    assert sorted(Message.objects.values_list("retry_count", flat=True)) == [0, 1, 1]


@pytest.mark.django_db
def test_retry_deferred_respects_max_retries(settings):
    settings.MAILER_EMAIL_MAX_RETRIES = 1
    queue(1)
    m = Message.objects.get()
    m.defer()
    assert Message.objects.retry_deferred() == 1
    Message.objects.get().defer()
    assert Message.objects.retry_deferred() == 0
    settings.MAILER_EMAIL_MAX_RETRIES = 0
    assert Message.objects.retry_deferred() == 0


@pytest.mark.django_db
def test_retry_deferred_says_what_it_left_behind(settings, capsys):
    settings.MAILER_EMAIL_MAX_RETRIES = 1
    queue(3)
    Message.objects.update(priority=PRIORITY_DEFERRED)
    Message.objects.filter(pk__in=list(Message.objects.values_list("pk", flat=True)[:2])).update(
        retry_count=1
    )
    call_command("retry_deferred")
    out = capsys.readouterr().out
    assert "retry_deferred: 1 message(s) back on the queue" in out
    assert "2 message(s) left deferred: retry_count reached MAILER_EMAIL_MAX_RETRIES (1)" in out


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["0", "-1"])
def test_runmailer_refuses_a_max_passes_below_1(value):
    with pytest.raises(CommandError, match="--max-passes must be 1 or more"):
        call_command("runmailer", "--max-passes", value)


def make_logs(result, count, days_ago):
    queue(1, prefix="log")
    message = Message.objects.last()
    logs = [MessageLog.from_message(message, result) for _ in range(count)]
    MessageLog.objects.bulk_create(logs)
    MessageLog.objects.filter(result=result).update(
        when_attempted=timezone.now() - timezone.timedelta(days=days_ago)
    )


@pytest.mark.django_db
def test_purge_mail_log_in_batches(capsys, django_assert_max_num_queries):
    make_logs(RESULT_SUCCESS, 25, days_ago=10)
    make_logs(RESULT_FAILURE, 4, days_ago=10)
    make_logs(RESULT_DONT_SEND, 2, days_ago=10)
    # 25 rows in batches of 10: 3 deleting rounds + 1 empty lookup.
    with django_assert_max_num_queries(3 * 2 + 1 + 2):
        call_command("purge_mail_log", "5", "--batch-size", "10")
    assert "25 success entries" in capsys.readouterr().out
    assert not MessageLog.objects.filter(result=RESULT_SUCCESS).exists()
    call_command("purge_mail_log", "5", "-r", "failure")
    assert not MessageLog.objects.filter(result=RESULT_FAILURE).exists()
    call_command("purge_mail_log", "20", "-r", "all")
    assert MessageLog.objects.count() == 2
    call_command("purge_mail_log", "5", "--result", "all")
    assert MessageLog.objects.count() == 0


@pytest.mark.django_db
def test_purge_mail_log_keeps_recent():
    make_logs(RESULT_SUCCESS, 3, days_ago=1)
    call_command("purge_mail_log", "5")
    assert MessageLog.objects.count() == 3


@pytest.mark.django_db
def test_purge_mail_log_follows_a_patched_clock():
    """2.3.2's patch point: mailer.models.datetime_now is the clock of ages."""
    import mailer.models

    make_logs(RESULT_SUCCESS, 3, days_ago=1)
    later = timezone.now() + timezone.timedelta(days=5)
    with patch.object(mailer.models, "datetime_now", return_value=later) as clock:
        call_command("purge_mail_log", "5")
    clock.assert_called()
    assert MessageLog.objects.count() == 0


@pytest.mark.django_db
def test_purge_mail_log_rejects_bad_arguments():
    with pytest.raises(CommandError):
        call_command("purge_mail_log", "-1")
    with pytest.raises(CommandError):
        call_command("purge_mail_log", "3", "-r", "everything")


# --- purge_deferred ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_purge_deferred(capsys, django_assert_max_num_queries):
    from mailer.signals import message_failed

    queue(5, prefix="Old")
    queue(2, prefix="New")
    old = Message.objects.filter(subject_text__startswith="Old")
    old.update(when_added=timezone.now() - timezone.timedelta(days=10))
    # 4 old deferred (one with an automatic retry planned), 1 old queued, 2 new deferred.
    Message.objects.exclude(subject_text="Old 4").update(priority=PRIORITY_DEFERRED)
    Message.objects.filter(subject_text="Old 0").update(
        not_before=timezone.now() + timezone.timedelta(hours=1)
    )
    ids = dict(Message.objects.values_list("subject_text", "message_id"))

    call_command("purge_deferred", "7", "--dry-run")
    assert "4 deferred message(s) queued more than 7 day(s) ago would be removed" in (
        capsys.readouterr().out
    )
    assert Message.objects.count() == 7 and not MessageLog.objects.exists()

    failed = []
    message_failed.connect(lambda **kw: failed.append(kw), weak=False, dispatch_uid="t-purge")
    try:
        call_command("purge_deferred", "7", "--batch-size", "3")
    finally:
        message_failed.disconnect(dispatch_uid="t-purge")
    assert "4 deferred message(s) queued more than 7 day(s) ago removed" in (
        capsys.readouterr().out
    )
    assert sorted(Message.objects.values_list("subject_text", flat=True)) == [
        "New 0",
        "New 1",
        "Old 4",
    ]
    entries = MessageLog.objects.order_by("subject_text")
    assert [e.subject_text for e in entries] == ["Old 0", "Old 1", "Old 2", "Old 3"]
    for entry in entries:
        assert entry.result == RESULT_FAILURE and entry.priority != PRIORITY_DEFERRED
        assert "purge_deferred" in entry.log_message and entry.message_data
        st = mailer.status(ids[entry.subject_text])
        assert st.state == "failed" and "queued more than 7 day(s) ago" in st.error
    assert sorted(kw["message_id"] for kw in failed) == sorted(
        ids[f"Old {i}"] for i in range(4)
    )
    assert all("purge_deferred" in kw["error"] for kw in failed)
    # Nothing left to purge: one query (in its transaction).
    with django_assert_max_num_queries(3):
        call_command("purge_deferred", "7")


@pytest.mark.django_db
def test_purge_deferred_rejects_bad_arguments():
    with pytest.raises(CommandError, match="DAYS must be 0 or more"):
        call_command("purge_deferred", "-1")
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("purge_deferred", "3", "--batch-size", "0")


# --- subprocesses ---------------------------------------------------------------------


@pytest.mark.slow
def test_send_mail_subprocess(manage, smtp_server):
    queue(5)
    out = manage.run("send_mail").stdout
    assert "sent 5" in out
    assert len(smtp_server.wait_for(5)) == 5


@pytest.mark.slow
def test_runmailer_stops_cleanly_on_sigterm(manage, smtp_server):
    smtp_server.delay = 0.4
    queue(6)
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "60"
    proc = manage.popen("runmailer")
    try:
        smtp_server.wait_for(1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopping after the message in flight" in stderr
    # Everything the server accepted is logged as sent and left the queue;
    # nothing was lost.
    arrived = len(smtp_server.messages)
    assert MessageLog.objects.filter(result=RESULT_SUCCESS).count() == arrived
    assert Message.objects.count() == 6 - arrived
    assert arrived < 6


@pytest.mark.slow
def test_runmailer_sigint(manage, smtp_server):
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "60"
    proc = manage.popen("runmailer")
    try:
        for line in proc.stderr:
            if "Worker started" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Received SIGINT" in stderr


@pytest.mark.slow
def test_runmailer_picks_up_new_mail(manage, smtp_server):
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "0.2"
    proc = manage.popen("runmailer")
    try:
        queue(2)
        smtp_server.wait_for(2)
        queue(1, prefix="later")
        smtp_server.wait_for(3)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert proc.returncode == 0


@pytest.mark.slow
def test_worker_killed_mid_drain_resends_at_most_one(manage, smtp_server):
    """At-least-once: SIGKILL during a drain re-sends only the message in flight."""
    smtp_server.delay = 0.3
    queue(8)
    expected_ids = set(Message.objects.values_list("message_id", flat=True))
    proc = manage.popen("send_mail")
    smtp_server.wait_for(2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)
    time.sleep(0.5)  # let the server finish the DATA it was in
    smtp_server.delay = 0
    manage.run("send_mail")
    ids = smtp_server.message_ids()
    assert set(ids) == expected_ids  # nothing lost
    duplicates = len(ids) - len(set(ids))
    assert duplicates <= 1  # at most the message in flight, with its Message-ID
    assert Message.objects.count() == 0


@pytest.mark.slow
def test_sqlite_queueing_during_a_long_drain(manage, smtp_server):
    """Queueing from another process while a slow drain runs never hits
    "database is locked": no transaction stays open across SMTP."""
    smtp_server.delay = 0.05
    queue(40, prefix="early")
    drain = manage.popen("send_mail")
    producer = manage.python(
        "import mailer\n"
        "for i in range(150):\n"
        "    mailer.send_mail(f'late {i}', 'b', 'f@example.com', [f'l{i}@example.com'])\n"
        "print('queued')\n",
        timeout=120,
    )
    assert "queued" in producer.stdout
    out, err = drain.communicate(timeout=120)
    assert drain.returncode == 0, err
    assert "database is locked" not in err + producer.stderr
    arrived = len(smtp_server.messages)
    assert arrived >= 40
    assert arrived + Message.objects.count() == 190
    manage.run("send_mail")
    assert len(smtp_server.messages) == 190
    assert len(set(smtp_server.message_ids())) == 190


# --- showing their work without LOGGING -------------------------------------------------


@pytest.fixture
def no_logging(manage):
    """Subprocesses run with no LOGGING setting, like a new project."""
    manage.env["MAILER_TEST_NO_LOGGING"] = "1"
    return manage


@pytest.mark.slow
def test_send_mail_logs_to_stderr_without_logging_config(no_logging, smtp_server):
    queue(2)
    proc = no_logging.run("send_mail")
    assert "send_mail: sent 2" in proc.stdout
    assert " INFO mailer.engine: Pass done: sent 2, deferred 0, failed 0" in proc.stderr
    assert "DEBUG" not in proc.stderr
    queue(1)
    verbose = no_logging.run("send_mail", "-v", "2").stderr
    assert " DEBUG mailer.engine: Sent message " in verbose
    queue(1)
    quiet = no_logging.run("send_mail", "-v", "0")
    assert quiet.stdout == "" and quiet.stderr == ""
    # The mail server is down: -v 0 (the cron recipe) is not silent.
    from tests.conftest import free_port

    queue(2)
    no_logging.env["MAILER_TEST_SMTP_PORT"] = str(free_port())
    down = no_logging.run("send_mail", "-v", "0")
    assert down.stdout == "" and down.stderr.count("\n") == 1, down.stderr
    assert " WARNING mailer.engine: No mail went out: 2 message(s) deferred" in down.stderr
    assert "Connection refused by 127.0.0.1:" in down.stderr


@pytest.mark.slow
def test_runmailer_shows_start_passes_and_deferrals(no_logging, smtp_server):
    smtp_server.fail_with = "451 4.3.0 try again later"
    queue(1)
    proc = no_logging.run("runmailer", "--max-passes", "1", "--debug")
    assert " INFO mailer.worker: Worker started" in proc.stderr
    assert "deferred" in proc.stderr and "451" in proc.stderr
    assert " INFO mailer.worker: Worker stopped after 1 pass(es)." in proc.stderr
    assert "runmailer: stopped after 1 pass(es)" in proc.stdout


@pytest.mark.slow
def test_retry_deferred_and_purge_log_without_logging_config(no_logging):
    """The cron recipe's ``>> mailer.log 2>&1`` shows each summary once."""
    proc = no_logging.run("retry_deferred")
    both = proc.stdout + proc.stderr
    assert "retry_deferred: 0 message(s) back on the queue" in proc.stdout
    assert "retried" not in both
    proc = no_logging.run("purge_mail_log", "7")
    both = proc.stdout + proc.stderr
    assert both.count("0 success entries older than 7 days deleted") == 1
    assert "log entries deleted" not in both
    # -v 2 shows 2.3.2's log line too, as a debug record.
    proc = no_logging.run("purge_mail_log", "7", "-v", "2")
    assert "DEBUG mailer.commands: 0 log entries deleted" in proc.stderr


@pytest.mark.slow
def test_a_configured_handler_is_not_doubled(manage, smtp_server):
    """tests/settings.py's LOGGING sends mailer records to stderr: once, not twice."""
    queue(1)
    stderr = manage.run("send_mail").stderr
    assert stderr.count("Pass done: sent 1") == 1
    assert "INFO mailer.engine" not in stderr  # our format is not used


@pytest.mark.django_db
def test_no_handler_is_added_when_the_project_has_one(capsys):
    import io
    import logging


    root = logging.getLogger()
    stream = io.StringIO()
    project_handler = logging.StreamHandler(stream)
    mailer_logger = logging.getLogger("mailer")
    saved = mailer_logger.handlers[:], mailer_logger.propagate
    mailer_logger.handlers[:] = []  # as if LOGGING configured only the root
    root.addHandler(project_handler)
    try:
        call_command("purge_mail_log", "7", verbosity=1)
    finally:
        root.removeHandler(project_handler)
        mailer_logger.handlers[:], mailer_logger.propagate = saved
    assert "0 log entries deleted" in stream.getvalue()
    assert "mailer.commands" not in capsys.readouterr().err


@pytest.mark.django_db
def test_in_process_command_logs_to_its_stderr_and_cleans_up():
    import io
    import logging

    from mailer.logutil import CommandLogHandler

    # No handler anywhere (pytest's own capture handlers on the root included).
    mailer_logger, root = logging.getLogger("mailer"), logging.getLogger()
    saved = mailer_logger.handlers[:], root.handlers[:]
    mailer_logger.handlers[:] = root.handlers[:] = []
    err = io.StringIO()
    try:
        call_command("purge_mail_log", "7", stderr=err, verbosity=2)
        assert not any(isinstance(h, CommandLogHandler) for h in mailer_logger.handlers)
    finally:
        mailer_logger.handlers[:], root.handlers[:] = saved
    assert "DEBUG mailer.commands: 0 log entries deleted" in err.getvalue()


# --- a lock file that can't be created (real processes, real file system) -------------
# Paths under a regular file, a missing directory or a removed working directory
# fail for root as well, where permission bits would not.


def assert_one_clear_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "Can't create the send_mail lock" in line]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], stderr


@pytest.mark.slow
def test_send_mail_default_lock_path_unusable(manage, smtp_server, tmp_path):
    """No MAILER_LOCK_PATH, and cron's working directory can't hold the lock."""
    queue(1)
    del manage.env["MAILER_TEST_LOCK_PATH"]
    manage.env["PYTHONPATH"] = str(ROOT)  # no relative entry: there is no cwd
    gone = tmp_path / "gone"
    gone.mkdir()
    # Start in the directory, then remove it: nothing can be created there.
    proc = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
         *manage.command("send_mail")],
        env=manage.env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert_one_clear_line(proc.stderr, "send_mail.lock", "MAILER_LOCK_PATH")
    assert Message.objects.count() == 1
    assert smtp_server.messages == []


@pytest.mark.slow
def test_send_mail_lock_path_under_a_file(manage, smtp_server, tmp_path):
    queue(1)
    (tmp_path / "plain").write_text("")
    manage.env["MAILER_TEST_LOCK_PATH"] = str(tmp_path / "plain" / "send_mail")
    # The system check stops it first...
    checked = manage.run("send_mail", check=False)
    assert checked.returncode != 0
    assert "mailer.E007" in checked.stderr and "Traceback" not in checked.stderr
    # ...and without the checks (the directory went away after start) the
    # pass itself says the same in one line.
    proc = manage.run("send_mail", "--skip-checks", check=False)
    assert proc.returncode == 1, proc.stderr
    assert_one_clear_line(proc.stderr, "is not a directory", "MAILER_LOCK_PATH")
    assert Message.objects.count() == 1


@pytest.mark.slow
def test_runmailer_backs_off_and_recovers_when_the_lock_directory_appears(
    manage, smtp_server, tmp_path
):
    lock_dir = tmp_path / "locks"
    manage.env["MAILER_TEST_LOCK_PATH"] = str(lock_dir / "send_mail")
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "1"
    queue(1)
    proc = manage.popen("runmailer", "--skip-checks", "--debug")
    lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # Several attempts, about 1 s apart (however long the start took).
        deadline = time.monotonic() + 30
        while sum("still can't be created" in line for line in lines) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        assert smtp_server.messages == []
        lock_dir.mkdir()
        smtp_server.wait_for(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        reader.join(5)
    finally:
        proc.kill()
        proc.wait()
        reader.join(5)
        proc.stdout.close()
        proc.stderr.close()
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert_one_clear_line(stderr, "does not exist", "MAILER_LOCK_PATH")
    assert stderr.count("still can't be created") >= 2  # it kept trying
    assert "Pass failed" not in stderr
    assert "can be created again" in stderr
    assert Message.objects.count() == 0


@pytest.mark.slow
def test_runmailer_stops_promptly_while_backing_off(manage, smtp_server, tmp_path):
    manage.env["MAILER_TEST_LOCK_PATH"] = str(tmp_path / "missing" / "send_mail")
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "600"
    queue(1)
    proc = manage.popen("runmailer", "--skip-checks")
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while not any("Can't create the send_mail lock" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        time.sleep(3.5)  # into the 4 s wait
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        elapsed = time.monotonic() - start
        reader.join(timeout=5)
    finally:
        proc.kill()
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert elapsed < 3
    assert_one_clear_line(stderr, "MAILER_LOCK_PATH")


@pytest.mark.slow
def test_runmailer_sigterm_while_the_server_hangs(manage, silent_server):
    """A silent provider can hold the worker only for the SMTP timeout."""
    import time

    queue(3)
    manage.env["MAILER_TEST_SMTP_PORT"] = str(silent_server.port)
    manage.env["MAILER_TEST_EMAIL_TIMEOUT"] = "3"
    manage.env["MAILER_TEST_EMPTY_QUEUE_SLEEP"] = "60"
    proc = manage.popen("runmailer")
    try:
        deadline = time.monotonic() + 20
        while not silent_server.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert silent_server.accepted, "the worker never connected"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        waited = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert waited < 3 + 5, waited
    # Nothing lost: the message in flight was deferred, the rest still queued.
    assert Message.objects.count() == 3
    assert MessageLog.objects.filter(result=RESULT_FAILURE).count() >= 1


@pytest.mark.slow
def test_runmailer_wakes_for_scheduled_mail_and_due_retries(manage, smtp_server):
    """A message scheduled for T goes out within a second after T, and a retry
    due in 2 s within a second after that, though the idle sleep is 60 s."""
    import datetime as dt

    from django.utils import timezone

    smtp_server.fail_first = 1  # the first message: 451 once, then accepted
    mailer.send_mail("now", "b", "f@example.com", ["t@example.com"])
    send_at = timezone.now() + dt.timedelta(seconds=5)
    mailer.send_mail("scheduled", "b", "f@example.com", ["t@example.com"], send_at=send_at)
    manage.env.update(
        MAILER_TEST_EMPTY_QUEUE_SLEEP="60", MAILER_TEST_AUTO_RETRY="1", MAILER_TEST_RETRY_DELAY="2"
    )
    proc = manage.popen("runmailer")
    try:
        smtp_server.wait_for(2, timeout=30)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    # In either order: under load the worker may start so late that the
    # scheduled time comes before the retry's.
    assert sorted(smtp_server.subjects()) == ["now", "scheduled"]
    first, *accepted = smtp_server.attempt_times  # the refused one, then one per arrival
    arrived = dict(zip(smtp_server.subjects(), accepted, strict=True))
    assert 1.8 <= arrived["now"] - first < 3.0, stderr
    assert 0 <= arrived["scheduled"] - send_at.timestamp() < 1.0, stderr
    assert "transient: retry at" in stderr


# --- mailer_status ----------------------------------------------------------------------

STATUS_KEYS = {
    "queued",
    "scheduled",
    "deferred",
    "deferred_waiting",
    "by_priority",
    "oldest_queued_seconds",
    "oldest_deferred_seconds",
    "waiting",
    "oldest_waiting_seconds",
    "silent_seconds",
    "last_success",
    "last_success_seconds",
    "last_hour",
    "last_day",
    "now",
    "ok",
    "problems",
    "routes",
}


def _age_queue(seconds):
    Message.objects.update(when_added=timezone.now() - timezone.timedelta(seconds=seconds))


@pytest.mark.django_db
def test_mailer_status_text(capsys):
    queue(2)
    Message.objects.filter(subject_text="S 1").update(priority=PRIORITY_DEFERRED)
    _age_queue(125)
    call_command("mailer_status")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mailer_status: OK"
    text = "\n".join(lines)
    assert "Queue: 1 queued, 0 scheduled, 1 deferred (1 waiting for an operator)" in text
    assert "By priority: high 0, medium 1, low 0, deferred 1" in text
    assert "Oldest sendable message: waiting 2m " in text
    assert "Last success: never" in text
    assert "Last hour: 0 sent, 0 deferred, 0 failed, 0 don't send" in text


@pytest.mark.django_db
def test_mailer_status_json(capsys):
    import json

    queue(1)
    MessageLog.objects.log(Message.objects.get(), RESULT_SUCCESS)
    call_command("mailer_status", "--json")
    data = json.loads(capsys.readouterr().out)
    assert set(data) == STATUS_KEYS
    for key in ("queued", "scheduled", "deferred", "oldest_queued_seconds"):
        assert type(data[key]) is int, key
    assert data["queued"] == 1 and data["ok"] is True and data["problems"] == []
    assert data["last_hour"]["sent"] == 1 and data["last_success_seconds"] < 60
    assert set(data["last_day"]) == {"sent", "deferred", "failed", "dont_send"}


@pytest.mark.django_db
def test_mailer_status_empty_queue_json(capsys):
    import json

    call_command("mailer_status", "--json", "--max-age", "0")
    data = json.loads(capsys.readouterr().out)
    assert data["oldest_queued_seconds"] is None and data["ok"] is True


@pytest.mark.django_db
def test_mailer_status_thresholds(capsys):
    queue(3)
    _age_queue(300)
    call_command("mailer_status", "--max-age", "600")  # fine
    assert capsys.readouterr().out.startswith("mailer_status: OK")
    with pytest.raises(CommandError) as info:
        call_command("mailer_status", "--max-age", "120")
    assert info.value.returncode == 1
    assert "more than --max-age 120" in str(info.value)
    assert capsys.readouterr().out.startswith("mailer_status: PROBLEM: 3 message(s) waiting")
    Message.objects.update(priority=PRIORITY_DEFERRED)
    # Deferred mail should have gone out too: it counts for --max-age.
    call_command("mailer_status", "--max-age", "600", "--max-deferred", "3")
    with pytest.raises(CommandError, match="more than --max-age 120"):
        call_command("mailer_status", "--max-age", "120")
    with pytest.raises(CommandError) as info:
        call_command("mailer_status", "--max-deferred", "2")
    assert info.value.returncode == 1 and "3 deferred message(s)" in str(info.value)


def _status_verdict(*args):
    """(exit status, first line) of ``mailer_status *args``, in process."""
    from io import StringIO

    out = StringIO()
    try:
        call_command("mailer_status", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue().splitlines()[0]
    return 0, out.getvalue().splitlines()[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("auto_retry", [False, True])
def test_mailer_status_fails_while_the_mail_server_is_down(settings, smtp_down, auto_retry):
    """The documented monitor must see an outage: the worker runs, the mail
    server refuses every connection, the mail waits deferred (for an
    operator, or for an automatic retry)."""
    from mailer.engine import send_all

    settings.MAILER_AUTO_RETRY = auto_retry
    queue(2)
    assert send_all().deferred == 2
    assert Message.objects.filter(not_before__isnull=not auto_retry).count() == 2
    _age_queue(1000)
    status, verdict = _status_verdict("--max-age", "900")
    assert status == 1 and "2 message(s) waiting to go out (2 deferred)" in verdict
    status, verdict = _status_verdict("--max-age", "1", "--max-deferred", "1")
    assert status == 1 and "more than --max-deferred 1" in verdict
    # No success ever (or purged): silent since the oldest became due.
    status, verdict = _status_verdict("--max-silence", "900")
    assert status == 1 and "nothing sent for 100" in verdict  # 1000 s, give or take


@pytest.mark.django_db
def test_mailer_status_max_silence(capsys):
    import json

    now = timezone.now()
    # Idle: nothing waits, the last success long ago -> fine.
    queue(1)
    MessageLog.objects.log(Message.objects.get(), RESULT_SUCCESS)
    Message.objects.all().delete()
    MessageLog.objects.update(when_attempted=now - timezone.timedelta(days=2))
    assert _status_verdict("--max-silence", "60", "--max-age", "60") == (0, "mailer_status: OK")
    # A message just queued on that idle system: not silent yet.
    queue(1, prefix="New")
    assert _status_verdict("--max-silence", "60")[0] == 0
    # It has waited 10 minutes and nothing went out since: silent.
    _age_queue(600)
    status, verdict = _status_verdict("--max-silence", "300")
    assert status == 1 and "--max-silence 300" in verdict
    # Mail flowing (a success a minute ago), backlog old: not silent, but late.
    MessageLog.objects.update(when_attempted=now - timezone.timedelta(seconds=60))
    assert _status_verdict("--max-silence", "300")[0] == 0
    assert _status_verdict("--max-age", "300")[0] == 1
    # Scheduled for later: not waiting.
    Message.objects.update(not_before=now + timezone.timedelta(hours=1))
    MessageLog.objects.update(when_attempted=now - timezone.timedelta(days=2))
    assert _status_verdict("--max-silence", "1", "--max-age", "1")[0] == 0
    call_command("mailer_status", "--json")
    data = json.loads(capsys.readouterr().out)
    assert (data["waiting"], data["oldest_waiting_seconds"], data["silent_seconds"]) == (
        0,
        None,
        None,
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args", [["--max-age", "-1"], ["--max-deferred", "x"], ["--max-silence", "-5"]]
)
def test_mailer_status_rejects_bad_thresholds(args):
    with pytest.raises(CommandError, match="must be 0 or more|not a whole number"):
        call_command("mailer_status", *args)


@pytest.mark.slow
def test_mailer_status_exit_codes_in_a_subprocess(manage):
    import json

    queue(1)
    _age_queue(1000)
    ok = manage.run("mailer_status", "--json", "--max-age", "3600")
    assert json.loads(ok.stdout)["queued"] == 1
    late = manage.run("mailer_status", "--max-age", "60", check=False)
    assert late.returncode == 1, (late.stdout, late.stderr)
    assert late.stdout.startswith("mailer_status: PROBLEM:")
    assert "more than --max-age 60" in late.stderr
    bad = manage.run("mailer_status", "--max-age", "soon", check=False)
    assert bad.returncode == 2 and "not a whole number" in bad.stderr
