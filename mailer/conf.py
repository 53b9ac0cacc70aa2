"""Every ``MAILER_*`` setting, read when used.

``from mailer.conf import conf`` and read ``conf.EMAIL_MAX_BATCH`` etc. Nothing
is cached, so ``override_settings`` takes effect at once. The defaults stand
beside each property; ``docs/settings.rst`` is the reference.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DB_BACKEND = "mailer.backend.DbBackend"
# The longest route name (a MAILERS alias or MAILER_ROUTES key) a row can hold.
ROUTE_MAX_LENGTH = 100
DEFAULT_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
DEFAULT_ERROR_HANDLER = "mailer.engine.handle_delivery_exception"
# Seconds the worker lets Django's SMTP backend wait for the server when the
# project set no timeout (EMAIL_TIMEOUT, or OPTIONS["timeout"] in MAILERS):
# Django's own default waits for ever on a server that stops answering.
DEFAULT_SMTP_TIMEOUT = 60


def _get(name: str, default: Any) -> Any:
    return getattr(settings, "MAILER_" + name, default)


def boolean_error(name: str, value: Any) -> str | None:
    """Why ``MAILER_<name> = value`` is refused, or None for a real bool.

    Only ``True`` and ``False`` are accepted: a string such as ``"no"`` or
    ``"False"`` is true in Python and would silently do the opposite.
    """
    if isinstance(value, bool):
        return None
    return f"MAILER_{name} must be True or False; it is {value!r}."


def _get_bool(name: str, default: bool) -> bool:
    value = _get(name, default)
    error = boolean_error(name, value)
    if error is not None:
        raise ImproperlyConfigured(f"{error} Fix MAILER_{name} in your settings.")
    return value


class MailerSettings:
    """Typed, lazy access to the ``MAILER_*`` settings."""

    @property
    def EMAIL_BACKEND(self) -> str:
        """Dotted path of the backend that really sends (the old way)."""
        return _get("EMAIL_BACKEND", DEFAULT_EMAIL_BACKEND)

    @property
    def EMAIL_BACKEND_IS_SET(self) -> bool:
        return hasattr(settings, "MAILER_EMAIL_BACKEND")

    @property
    def USING(self) -> str | None:
        """``MAILERS`` alias the worker sends through (Django 6.1+)."""
        return _get("USING", None)

    @property
    def USE_FILE_LOCK(self) -> bool:
        return _get_bool("USE_FILE_LOCK", True)

    @property
    def LOCK_PATH(self) -> str | None:
        return _get("LOCK_PATH", None)

    @property
    def LOCK_WAIT_TIMEOUT(self) -> float:
        return _get("LOCK_WAIT_TIMEOUT", -1)

    @property
    def EMPTY_QUEUE_SLEEP(self) -> float:
        return _get("EMPTY_QUEUE_SLEEP", 30)

    @property
    def EMAIL_MAX_BATCH(self) -> int | None:
        return _get("EMAIL_MAX_BATCH", None)

    @property
    def EMAIL_MAX_DEFERRED(self) -> int | None:
        return _get("EMAIL_MAX_DEFERRED", None)

    @property
    def EMAIL_THROTTLE(self) -> float:
        return _get("EMAIL_THROTTLE", 0)

    @property
    def ERROR_HANDLER(self) -> str:
        return _get("ERROR_HANDLER", DEFAULT_ERROR_HANDLER)

    @property
    def MESSAGES_BATCH_SIZE(self) -> int | None:
        return _get("MESSAGES_BATCH_SIZE", None)

    @property
    def EMAIL_MAX_RETRIES(self) -> int | None:
        return _get("EMAIL_MAX_RETRIES", None)

    @property
    def EMAIL_LOG_MESSAGE_DATA(self) -> bool:
        return _get_bool("EMAIL_LOG_MESSAGE_DATA", True)

    @property
    def PAUSE_SEND(self) -> bool:
        return _get_bool("PAUSE_SEND", False)

    @property
    def AUTO_RETRY(self) -> bool:
        """Retry deferred messages automatically when due (see mailer.retry)."""
        return _get_bool("AUTO_RETRY", False)

    @property
    def RETRY_DELAY(self) -> float:
        """Seconds before the first automatic retry; doubles per attempt."""
        return _get("RETRY_DELAY", 60)

    @property
    def RETRY_DELAY_MAX(self) -> float:
        """Cap on the automatic retry delay, in seconds."""
        return _get("RETRY_DELAY_MAX", 3600)

    @property
    def RETRY_GIVE_UP_AFTER(self) -> float | None:
        """Seconds since queued after which nothing is retried automatically."""
        return _get("RETRY_GIVE_UP_AFTER", 5 * 24 * 3600)

    def require_booleans(self) -> None:
        """Raise ``ImproperlyConfigured`` if a True/False setting is anything else."""
        for name, default in BOOLEAN_SETTINGS:
            _get_bool(name, default)

    @property
    def READ_PICKLE(self) -> bool:
        """Read rows stored as pickle (2.3.2's form); False: refuse them."""
        return _get_bool("READ_PICKLE", True)

    @property
    def MESSAGE_FORMAT(self) -> str:
        """The form new rows are written in: "json" (data only) or "pickle"."""
        return _get("MESSAGE_FORMAT", "json")

    @property
    def MESSAGE_CLASSES(self) -> list[str]:
        """A project's own EmailMessage subclasses the data-only form restores."""
        value = _get("MESSAGE_CLASSES", [])
        return list(value) if isinstance(value, (list, tuple)) else []

    @property
    def SMTP_PIPELINING(self) -> bool:
        """Group SMTP commands (RFC 2920) when the server offers PIPELINING
        and the delivery backend is Django's SMTP backend."""
        return _get_bool("SMTP_PIPELINING", True)

    @property
    def PICKLE_ALLOWLIST(self) -> list[str]:
        """Extra classes (``"pkg.mod.Class"``) allowed in pickled rows (see
        mailer.pickled; ``"pkg.mod.*"`` looks in already imported modules only)."""
        value = _get("PICKLE_ALLOWLIST", [])
        return list(value) if isinstance(value, (list, tuple)) else []

    @property
    def CONCURRENCY(self) -> int:
        """SMTP connections one worker process keeps busy at once."""
        return _get("CONCURRENCY", 1)

    @property
    def ROUTES(self) -> dict[str, Any]:
        """Route name -> ``{"BACKEND", "OPTIONS", "CONCURRENCY"}`` (see mailer.routes)."""
        return _get("ROUTES", {})

    @property
    def ATTACHMENT_STORAGE(self) -> str | None:
        """Key of ``STORAGES`` that large attachments are written to (see
        mailer.attachments); ``None``: everything stays in the row."""
        return _get("ATTACHMENT_STORAGE", None)

    @property
    def ATTACHMENT_INLINE_MAX(self) -> int:
        """Attachments larger than this many bytes go to ATTACHMENT_STORAGE."""
        return _get("ATTACHMENT_INLINE_MAX", 262_144)

    @property
    def TASK_BACKEND(self) -> str | None:
        """``TASKS`` alias that ``mailer.tasks.send_queued_mail`` is enqueued on
        once a transaction that queued mail commits; ``None``: not at all."""
        return _get("TASK_BACKEND", None)

    @property
    def PURGE_BATCH_SIZE(self) -> int:
        """Rows deleted per statement by ``purge_mail_log``."""
        return _get("PURGE_BATCH_SIZE", 10_000)


conf = MailerSettings()

# (setting name, allow None, minimum) for the numeric settings, used by checks.
NUMERIC_SETTINGS: list[tuple[str, bool, float]] = [
    ("LOCK_WAIT_TIMEOUT", False, float("-inf")),
    ("EMPTY_QUEUE_SLEEP", False, 0),
    ("EMAIL_MAX_BATCH", True, 0),
    ("EMAIL_MAX_DEFERRED", True, 0),
    ("EMAIL_THROTTLE", False, 0),
    ("MESSAGES_BATCH_SIZE", True, 1),
    ("EMAIL_MAX_RETRIES", True, 0),
    ("PURGE_BATCH_SIZE", False, 1),
    ("ATTACHMENT_INLINE_MAX", False, 0),
    ("RETRY_DELAY", False, 0),
    ("RETRY_DELAY_MAX", False, 0),
    ("RETRY_GIVE_UP_AFTER", True, 0),
]

# (setting name, default) for the True/False settings, used by checks.
BOOLEAN_SETTINGS: list[tuple[str, bool]] = [
    ("USE_FILE_LOCK", True),
    ("EMAIL_LOG_MESSAGE_DATA", True),
    ("PAUSE_SEND", False),
    ("AUTO_RETRY", False),
    ("READ_PICKLE", True),
    ("SMTP_PIPELINING", True),
]
