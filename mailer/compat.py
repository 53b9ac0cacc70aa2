"""What differs between Django 4.2, 5.2 and 6.x in configuring and sending mail.

Everything version-dependent lives here or in :mod:`mailer.emailcompat` (the
differences in a message itself, re-exported here) so the rest of the package
reads the same on every Django: which backend really sends (and which
addresses it takes), how an address is checked, and how a message pickled by an older Django is repaired after
unpickling.
"""

from __future__ import annotations

import warnings
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.module_loading import import_string

from mailer.conf import DB_BACKEND, DEFAULT_SMTP_TIMEOUT, conf

# The differences in a message itself (mailer.emailcompat), importable here.
from mailer.emailcompat import DJANGO_VERSION as DJANGO_VERSION
from mailer.emailcompat import HAS_MAILERS as HAS_MAILERS
from mailer.emailcompat import BadHeaderError as BadHeaderError
from mailer.emailcompat import EmailAlternative as EmailAlternative
from mailer.emailcompat import EmailAttachment as EmailAttachment
from mailer.emailcompat import check_address as check_address
from mailer.emailcompat import repair_email as repair_email
from mailer.emailcompat import strip_connection as strip_connection


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
    it); else the route ``"default"`` names (its ``OPTIONS["using"]``);
    otherwise the only entry that is not a ``DbBackend``. ``None`` when
    there is no such entry or several (the project must choose).
    """
    default = mailers.get("default")
    if default is not None and mailer_backend(default) != DB_BACKEND:
        return "default"
    if default is not None:
        # A "default" queue that names its route (DbBackend's option
        # "using"): mail queued without a route goes the same way.
        route = (default.get("OPTIONS") or {}).get("using")
        if isinstance(route, str) and route in mailers and mailer_backend(mailers[route]) != DB_BACKEND:
            return route
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


def accepts_utf8_local_parts() -> bool:
    """Does the delivery backend take an address whose local part is not ASCII?

    Queue time refuses what the backend the worker delivers through would
    refuse, not what the strictest one would. Django's SMTP backend (or a
    subclass) takes such an address only when it speaks SMTPUTF8: a true
    ``use_smtputf8`` in its ``MAILERS`` ``OPTIONS`` or on the class, or a
    class ``policy`` with ``utf8`` set. Any other backend (console,
    locmem, an email service's API) takes the address and decides when it
    sends. The strict answer (False) when the configuration can't be read
    (the system checks report it).
    """
    from django.core.mail.backends.smtp import EmailBackend as SMTPBackend

    try:
        backend_class = import_string(sending_backend_path())
        options: dict[str, Any] = {}
        if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
            options = settings.MAILERS[delivery_alias()].get("OPTIONS") or {}
    except Exception:
        return False
    if not (isinstance(backend_class, type) and issubclass(backend_class, SMTPBackend)):
        return True
    if "use_smtputf8" in options:
        return bool(options["use_smtputf8"])
    policy = getattr(backend_class, "policy", None)
    return bool(getattr(backend_class, "use_smtputf8", False) or getattr(policy, "utf8", False))


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
