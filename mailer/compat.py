"""What differs between the Django versions we support (4.2, 5.2, 6.x).

Everything version-dependent lives here so the rest of the package reads the
same on every Django: which backend really sends, how an address is checked,
and how a message pickled by an older Django is repaired after unpickling.
"""

from __future__ import annotations

import warnings
from typing import Any

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.module_loading import import_string

from mailer.conf import DB_BACKEND, DEFAULT_SMTP_TIMEOUT, conf

DJANGO_VERSION = django.VERSION[:2]
HAS_MAILERS = DJANGO_VERSION >= (6, 1)


def mailers_configured() -> bool:
    """True when the project uses Django 6.1's ``MAILERS`` setting."""
    return HAS_MAILERS and hasattr(settings, "MAILERS")


def legacy_email_backend() -> str | None:
    """``settings.EMAIL_BACKEND`` without the warning Django 6.1 gives on read.

    ``None`` when ``MAILERS`` is defined (reading it would raise).
    """
    if mailers_configured():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(settings, "EMAIL_BACKEND", None)


SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"


def mailer_backend(config: dict[str, Any]) -> str:
    """The backend path of one ``MAILERS`` entry (Django's default: SMTP)."""
    return config.get("BACKEND", SMTP_BACKEND)


def implicit_delivery_alias(mailers: dict[str, dict[str, Any]]) -> str | None:
    """The alias to deliver through when ``MAILER_USING`` is not set.

    ``"default"`` when it is not a ``DbBackend`` (a new Django 6.1 project:
    mail queued with ``mailer.send_mail`` goes out the way Django would send
    it); otherwise the only entry that is not a ``DbBackend``. ``None`` when
    there is no such entry or several (the project must choose).
    """
    default = mailers.get("default")
    if default is not None and mailer_backend(default) != DB_BACKEND:
        return "default"
    real = [alias for alias, config in mailers.items() if mailer_backend(config) != DB_BACKEND]
    return real[0] if len(real) == 1 else None


def delivery_alias() -> str:
    """The ``MAILERS`` alias the worker delivers through (``MAILERS`` in use).

    ``MAILER_USING`` when set, else :func:`implicit_delivery_alias`.
    """
    mailers = settings.MAILERS
    alias = conf.USING
    if alias:
        if alias not in mailers:
            raise ImproperlyConfigured(
                f"MAILER_USING is {alias!r}, which is not in MAILERS (aliases: "
                f"{', '.join(sorted(mailers)) or 'none'})."
            )
        return alias
    alias = implicit_delivery_alias(mailers)
    if alias is None:
        raise ImproperlyConfigured(
            "MAILERS has no single entry to deliver queued mail through: set MAILER_USING "
            "to the alias of the backend that really sends (see `manage.py check`, "
            "mailer.E004)."
        )
    return alias


def sending_backend_path() -> str:
    """Dotted path of the backend the worker delivers through."""
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        return mailer_backend(settings.MAILERS[delivery_alias()])
    return conf.EMAIL_BACKEND


def require_no_backend_loop() -> None:
    """Refuse to deliver through the queue itself (it would re-queue forever)."""
    if sending_backend_path() == DB_BACKEND:
        where = (
            f"MAILERS[{delivery_alias()!r}]"
            if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET
            else "MAILER_EMAIL_BACKEND"
        )
        raise ImproperlyConfigured(
            f"{where} is {DB_BACKEND!r}: the worker would put every message back on "
            "the queue. Set it to the backend that really sends, e.g. "
            "'django.core.mail.backends.smtp.EmailBackend'."
        )


def get_sending_backend() -> BaseEmailBackend:
    """A new instance of the backend that really sends, with bounded waits."""
    return bound_waits(_new_sending_backend())


def _new_sending_backend() -> BaseEmailBackend:
    require_no_backend_loop()
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        from django.core.mail import mailers  # type: ignore[attr-defined]  # Django 6.1+

        return mailers[delivery_alias()]
    backend_class = import_string(conf.EMAIL_BACKEND)
    if HAS_MAILERS:
        # MAILER_EMAIL_BACKEND names a class, which we create as we always
        # have. Django 6.1 frowns on that (checks.py suggests MAILER_USING);
        # its warnings about the EMAIL_* settings themselves still show.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Directly creating", category=PendingDeprecationWarning
            )
            return backend_class()
    return backend_class()


def bound_waits(backend: BaseEmailBackend) -> BaseEmailBackend:
    """Give Django's SMTP backend a timeout when the project set none.

    Without one, a server that accepts the connection and never answers
    holds the worker (and its lock, and on PostgreSQL its transaction) for
    ever. The project's own timeout always wins.
    """
    from django.core.mail.backends.smtp import EmailBackend as SMTPBackend

    if isinstance(backend, SMTPBackend) and backend.timeout is None:
        backend.timeout = DEFAULT_SMTP_TIMEOUT
    return backend


def smtp_timeout_unset() -> bool:
    """Would the worker's backend be Django's SMTP backend with no timeout?"""
    from django.core.mail.backends.smtp import EmailBackend as SMTPBackend

    try:
        path = sending_backend_path()
        backend_class = import_string(path)
    except Exception:  # reported by the other checks
        return False
    if not (isinstance(backend_class, type) and issubclass(backend_class, SMTPBackend)):
        return False
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        options = settings.MAILERS[delivery_alias()].get("OPTIONS", {})
        return options.get("timeout") is None
    return getattr(settings, "EMAIL_TIMEOUT", None) is None


# --- addresses ------------------------------------------------------------

if DJANGO_VERSION >= (6, 0):
    from django.core.mail.backends.smtp import EmailBackend as _SMTPBackend

    _prep = _SMTPBackend.__new__(_SMTPBackend)

    def check_address(address: Any, encoding: str) -> None:
        _prep.prep_address(address)  # type: ignore[attr-defined]  # Django 6.0+

else:
    from django.core.mail.message import sanitize_address

    def check_address(address: Any, encoding: str) -> None:
        sanitize_address(address, encoding)


with warnings.catch_warnings():
    # Django may deprecate the name in favour of plain ValueError.
    warnings.simplefilter("ignore")
    try:
        from django.core.mail import BadHeaderError
    except ImportError:  # pragma: no cover - depends on the Django version
        BadHeaderError = ValueError  # type: ignore[misc, assignment]


# --- repairing messages pickled by an older Django -----------------------

if DJANGO_VERSION >= (5, 2):
    from django.core.mail.message import EmailAlternative, EmailAttachment
else:  # pragma: no cover - depends on the Django version
    # Neither class exists before Django 5.2 (the stubs describe 5.2).
    EmailAlternative = EmailAttachment = None  # type: ignore[misc, assignment]


def repair_email(email: Any) -> Any:
    """Bring an unpickled message up to the running Django's expectations.

    * Django < 5.2 stored alternatives and attachments as plain tuples; 5.2+
      reads ``.content``/``.mimetype`` from named tuples.
    * Django < 6.1 kept the connection in ``connection``; 6.1 reads
      ``_connection`` (and a stored connection is never wanted anyway).
    * Django 6.1 refuses an instance ``mixed_subtype``/``alternative_subtype``
      (the "related" inline-image recipe): such a message goes out as
      ``multipart/mixed`` instead of failing forever.
    """
    state = getattr(email, "__dict__", None)
    if state is None:
        return email
    # Never resurrect a pickled connection: the worker provides its own.
    if HAS_MAILERS:
        state.pop("connection", None)
        state["_connection"] = None
    else:
        state["connection"] = None
    for name in ("mixed_subtype", "alternative_subtype"):
        if name in state and not hasattr(type(email), name):
            del state[name]
    if EmailAlternative is not None:
        alternatives = state.get("alternatives")
        if alternatives:
            state["alternatives"] = [
                a if isinstance(a, EmailAlternative) else EmailAlternative(*a) for a in alternatives
            ]
        attachments = state.get("attachments")
        if attachments:
            state["attachments"] = [
                EmailAttachment(*a)
                if isinstance(a, tuple) and not isinstance(a, EmailAttachment)
                else a
                for a in attachments
            ]
    return email


def strip_connection(email: EmailMessage) -> dict[str, Any] | None:
    """Detach the connection before pickling; return what to restore."""
    state = email.__dict__
    saved = {k: state[k] for k in ("connection", "_connection") if state.get(k) is not None}
    for key in saved:
        state[key] = None
    return saved or None


def __getattr__(name: str) -> Any:
    # validate_email moved to mailer.validation; the old import path keeps
    # working (imported lazily: mailer.validation imports this module).
    if name == "validate_email":
        from mailer.validation import validate_email

        return validate_email
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
