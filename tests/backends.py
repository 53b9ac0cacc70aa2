"""Email backends and storages of the test suite's own (importable by subprocesses)."""

from __future__ import annotations

import io

from django.core.files.storage import FileSystemStorage
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend


class PlainSMTP(EmailBackend):
    """Django's SMTP backend, but a subclass with its own ``_send`` (as a
    project's DKIM-signing backend would have): never streamed to."""

    def _send(self, email_message):
        return super()._send(email_message)


class _OpenedStorage(FileSystemStorage):
    """A file system storage whose opened files go through :meth:`opened`;
    its size and listing stay the real ones (what the worker checks before
    sending)."""

    def _open(self, name, mode="rb"):
        return self.opened(super()._open(name, mode))

    def opened(self, handle):
        raise NotImplementedError


class ChangingStorage(_OpenedStorage):
    """Serves each file with its last byte changed, at its stored size
    (someone rewrote it after it was queued)."""

    def opened(self, handle):
        data = bytearray(handle.read())
        handle.close()
        data[-1] ^= 0xFF
        return io.BytesIO(bytes(data))


class FailingReadStorage(_OpenedStorage):
    """Fails part-way through reading a file (a network storage dropping out
    mid-download)."""

    def opened(self, handle):
        return _FailingReader(handle)


class _FailingReader(io.RawIOBase):
    def __init__(self, handle):
        self.handle = handle
        self.reads = 0

    def readable(self):
        return True

    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            raise OSError("connection to the storage reset")
        return self.handle.read(size)

    def close(self):
        self.handle.close()
        super().close()


# Task backends of the suite's own (mailer.tasks): a DummyBackend that can't
# defer (run_after), as some real backends can't.
try:
    from django.tasks.backends.dummy import DummyBackend as _DummyTaskBackend
except ImportError:
    try:
        from django_tasks.backends.dummy import DummyBackend as _DummyTaskBackend
    except ImportError:  # no tasks framework: tests/test_tasks.py skips or fails
        _DummyTaskBackend = None

if _DummyTaskBackend is not None:

    class NoDeferTaskBackend(_DummyTaskBackend):
        supports_defer = False


class TooFastOnce(BaseEmailBackend):
    """An API backend playing a provider that answers its first request of
    the process with HTTP 429 and ``Retry-After`` (django-anymail's error,
    as anymail's backends raise it), then accepts; accepted messages are
    kept in ``sent``."""

    calls = 0
    sent: list = []
    retry_after = "0.3"

    def send_messages(self, email_messages):
        import requests
        from anymail.exceptions import AnymailAPIError

        type(self).calls += 1
        if type(self).calls == 1:
            response = requests.Response()
            response.status_code = 429
            response.headers["Retry-After"] = self.retry_after
            raise AnymailAPIError("Too many requests", status_code=429, response=response)
        type(self).sent.extend(email_messages)
        return len(email_messages)
