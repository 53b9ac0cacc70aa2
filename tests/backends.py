"""Email backends and storages of the test suite's own (importable by subprocesses)."""

from __future__ import annotations

import io

from django.core.files.storage import FileSystemStorage
from django.core.mail.backends.smtp import EmailBackend


class PlainSMTP(EmailBackend):
    """Django's SMTP backend, but a subclass with its own ``_send`` (as a
    project's DKIM-signing backend would have): never streamed to."""

    def _send(self, email_message):
        return super()._send(email_message)


class _SecondOpenStorage(FileSystemStorage):
    """Serves each file as stored on its first open (the worker's check),
    and through :meth:`later` after (the send)."""

    opened: dict[str, int] = {}

    def _open(self, name, mode="rb"):
        count = self.opened[name] = self.opened.get(name, 0) + 1
        handle = super()._open(name, mode)
        return handle if count == 1 else self.later(handle)

    def later(self, handle):
        raise NotImplementedError


class ChangingStorage(_SecondOpenStorage):
    """Tampered with after the first open (someone rewrote the file between
    the worker's check and the send)."""

    def later(self, handle):
        data = bytearray(handle.read())
        handle.close()
        data[-1] ^= 0xFF
        return io.BytesIO(bytes(data))


class FailingReadStorage(_SecondOpenStorage):
    """Fails part-way through reading after the first open (a network
    storage dropping out mid-download)."""

    def later(self, handle):
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
