"""The ``runmailer`` loop as an object: stoppable, testable, signal-aware."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
from types import FrameType
from typing import Any

from django.db import InterfaceError, OperationalError, close_old_connections, connections

from mailer import engine, routelanes
from mailer.conf import conf
from mailer.locking import LockPathError

logger = logging.getLogger(__name__)


def _freeze_startup_objects() -> None:
    """Move what start-up made (Django, the project's modules, connections)
    out of reach of Python's cycle collector: a long-running loop's full
    collections then walk only what the passes made, instead of pausing a
    pass now and then for the whole process."""
    gc.collect()
    gc.freeze()


class Worker:
    """Run ``send_all`` passes until stopped.

    * ``SIGTERM``/``SIGINT`` (when ``install_signal_handlers``) clear the
      running flag: the message in flight is finished, then ``run`` returns.
    * ``max_passes`` stops after that many passes (for tests and one-shots);
      a look that finds nothing due (or sending paused) counts as a pass, so
      an empty queue ends it too.
    * While nothing is due it sleeps ``MAILER_EMPTY_QUEUE_SLEEP`` seconds, or
      less: until the earliest scheduled message or automatic retry.
    * Between passes stale database connections are closed, so a database
      restart or ``CONN_MAX_AGE`` never kills a long-running worker; a pass
      that loses its connection (a killed backend, a failover) is followed
      at once by another on a new one, and only further failures in a row
      wait ``MAILER_EMPTY_QUEUE_SLEEP``.
    * The SMTP connection (and the compiled statements) are kept from one
      pass to the next (a :class:`mailer.engine.Session`); a connection
      left unused for ``engine.KEEP_CONNECTION_SECONDS`` is closed.
    * A lock file that can't be created (``LockPathError``) is reported once;
      the worker then retries after 1, 2, 4... seconds, up to
      ``MAILER_EMPTY_QUEUE_SLEEP`` (at least 1 s), until it can, and says so.
    """

    LOCK_RETRY_FIRST = 1.0
    #: Is this worker woken when a message is queued? Then a pass that
    #: emptied the queue is followed by the idle wait, not by another look.
    notified_of_new_mail = False

    def __init__(
        self,
        *,
        sleep: float | None = None,
        max_passes: int | None = None,
        install_signal_handlers: bool = True,
        concurrency: int | None = None,
        routes: list[str] | None = None,
    ) -> None:
        self.sleep = sleep
        self.routes = routes  # None: every route (--route restricts it)
        self.max_passes = max_passes
        self.concurrency = concurrency  # None: MAILER_CONCURRENCY
        self.install_signal_handlers = install_signal_handlers
        self.running = False
        self.passes = 0
        self._wake = threading.Event()
        self._lock_retry: float | None = None  # set while the lock path fails
        self._database_failures = 0  # database errors in a row
        self.session = engine.Session()

    # -- control -----------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the worker to stop after the message in flight."""
        self.running = False
        self._wake.set()

    def wake(self) -> None:
        """Cut the current wait short (e.g. a notification arrived)."""
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info(
            "Received %s; stopping after the message in flight.", signal.Signals(signum).name
        )
        self.stop()

    def _install(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on ``stop``/``wake``.

        A kept SMTP connection whose time is up is closed meanwhile.
        """
        if self.running:
            expires = self.session.expires_in()
            if expires is not None and expires < seconds:
                if self._wake.wait(expires):
                    self._wake.clear()
                    return
                self.session.close_expired()
                seconds -= expires
            self._wake.wait(seconds)
        self._wake.clear()

    def should_stop(self) -> bool:
        return not self.running

    # -- the loop -----------------------------------------------------------------

    def idle_seconds(self) -> float:
        # mailer.engine.EMPTY_QUEUE_SLEEP: the setting, or what a test patched.
        return float(engine.EMPTY_QUEUE_SLEEP) if self.sleep is None else self.sleep

    def has_work(self) -> bool:
        if self.routes is not None:
            return engine.has_sendable(routelanes.served_rows(None, self.routes))
        return engine.has_sendable()

    def refresh_connections(self) -> None:
        """Before each pass: Django's ``close_old_connections()`` (broken
        connections, and those past ``CONN_MAX_AGE``, are closed; the next
        query opens a new one)."""
        close_old_connections()

    def seconds_until_due(self) -> float | None:
        """Seconds until the earliest scheduled message or automatic retry."""
        if self.routes is not None:
            return engine.seconds_until_due(routelanes.served_rows(None, self.routes))
        return engine.seconds_until_due()

    def idle_wait(self) -> float:
        """The wait while nothing is due: ``idle_seconds()``, or until the
        earliest scheduled message or retry falls due if that is sooner."""
        try:
            until_due = self.seconds_until_due()
        except Exception as exc:  # the database is away: the pass will say so
            logger.debug("Can't read the next due time (%s); waiting the idle period.", exc)
            until_due = None
        return engine.idle_wait(self.idle_seconds(), until_due)

    def run_pass(self) -> Any:
        # Looked up at each pass, so patching mailer.engine.send_all works.
        if self.routes is not None:
            return engine.send_all(
                should_stop=self.should_stop,
                sleep=self.wait,
                concurrency=self.concurrency,
                session=self.session,
                routes=self.routes,
            )
        if self.concurrency is None:
            return engine.send_all(
                should_stop=self.should_stop, sleep=self.wait, session=self.session
            )
        return engine.send_all(
            should_stop=self.should_stop,
            sleep=self.wait,
            concurrency=self.concurrency,
            session=self.session,
        )

    # -- hooks for subclasses (runmailer_pg) ----------------------------------------

    def on_start(self) -> None:
        """Called by ``run`` once the signal handlers are installed."""

    def on_stop(self) -> None:
        """Called by ``run`` on the way out, before the handlers are restored."""

    def lock_path_failed(self, err: LockPathError) -> float:
        """Report a lock path problem (once) and return the back-off wait."""
        cap = max(self.idle_seconds(), self.LOCK_RETRY_FIRST)
        if self._lock_retry is None:
            self._lock_retry = min(self.LOCK_RETRY_FIRST, cap)
            logger.error("%s Retrying until it can.", err)
        else:
            self._lock_retry = min(self._lock_retry * 2, cap)
            logger.debug("Lock file still can't be created: %s", err.reason)
        return self._lock_retry

    def lock_path_ok(self) -> None:
        if self._lock_retry is not None:
            self._lock_retry = None
            logger.info("The send_mail lock file can be created again; sending resumes.")

    def pause_after(self, result: Any) -> float | None:
        """Seconds to wait after a pass that returned ``result`` (None: go on)."""
        drained = self.notified_of_new_mail and getattr(result, "drained", False)
        if result.locked_out:
            return self.idle_seconds()
        held_for = getattr(result, "held_for", None)
        if result.attempted == 0 or drained:
            # One indexed look for the earliest scheduled message or retry
            # (the notification of a queued message doesn't say when it is due).
            if held_for is None:
                return self.idle_wait()
            # A route waits for its quota or its provider's pause: look again
            # when it is free (at most the idle period), or when a message
            # scheduled for later falls due (one already due is the held one).
            wait = min(self.idle_seconds(), max(held_for, engine.MIN_DUE_WAIT))
            try:
                until_due = self.seconds_until_due()
            except Exception:  # the database is away: the pass will say so
                until_due = None
            if until_due is not None and until_due > engine.MIN_DUE_WAIT:
                wait = min(wait, until_due)
            return wait
        return None

    def database_failed(self, exc: BaseException) -> float:
        """A pass (or the look before it) lost its database connection.

        Closes this thread's connections (the next query opens new ones).
        The first failure in a row is retried at once: the server is usually
        back (a killed backend, a failover). Further ones wait
        ``idle_seconds()``, with the traceback, as any failed pass does.
        Returns the wait.
        """
        for conn in connections.all(initialized_only=True):
            with contextlib.suppress(Exception):
                conn.close()
        self._database_failures += 1
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self._database_failures == 1:
            logger.warning("Database connection lost (%s); reconnecting now.", first_line)
            return 0.0
        logger.error(
            "Database still unavailable (%s); retrying in %ss.",
            first_line,
            self.idle_seconds(),
            exc_info=exc,
        )
        return self.idle_seconds()

    def _passes_done(self) -> bool:
        return self.max_passes is not None and self.passes >= self.max_passes

    def run(self) -> int:
        """Loop until stopped; return the number of passes run."""
        self.running = True
        previous = self._install() if self.install_signal_handlers else {}
        logger.info("Worker started (idle sleep %ss).", self.idle_seconds())
        try:
            self.on_start()
            _freeze_startup_objects()
            while self.running:
                if self._passes_done():
                    break
                self.refresh_connections()
                if conf.PAUSE_SEND:
                    logger.debug("MAILER_PAUSE_SEND is set; not sending.")
                    self.passes += 1
                    if not self._passes_done():
                        self.wait(self.idle_seconds())
                    continue
                try:
                    if not self.has_work():
                        self.passes += 1  # an idle look is a pass: --max-passes ends
                        if not self._passes_done():
                            self.wait(self.idle_wait())
                        continue
                    result = self.run_pass()
                except LockPathError as err:
                    self.passes += 1
                    retry_in = self.lock_path_failed(err)
                    if not self._passes_done():
                        self.wait(retry_in)
                    continue
                except (OperationalError, InterfaceError) as exc:
                    # The database connection was lost (pg_terminate_backend,
                    # a restart, a failover): reconnect and go on at once;
                    # back off only while it keeps failing.
                    self.passes += 1
                    retry_in = self.database_failed(exc)
                    if retry_in and not self._passes_done():
                        self.wait(retry_in)
                    continue
                except Exception:
                    # Whatever else went wrong must not end the worker: log, back off.
                    logger.exception("Pass failed; retrying in %ss.", self.idle_seconds())
                    close_old_connections()
                    self.passes += 1
                    if not self._passes_done():
                        self.wait(self.idle_seconds())
                    continue
                self._database_failures = 0
                self.lock_path_ok()
                self.passes += 1
                pause = self.pause_after(result)
                if pause is not None and not self._passes_done():
                    self.wait(pause)
        finally:
            self.session.close()
            self.on_stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logger.info("Worker stopped after %s pass(es).", self.passes)
        return self.passes
