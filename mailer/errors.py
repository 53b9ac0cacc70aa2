"""Delivery errors in words an operator can act on.

``[Errno 111] Connection refused`` says nothing about *which* server refused;
:func:`describe_delivery_error` adds the host and port the backend talked to
and the settings that chose them, e.g. ``Connection refused by
127.0.0.1:2525 (EMAIL_HOST/EMAIL_PORT)``. The text goes into the failure log
entry, the worker's log and the admin.
"""

from __future__ import annotations

import errno
import smtplib
import socket
import traceback
from typing import Any

from mailer.compat import delivery_alias, mailers_configured
from mailer.conf import conf

#: OS error numbers and how to say them, "<what> <host:port>".
_CONNECT_ERRORS = {
    errno.ECONNREFUSED: "Connection refused by",
    errno.ECONNRESET: "Connection reset by",
    errno.EHOSTUNREACH: "No route to host",
    errno.ENETUNREACH: "Network unreachable for",
    errno.ETIMEDOUT: "Timed out connecting to",
}


def server_of(connection: Any) -> str | None:
    """``host:port`` of an SMTP-like backend, or None when it has no host."""
    host = getattr(connection, "host", None)
    if not host or not isinstance(host, str):
        return None
    port = getattr(connection, "port", None)
    return f"{host}:{port}" if port else host


def server_settings(connection: Any = None) -> str:
    """Which settings name the server the worker delivers to (through
    ``connection``: a route's backend names its route's entry)."""
    route = getattr(connection, "mailer_route", None)
    if isinstance(route, str):
        where = "MAILERS" if mailers_configured() else "MAILER_ROUTES"
        return f"{where}[{route!r}]['OPTIONS'] host/port"
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        try:
            return f"MAILERS[{delivery_alias()!r}]['OPTIONS'] host/port"
        except Exception:  # misconfigured: the checks say why
            return "MAILERS"
    return "EMAIL_HOST/EMAIL_PORT"


def describe_delivery_error(exc: BaseException, connection: Any = None) -> str:
    """``exc`` as text, naming the server when the backend has one."""
    text = str(exc) or type(exc).__name__
    server = server_of(connection)
    if server is None:
        return text
    where = server_settings(connection)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"{text} ({server}, {where})"
    if isinstance(exc, smtplib.SMTPException):
        # The server answered: its reply is the news; say who it was.
        return f"{text} (from {server}, {where})"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"Timed out talking to {server} ({where}): {text}"
    if isinstance(exc, socket.gaierror):
        return f"Can't resolve {server} ({where}): {exc.strerror or text}"
    if isinstance(exc, OSError):
        lead = _CONNECT_ERRORS.get(exc.errno or 0)
        if lead is not None:
            return f"{lead} {server} ({where})"
        return f"{text} ({server}, {where})"
    return text


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _is_connection_failure(exc: BaseException) -> bool:
    """Was the mail server out of reach (not an answer it gave)? Refused,
    unreachable, unresolvable, timed out, hung up, or a greeting refusing
    the connection."""
    if isinstance(exc, (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)):
        return True
    if isinstance(exc, smtplib.SMTPException):
        return False
    return isinstance(exc, OSError)
