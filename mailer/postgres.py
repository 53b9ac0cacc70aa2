"""``runmailer_pg``: send as soon as a message is committed, via LISTEN/NOTIFY.

How it fits together (docs/runmailer_pg.rst has the long version):

* a trigger ``django_mailer_message_notify_trigger`` on the message table runs
  ``django_mailer_notify_new_message()``, which ``pg_notify``\\ s the channel
  ``django_mailer_new_message``. It is ``AFTER INSERT ... FOR EACH STATEMENT``
  with an empty payload: PostgreSQL folds identical notifications of one
  transaction into one, so a transaction queueing 10,000 messages costs one
  notification, not 10,000 (see the measurement in the docs). PostgreSQL
  delivers it only when the transaction commits;
* a :class:`Listener` thread owns a dedicated connection (never Django's), in
  autocommit, ``LISTEN``\\ ing on the channel. It installs the function and the
  trigger idempotently, wakes the worker on every batch of notifications,
  probes the connection with ``SELECT 1`` when it has been silent for a while
  (TCP keepalives are on as well) and reconnects with exponential backoff when
  the connection is lost;
* a single :class:`PostgresWorker` (a :class:`mailer.worker.Worker`) runs the
  ``send_all()`` passes in the main thread. A wake-up is a flag, so however
  many notifications arrive during a pass they cause one more pass. It also
  runs a pass every ``MAILER_EMPTY_QUEUE_SLEEP`` seconds, a full pass at start
  and after every reconnection, and retries within seconds when another
  process held the ``send_mail`` file lock.

The drivers are told apart by the module Django's backend loaded
(``connection.Database``): psycopg (3) or psycopg2. Neither is imported here.
The driver, the listen connection's parameters and the trigger are in
:mod:`mailer.pgtrigger`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import InterfaceError, OperationalError, connections

from mailer.pgtrigger import (
    CHANNEL,
    FUNCTION_NAME,
    LISTEN_CONNECTION_DEFAULTS,  # noqa: F401  - re-exported
    TCP_USER_TIMEOUT_MS,  # noqa: F401  - re-exported
    TRIGGER_NAME,
    PostgresUnavailable,
    TriggerInstallError,
    _Driver,
    _first_line,
    _quoted_table,
    _trigger_exists,
    database_alias,
    get_driver,
    install_trigger,
    listen_connection_params,
)
from mailer.worker import Worker

logger = logging.getLogger(__name__)

__all__ = [
    "CHANNEL",
    "FUNCTION_NAME",
    "TRIGGER_NAME",
    "Listener",
    "PostgresUnavailable",
    "PostgresWorker",
    "TriggerInstallError",
    "install_trigger",
]

#: Seconds of silence on the listen connection before it is probed.
PROBE_INTERVAL = 30.0
#: Seconds a probe may take before the connection is given up as dead.
PROBE_TIMEOUT = 10.0
#: Reconnection backoff: first delay, doubled per failed attempt, up to the cap.
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_CAP = 30.0
#: When another process held the file lock: first retry, doubled, up to the cap.
LOCKED_OUT_RETRY = 0.5
LOCKED_OUT_RETRY_CAP = 4.0


# --- the listener ------------------------------------------------------------------


class Listener:
    """Owns the LISTEN connection; calls back on notifications and reconnections.

    ``start()`` makes the first connection in the caller's thread (so the
    trigger and LISTEN are in place before the first pass), then a daemon
    thread waits on the socket. ``request_stop()`` is safe in a signal handler.
    """

    def __init__(
        self,
        alias: str,
        driver: _Driver,
        *,
        on_notify: Callable[[int], None],
        on_reconnect: Callable[[], None],
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        reconnect_delay: float = RECONNECT_DELAY,
        reconnect_delay_cap: float = RECONNECT_DELAY_CAP,
    ) -> None:
        self.alias = alias
        self.driver = driver
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_cap = reconnect_delay_cap
        self.params = listen_connection_params(alias, driver)
        self.table = _quoted_table(alias)
        self.conn: Any = None
        self.thread: threading.Thread | None = None
        self.reconnections = 0
        self._stopping = threading.Event()
        self._conn_lock = threading.Lock()
        self._probe_token: object | None = None
        self._last_heard = time.monotonic()
        self._pipe_r = self._pipe_w = -1  # the self-pipe that wakes select(), from start()

    # -- connection ----------------------------------------------------------------

    def _notified(self, count: int) -> None:
        self._last_heard = time.monotonic()
        if count:
            logger.debug("%d notification(s) on %s.", count, CHANNEL)
            self.on_notify(count)

    def connect(self, *, strict: bool) -> None:
        """Open the connection, install the trigger, LISTEN.

        A trigger that can't be installed is fatal when ``strict`` (at start),
        unless one by that name already exists; otherwise it is logged.
        """
        conn = self.driver.connect(self.params, self._notified)
        try:
            try:
                done = install_trigger(conn, self.table, self.driver)
            except self.driver.connection_errors:
                raise
            except self.driver.Error as exc:
                if _trigger_exists(conn, self.table):
                    logger.warning(
                        "Could not update trigger %s (%s); using the one in place.",
                        TRIGGER_NAME,
                        _first_line(exc),
                    )
                elif strict:
                    raise TriggerInstallError(
                        f"runmailer_pg could not install trigger {TRIGGER_NAME} on "
                        f"{self.table}: {_first_line(exc)}. Grant the database user the "
                        "right to create functions and triggers, or have an administrator "
                        "install them (see docs/runmailer_pg.rst)."
                    ) from exc
                else:
                    logger.error(
                        "Trigger %s is missing and could not be installed (%s); "
                        "sending only every MAILER_EMPTY_QUEUE_SLEEP seconds.",
                        TRIGGER_NAME,
                        _first_line(exc),
                    )
            else:
                if done != "kept":
                    logger.info("Trigger %s on %s %s.", TRIGGER_NAME, self.table, done)
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        with self._conn_lock:
            self.conn = conn
        self._last_heard = time.monotonic()

    def _drop_connection(self) -> None:
        with self._conn_lock:
            conn, self.conn = self.conn, None
            self._probe_token = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_w, False)
        try:
            self.connect(strict=True)
        except TriggerInstallError:
            raise
        except Exception as exc:
            logger.warning(
                "Could not open the LISTEN connection (%s); retrying in the background.",
                _first_line(exc),
            )
        else:
            logger.info(
                "Listening on channel %s (database %r, %s).", CHANNEL, self.alias, self.driver.name
            )
        self.thread = threading.Thread(target=self._run, name="runmailer_pg-listener", daemon=True)
        self.thread.start()

    def request_stop(self) -> None:
        self._stopping.set()
        fd = self._pipe_w
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"x")

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():  # pragma: no cover - stuck in connect()
                logger.warning("The listener thread did not stop within %ss.", timeout)
                return
        self._drop_connection()
        fds, self._pipe_r, self._pipe_w = (self._pipe_r, self._pipe_w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        logger.info("Stopped listening on channel %s.", CHANNEL)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self.conn is None:
                self._reconnect()
                continue
            try:
                self._wait_once()
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if isinstance(exc, (self.driver.Error, OSError)):
                    logger.warning("Lost the LISTEN connection: %s", _first_line(exc))
                else:  # pragma: no cover - a bug; keep the process alive
                    logger.exception("Listener failed; reconnecting.")
                self._drop_connection()

    def _reconnect(self) -> None:
        """Connect again with exponential backoff; return when connected or stopping."""
        delay = self.reconnect_delay
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            pause = min(delay * random.uniform(0.8, 1.2), self.reconnect_delay_cap)
            logger.warning(
                "Reconnecting the LISTEN connection in %.1fs (attempt %d).", pause, attempt
            )
            if self._stopping.wait(pause):
                return
            try:
                self.connect(strict=False)
            except Exception as exc:
                logger.warning("Reconnection attempt %d failed: %s", attempt, _first_line(exc))
                delay = min(delay * 2, self.reconnect_delay_cap)
                continue
            self.reconnections += 1
            logger.warning(
                "Reconnected after %d attempt(s); listening on channel %s again.", attempt, CHANNEL
            )
            # Notifications sent while we were away are lost: a full pass.
            self.on_reconnect()
            return

    def _wait_once(self) -> None:
        conn = self.conn
        fd = conn.fileno()
        timeout = max(0.0, self._last_heard + self.probe_interval - time.monotonic())
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            selector.register(self._pipe_r, selectors.EVENT_READ)
            readable = {key.fd for key, _ in selector.select(timeout)}
        if self._pipe_r in readable:
            with contextlib.suppress(OSError):
                os.read(self._pipe_r, 64)
            return
        if fd in readable:
            count = self.driver.read_notifications(conn)
            self._notified(count)
        else:
            self._probe(conn, fd)

    def _probe(self, conn: Any, fd: int) -> None:
        """``SELECT 1``; a probe that hangs past ``probe_timeout`` kills the socket."""
        token = object()
        with self._conn_lock:
            self._probe_token = token
        timer = threading.Timer(self.probe_timeout, self._abort_probe, args=(token, fd))
        timer.daemon = True
        timer.start()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        finally:
            timer.cancel()
            with self._conn_lock:
                if self._probe_token is token:
                    self._probe_token = None
        logger.debug("Probe of the LISTEN connection: alive.")
        self._notified(self.driver.take_queued(conn))

    def _abort_probe(self, token: object, fd: int) -> None:
        with self._conn_lock:
            if self._probe_token is not token:
                return  # the probe finished, or the connection was replaced
            logger.warning(
                "The LISTEN connection did not answer a probe within %ss; dropping it.",
                self.probe_timeout,
            )
            # Shut the socket down under the driver's feet: its blocked read
            # returns, the driver raises, and the thread reconnects.
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()


# --- the worker ----------------------------------------------------------------------


def _close_django_connections() -> None:
    """Close this thread's Django connections (the next query opens new ones)."""
    for conn in connections.all():
        with contextlib.suppress(Exception):
            conn.close()


class PostgresWorker(Worker):
    """A :class:`~mailer.worker.Worker` woken by PostgreSQL notifications."""

    notified_of_new_mail = True

    def __init__(
        self,
        *,
        alias: str | None = None,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        locked_out_retry: float = LOCKED_OUT_RETRY,
        locked_out_retry_cap: float = LOCKED_OUT_RETRY_CAP,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.alias = alias or database_alias()
        driver = get_driver(self.alias)
        self.locked_out_retry = locked_out_retry
        self.locked_out_retry_cap = locked_out_retry_cap
        self._locked_out_streak = 0
        self._db_suspect = threading.Event()
        # A notification came in: there is work, no need to ask the database.
        self._notified = threading.Event()
        self.listener = Listener(
            self.alias,
            driver,
            on_notify=self._on_notify,
            on_reconnect=self._on_reconnect,
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
        )

    # -- called from the listener thread -------------------------------------------

    def _on_notify(self, count: int) -> None:
        self._notified.set()
        self.wake()

    def _on_reconnect(self) -> None:
        # The server may have restarted: Django's connection in the main
        # thread is probably dead too. Replace it before the next pass.
        self._db_suspect.set()
        self.wake()

    # -- Worker hooks ---------------------------------------------------------------

    def stop(self, *args: Any) -> None:
        super().stop(*args)
        self.listener.request_stop()

    def on_start(self) -> None:
        self.listener.start()

    def on_stop(self) -> None:
        self.listener.stop()

    def _with_db_retry(self, func: Callable[[], Any]) -> Any:
        """Run ``func``; after a lost database connection, once more on a new one."""
        if self._db_suspect.is_set():
            self._db_suspect.clear()
            _close_django_connections()
        try:
            return func()
        except (OperationalError, InterfaceError) as exc:
            if not self.running:
                raise
            logger.warning("Database error (%s); reconnecting and trying again.", _first_line(exc))
            _close_django_connections()
            return func()

    def refresh_connections(self) -> None:
        """Keep a healthy connection between passes even with
        ``CONN_MAX_AGE = 0`` (Django's "one per request"; a worker has no
        requests): connecting again costs more than the rest of a pass for
        one message. A connection that broke, or one past a positive
        ``CONN_MAX_AGE``, is closed as usual; one that died unnoticed fails
        its first query, and the pass is retried at once on a new one
        (``_with_db_retry``)."""
        for conn in connections.all(initialized_only=True):
            healthy = (
                conn.connection is not None
                and conn.settings_dict.get("CONN_MAX_AGE") == 0
                and not conn.errors_occurred
                and not conn.in_atomic_block
                and conn.get_autocommit() == conn.settings_dict["AUTOCOMMIT"]
            )
            if not healthy:
                conn.close_if_unusable_or_obsolete()

    def has_work(self) -> bool:
        # After a notification the pass itself finds the work: one query
        # less between commit and delivery.
        if self._notified.is_set():
            self._notified.clear()
            return True
        return bool(self._with_db_retry(super().has_work))

    def seconds_until_due(self) -> float | None:
        return self._with_db_retry(super().seconds_until_due)

    def run_pass(self) -> Any:
        return self._with_db_retry(super().run_pass)

    def pause_after(self, result: Any) -> float | None:
        if result.locked_out:
            # Another process holds the file lock and may already have walked
            # past a message whose notification we just took: try again soon
            # rather than after the idle period.
            delay = min(
                self.locked_out_retry * 2 ** min(self._locked_out_streak, 16),
                self.locked_out_retry_cap,
                self.idle_seconds(),
            )
            self._locked_out_streak += 1
            logger.debug("File lock held elsewhere; trying again in %.1fs.", delay)
            return delay
        self._locked_out_streak = 0
        return super().pause_after(result)
