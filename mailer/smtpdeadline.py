"""The SMTP connection the worker opens for Django's SMTP backend, every
exchange with the server bounded by an overall deadline.

``smtplib`` gives the timeout to each read of the socket, not to a reply: a
server that sends ``220-`` continuation lines every half second never
finishes its greeting, and holds the worker (and ``SIGTERM``) for ever. Here
each reply (the greeting, each command's reply, the 354 and the
end-of-data reply of the DATA) must be complete within the timeout of the
backend, counted from when its reading began; the connect is bounded by the
same timeout, and so is each write (``socket.sendall`` with a timeout bounds
the whole write). A reply that is late raises ``TimeoutError`` inside
``smtplib``, which closes the connection and raises
``SMTPServerDisconnected`` from it, as for a silent server.

:func:`open_backend` opens a Django SMTP backend's connection this way,
doing what its ``open()`` does (connect, greeting, STARTTLS, login); a
backend that opens its own way, or a test that patched ``smtplib.SMTP``,
keeps its ``open()``.
"""

from __future__ import annotations

import smtplib
import socket
import time
from typing import Any

__all__ = ["DeadlineSMTP", "DeadlineSMTP_SSL", "open_backend"]

_SMTP = smtplib.SMTP
_SMTP_SSL = smtplib.SMTP_SSL
_READ_SIZE = 65536


class _DeadlineReader:
    """``sock.makefile("rb")``'s ``readline``, each line read before a deadline."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline: float | None = None
        self.buffer = b""

    def readline(self, limit: int = -1) -> bytes:
        buffer = self.buffer
        while True:
            end = buffer.find(b"\n") + 1
            if end:
                self.buffer = buffer[end:]
                return buffer[:end]
            if 0 <= limit <= len(buffer):
                self.buffer = buffer[limit:]
                return buffer[:limit]
            deadline = self.deadline
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.buffer = buffer
                    raise TimeoutError(
                        f"the email server did not finish its reply within {self.timeout:g} s"
                    )
                self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(_READ_SIZE)
            except BaseException:
                self.buffer = buffer
                raise
            finally:
                if deadline is not None:
                    self.sock.settimeout(self.timeout)
            if not data:
                self.buffer = b""
                return buffer
            buffer += data

    def close(self) -> None:
        self.buffer = b""


class _Deadlines:
    """Mixed into ``smtplib.SMTP``: every reply is read before a deadline."""

    timeout: Any
    sock: Any
    file: Any

    def getreply(self) -> tuple[int, bytes]:
        if self.sock is None:  # closed (smtplib itself would fail on None.makefile)
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        limit = self.timeout
        if not isinstance(limit, (int, float)) or limit <= 0:
            return super().getreply()  # type: ignore[misc]  # no timeout: smtplib's own
        reader = self.file
        if not isinstance(reader, _DeadlineReader) or reader.sock is not self.sock:
            # New, or the socket was wrapped by STARTTLS (which drops the file).
            reader = self.file = _DeadlineReader(self.sock, limit)
        reader.deadline = time.monotonic() + limit
        try:
            return super().getreply()  # type: ignore[misc]
        finally:
            reader.deadline = None


class DeadlineSMTP(_Deadlines, _SMTP):
    """``smtplib.SMTP`` whose every reply has a deadline (the timeout)."""


class DeadlineSMTP_SSL(_Deadlines, _SMTP_SSL):
    """``smtplib.SMTP_SSL`` whose every reply has a deadline (the timeout)."""


def _opens_like_django(backend: Any) -> bool:
    from django.core.mail.backends.smtp import EmailBackend

    cls = type(backend)
    return (
        isinstance(backend, EmailBackend)
        and cls.open is EmailBackend.open
        and getattr(cls, "connection_class", None) is getattr(EmailBackend, "connection_class", None)
        # A test that patched smtplib keeps its mock.
        and smtplib.SMTP is _SMTP
        and smtplib.SMTP_SSL is _SMTP_SSL
    )


def open_backend(backend: Any) -> Any:
    """``backend.open()``; for Django's SMTP backend with deadlines on
    every reply (see the module doc)."""
    if getattr(backend, "connection", None) or not _opens_like_django(backend):
        return backend.open()
    from django.core.mail.utils import DNS_NAME

    params: dict[str, Any] = {"local_hostname": DNS_NAME.get_fqdn()}
    if backend.timeout is not None:
        params["timeout"] = backend.timeout
    cls: type[smtplib.SMTP] = DeadlineSMTP
    if backend.use_ssl:
        params["context"] = backend.ssl_context
        cls = DeadlineSMTP_SSL
    try:
        smtp = cls(backend.host, backend.port, **params)
        try:
            if not backend.use_ssl and backend.use_tls:
                smtp.starttls(context=backend.ssl_context)
            if backend.username and backend.password:
                smtp.login(backend.username, backend.password)
        except BaseException:
            smtp.close()
            raise
    except OSError:
        if not backend.fail_silently:
            raise
        return None
    backend.connection = smtp
    return True
