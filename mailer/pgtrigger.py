"""The PostgreSQL side of ``runmailer_pg``: telling psycopg (3) from psycopg2,
the listen connection's parameters, and the notify trigger it installs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router

from mailer import wakeup

# The logger runmailer_pg has always logged as (docs/runmailer_pg.rst shows it).
logger = logging.getLogger("mailer.postgres")

CHANNEL = wakeup.CHANNEL
FUNCTION_NAME = "django_mailer_notify_new_message"
TRIGGER_NAME = "django_mailer_message_notify_trigger"

#: pg_trigger.tgtype of AFTER INSERT FOR EACH STATEMENT (INSERT bit, no ROW bit).
_TGTYPE_STATEMENT_INSERT = 4
#: Serializes trigger installation between processes starting together.
_INSTALL_LOCK_KEY = 0x6D61696C65725F70  # "mailer_p"

#: libpq options for the listen connection, unless the database OPTIONS set them.
LISTEN_CONNECTION_DEFAULTS: dict[str, Any] = {
    "application_name": "django-mailer runmailer_pg",
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
#: Also set when libpq is 12 or newer: unacknowledged data fails after 30 s.
TCP_USER_TIMEOUT_MS = 30_000


class PostgresUnavailable(Exception):
    """The queue's database is not PostgreSQL, or no driver is installed."""


class TriggerInstallError(Exception):
    """The notify trigger is missing and could not be created."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- drivers -------------------------------------------------------------------------


class _Driver:
    """The few things that differ between psycopg (3) and psycopg2."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.name = module.__name__
        self.is_psycopg3 = self.name == "psycopg"
        self.Error = module.Error
        self.connection_errors = (module.OperationalError, module.InterfaceError)

    def libpq_version(self) -> int:
        with contextlib.suppress(Exception):
            if self.is_psycopg3:
                return int(self.module.pq.version())
            import psycopg2.extensions

            return int(psycopg2.extensions.libpq_version())
        return 0

    def connect(self, params: dict[str, Any], on_notify: Callable[[int], None]) -> Any:
        conn = self.module.connect(**params)
        conn.autocommit = True
        if self.is_psycopg3:
            # Notifications that arrive while psycopg runs a query (the probe,
            # the trigger install) go to handlers, not to pgconn.notifies().
            conn.add_notify_handler(lambda notify: on_notify(1))
        return conn

    def read_notifications(self, conn: Any) -> int:
        """Read what the socket has; return how many notifications came in."""
        if self.is_psycopg3:
            pgconn = conn.pgconn
            pgconn.consume_input()  # raises OperationalError when the link is gone
            count = 0
            while pgconn.notifies() is not None:
                count += 1
            if pgconn.status != self.module.pq.ConnStatus.OK:
                raise self.module.OperationalError("the listen connection is broken")
            return count
        conn.poll()
        return self.take_queued(conn)

    def take_queued(self, conn: Any) -> int:
        """Notifications the driver queued while it ran a query (psycopg2)."""
        if self.is_psycopg3:
            return 0  # delivered through the notify handler
        count = len(conn.notifies)
        del conn.notifies[:]
        return count


def database_alias() -> str:
    """The database the queue is written to."""
    from mailer.models import Message

    return router.db_for_write(Message)


def get_driver(alias: str) -> _Driver:
    """The driver behind ``alias``; :class:`PostgresUnavailable` when unusable."""
    try:
        wrapper = connections[alias]
    except ImproperlyConfigured as exc:
        raise PostgresUnavailable(
            "runmailer_pg needs a PostgreSQL driver: install psycopg (3) or psycopg2 "
            f"(loading the database backend failed: {_first_line(exc)})."
        ) from exc
    if wrapper.vendor != "postgresql":
        raise PostgresUnavailable(
            f"runmailer_pg works only with PostgreSQL, but the database {alias!r} that "
            f"holds the mail queue uses {wrapper.vendor} "
            f"({wrapper.settings_dict.get('ENGINE')}). Use 'runmailer' or a cron job "
            "running 'send_mail' instead."
        )
    module = getattr(wrapper, "Database", None)
    if module is None or module.__name__ not in ("psycopg", "psycopg2"):
        raise PostgresUnavailable(
            "runmailer_pg needs psycopg (3) or psycopg2; the database backend of "
            f"{alias!r} uses {getattr(module, '__name__', 'an unknown driver')}."
        )
    return _Driver(module)


def listen_connection_params(alias: str, driver: _Driver) -> dict[str, Any]:
    """Connection parameters for the listen connection.

    Django's own parameters for ``alias`` (so OPTIONS such as ``sslmode``,
    ``options`` or ``service`` apply) without its pool and cursor class, plus
    keepalive settings unless OPTIONS has its own.
    """
    params = dict(connections[alias].get_connection_params())
    params.pop("cursor_factory", None)
    for key, value in LISTEN_CONNECTION_DEFAULTS.items():
        params.setdefault(key, value)
    if driver.libpq_version() >= 120000:
        params.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT_MS)
    return params


# --- the trigger -------------------------------------------------------------------

_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {FUNCTION_NAME}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One empty notification per statement; PostgreSQL folds identical
    -- notifications of a transaction into one, delivered at COMMIT.
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END;
$$
"""

_FIND_TRIGGER_SQL = """
SELECT t.tgtype, p.proname, t.tgenabled
FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
WHERE t.tgrelid = to_regclass(%s::text) AND t.tgname = %s AND NOT t.tgisinternal
"""


def _quoted_table(alias: str) -> str:
    from mailer.models import Message

    return connections[alias].ops.quote_name(Message._meta.db_table)


def install_trigger(conn: Any, table: str, driver: _Driver) -> str:
    """Create or update the function and the trigger on ``table``.

    Runs in one transaction under an advisory lock, so processes starting
    together don't trip over each other. The trigger is only dropped and
    re-created when it isn't the statement-level one (e.g. django-mailer
    2.3.2's row-level trigger), which avoids locking the table otherwise.
    Returns what was done: ``"kept"``, ``"created"`` or ``"replaced"``.
    """
    create = (
        f"CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT ON {table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION_NAME}()"
    )
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            # Don't queue behind a long transaction on the table for ever.
            cur.execute("SET LOCAL lock_timeout = '30s'")
            cur.execute(f"SELECT pg_advisory_xact_lock({_INSTALL_LOCK_KEY})")
            cur.execute(_FUNCTION_SQL)
            cur.execute(_FIND_TRIGGER_SQL, [table, TRIGGER_NAME])
            row = cur.fetchone()
            if row is None:
                cur.execute(create)
                done = "created"
            elif row[0] != _TGTYPE_STATEMENT_INSERT or row[1] != FUNCTION_NAME:
                cur.execute(f"DROP TRIGGER {TRIGGER_NAME} ON {table}")
                cur.execute(create)
                done = "replaced"
            else:
                done = "kept"
                if row[2] == "D":
                    logger.warning(
                        "Trigger %s on %s is disabled: runmailer_pg gets no notifications "
                        "and sends only every MAILER_EMPTY_QUEUE_SLEEP seconds.",
                        TRIGGER_NAME,
                        table,
                    )
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(driver.Error):
                cur.execute("ROLLBACK")
            raise
    return done


def _trigger_exists(conn: Any, table: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(_FIND_TRIGGER_SQL, [table, TRIGGER_NAME])
        return cur.fetchone() is not None
