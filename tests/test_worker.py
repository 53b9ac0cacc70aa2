"""mailer/worker.py in process: the loop stops by itself, no sleep patching."""

import logging
import threading

import pytest
from django.core import mail

import mailer
from mailer.models import Message
from mailer.worker import Worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def locmem(settings):
    settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS


def test_runs_passes_until_max_passes(locmem):
    for i in range(3):
        mailer.send_mail(f"S{i}", "b", "f@example.com", ["t@example.com"])
    worker = Worker(sleep=0.01, max_passes=1, install_signal_handlers=False)
    assert worker.run() == 1
    assert len(mail.outbox) == 3
    assert not Message.objects.exists()


def test_idle_worker_waits_and_stop_wakes_it(locmem):
    worker = Worker(sleep=30, install_signal_handlers=False)
    threading.Timer(0.2, worker.stop).start()
    assert worker.run() == 1  # one look at the queue; woke from its 30 s wait at once


class _TooLong(BaseException):
    """Not an Exception: the worker's loop must not swallow it."""


def _ends_by_itself(target, timeout=10):
    """Call ``target`` in this thread (the commands install signal handlers);
    it must return within ``timeout`` seconds, else SIGALRM ends it."""
    import signal

    def too_long(*_):
        raise _TooLong

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(timeout)
    try:
        return target()
    except _TooLong:
        raise AssertionError(f"still running after {timeout}s") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_max_passes_ends_on_an_empty_queue(locmem, settings):
    """An idle look is a pass: ``--max-passes N`` ends on an empty queue."""
    from io import StringIO

    from django.core.management import call_command

    worker = Worker(sleep=0.05, max_passes=3, install_signal_handlers=False)
    assert _ends_by_itself(worker.run) == 3
    settings.MAILER_EMPTY_QUEUE_SLEEP = 0.05
    out = StringIO()
    _ends_by_itself(lambda: call_command("runmailer", "--max-passes", "2", stdout=out))
    assert "runmailer: stopped after 2 pass(es)" in out.getvalue()
    # Sending paused: the same.
    settings.MAILER_PAUSE_SEND = True
    worker = Worker(sleep=0.05, max_passes=2, install_signal_handlers=False)
    assert _ends_by_itself(worker.run) == 2


def test_pause_send(locmem, settings):
    settings.MAILER_PAUSE_SEND = True
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    worker = Worker(sleep=0.01, install_signal_handlers=False)
    threading.Timer(0.3, worker.stop).start()
    worker.run()
    assert mail.outbox == []
    assert Message.objects.count() == 1


def test_a_failing_pass_does_not_end_the_worker(settings, caplog):
    settings.MAILER_EMAIL_BACKEND = "tests.test_engine.ExplodingBackend"
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS
    mailer.send_mail("please explode", "b", "f@example.com", ["t@example.com"])
    mailer.send_mail("fine", "b", "f@example.com", ["t@example.com"])
    worker = Worker(sleep=0.01, max_passes=1, install_signal_handlers=False)
    assert worker.run() == 1
    assert "Pass failed" in caplog.text
    assert Message.objects.deferred().count() == 1
    assert Message.objects.non_deferred().count() == 0


class WaitRecorder(Worker):
    """Records how long the loop asks to wait; fixes the lock directory after
    ``fix_after`` waits and stops after ``stop_after``."""

    def __init__(self, lock_dir, fix_after, stop_after, **kwargs):
        super().__init__(install_signal_handlers=False, **kwargs)
        self.lock_dir, self.fix_after, self.stop_after = lock_dir, fix_after, stop_after
        self.waits = []

    def wait(self, seconds):
        self.waits.append(seconds)
        if len(self.waits) == self.fix_after:
            self.lock_dir.mkdir()
        if len(self.waits) >= self.stop_after:
            self.stop()
        super().wait(0)


def test_unusable_lock_path_backs_off_reports_once_and_recovers(
    locmem, settings, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="mailer")
    lock_dir = tmp_path / "locks"
    settings.MAILER_LOCK_PATH = str(lock_dir / "send_mail")
    mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
    worker = WaitRecorder(lock_dir, fix_after=6, stop_after=7, sleep=5)
    worker.run()
    # 1, 2, 4 seconds, then capped at the idle sleep; after the fix the
    # message goes out and the idle wait is the normal one.
    assert worker.waits == [1, 2, 4, 5, 5, 5, 5]
    assert len(mail.outbox) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "MAILER_LOCK_PATH" in errors[0].getMessage()
    assert "does not exist" in errors[0].getMessage()
    assert errors[0].exc_info is None  # no traceback
    assert "Pass failed" not in caplog.text
    assert "can be created again" in caplog.text


def test_idle_sleep_follows_the_setting_or_a_patched_engine_value(settings):
    from unittest.mock import patch

    settings.MAILER_EMPTY_QUEUE_SLEEP = 9
    worker = Worker(install_signal_handlers=False)
    assert worker.idle_seconds() == 9
    with patch("mailer.engine.EMPTY_QUEUE_SLEEP", 0.25):
        assert worker.idle_seconds() == 0.25
    assert worker.idle_seconds() == 9
    assert Worker(install_signal_handlers=False, sleep=2).idle_seconds() == 2


def run_in_thread(worker: Worker) -> threading.Thread:
    from django.db import connections

    def run() -> None:
        try:
            worker.run()
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_idle_worker_wakes_for_a_scheduled_message(smtp_settings, smtp_server):
    import datetime as dt

    from django.utils import timezone

    send_at = timezone.now() + dt.timedelta(seconds=1.5)
    mailer.send_mail("later", "b", "f@example.com", ["t@example.com"], send_at=send_at)
    worker = Worker(sleep=30, install_signal_handlers=False)
    thread = run_in_thread(worker)
    try:
        smtp_server.wait_for(1, timeout=10)
    finally:
        worker.stop()
        thread.join(10)
    late = smtp_server.attempt_times[0] - send_at.timestamp()
    assert 0 <= late < 1.0
    # Idle looks count as passes: one, maybe a second at the due time, then the pass.
    assert worker.passes <= 3  # it slept until the message was due, not in small steps


def test_idle_worker_wakes_for_an_automatic_retry(smtp_settings, smtp_server, settings):
    settings.MAILER_AUTO_RETRY = True
    settings.MAILER_RETRY_DELAY = 2
    smtp_server.fail_first = 1
    mailer.send_mail("retried", "b", "f@example.com", ["t@example.com"])
    worker = Worker(sleep=30, install_signal_handlers=False)
    thread = run_in_thread(worker)
    try:
        smtp_server.wait_for(1, timeout=10)
    finally:
        worker.stop()
        thread.join(10)
    first, second = smtp_server.attempt_times
    assert 1.8 <= second - first < 2.0 + 1.0


def test_idle_wait_is_capped_by_the_idle_sleep(locmem):
    import datetime as dt

    from django.utils import timezone

    mailer.send_mail("much later", "b", "f@example.com", ["t@example.com"],
                     send_at=timezone.now() + dt.timedelta(hours=1))
    assert Worker(sleep=30, install_signal_handlers=False).idle_wait() == 30
    assert 3590 < Worker(sleep=7200, install_signal_handlers=False).idle_wait() <= 3600


def test_start_up_objects_are_frozen_out_of_the_collectors_way(locmem):
    """A long-running loop's full collections walk only what passes make."""
    import gc

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        mailer.send_mail("S", "b", "f@example.com", ["t@example.com"])
        assert Worker(sleep=0.01, max_passes=1, install_signal_handlers=False).run() == 1
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
