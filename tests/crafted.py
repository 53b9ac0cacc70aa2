"""Crafted ``message_data``: what someone with write access to the queue
table could store (issue #27). Each maker takes a scratch directory (for a
module or marker file) and returns the row's text."""

from __future__ import annotations

import base64
import os
import pickle
import pickletools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.core.mail import EmailMessage


def u(text: str) -> bytes:
    """A pickle string push (BINUNICODE)."""
    raw = text.encode("utf-8")
    return pickle.BINUNICODE + len(raw).to_bytes(4, "little") + raw


def glob(module: str, name: str) -> bytes:
    return u(module) + u(name) + pickle.STACK_GLOBAL


def assemble(*parts: bytes) -> bytes:
    raw = pickle.PROTO + b"\x04" + b"".join(parts) + pickle.STOP
    with open(os.devnull, "w") as devnull:
        pickletools.dis(raw, out=devnull)  # well formed
    return raw


def b64(raw: bytes) -> str:
    return base64.encodebytes(raw).decode("ascii")


def evil_module(where: Path) -> tuple[Path, Path]:
    """``(directory holding email-package-shaped module sdpwn, marker it touches)``."""
    marker = where / "pwned"
    evil = where / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "sdpwn.py").write_text(f"open({str(marker)!r}, 'w').close()\nrun = print\n")
    return evil, marker


def module_path_row(where: Path) -> bytes:
    """The first row of issue #27: the email package reached as an attribute
    of email.mime.base, its __path__ rewritten by BUILD, email.sdpwn imported
    from the attacker's directory."""
    evil, _ = evil_module(where)
    return (
        glob("email.mime.base", "email")
        + pickle.EMPTY_DICT
        + u("__path__")
        + pickle.EMPTY_LIST
        + u(str(evil))
        + pickle.APPEND
        + pickle.SETITEM
        + pickle.BUILD
        + pickle.POP
        + glob("email.sdpwn", "run")
    )


def class_write_row() -> bytes:
    """The second row of issue #27: BUILD (slot state) on an allowed class."""
    return (
        glob("django.core.mail.message", "EmailMessage")
        + pickle.NONE
        + pickle.EMPTY_DICT
        + u("content_subtype")
        + u("html")
        + pickle.SETITEM
        + pickle.TUPLE2
        + pickle.BUILD
    )


def inside_a_message(payload: bytes, where: str) -> bytes:
    """A real message's pickle with ``payload`` pushed as a header value
    (``where="header"``) or as an attachment (``"attachment"``)."""
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    marker = "CRAFTED-PAYLOAD-HERE"
    if where == "header":
        email.extra_headers = {"X-Crafted": marker}
    else:
        email.attachments = [marker]
    raw = pickle.dumps(email, protocol=3)  # no frames: the bytes can be spliced
    start = raw.index(u(marker))
    end = start + len(u(marker))
    if raw[end : end + 1] == pickle.BINPUT:
        end += 2
    spliced = raw[:start] + payload + raw[end:]
    with open(os.devnull, "w") as devnull:
        pickletools.dis(spliced, out=devnull)
    return spliced


_FIELDS = (
    '"subject":"S","body":"b","from_email":"f@example.com","to":["t@example.com"],'
    '"cc":[],"bcc":[],"reply_to":[],"attachments":[],"extra_headers":{}'
)


def _system(where: Path) -> bytes:
    return glob("os", "system") + u(f"touch {where / 'pwned'}") + pickle.TUPLE1 + pickle.REDUCE


#: name -> maker(scratch dir) -> message_data
CRAFTED: dict[str, Callable[[Path], str]] = {
    "module __path__ (issue row 1)": lambda d: b64(assemble(module_path_row(d))),
    "class attribute write (issue row 2)": lambda d: b64(
        assemble(class_write_row() + pickle.POP + glob("os", "system"))
    ),
    "class attribute write, nothing else": lambda d: b64(assemble(class_write_row())),
    "os.system": lambda d: b64(assemble(_system(d))),
    "module as a header value": lambda d: b64(
        inside_a_message(module_path_row(d), "header")
    ),
    "class write as an attachment": lambda d: b64(
        inside_a_message(class_write_row(), "attachment")
    ),
    "os.system as a header value": lambda d: b64(
        inside_a_message(_system(d), "header")
    ),
    "__dict__ of the email package": lambda d: b64(
        assemble(
            glob("email", "__dict__") + u("x") + u("y") + pickle.SETITEM,
        )
    ),
    "copyreg extension code": lambda d: b64(assemble(pickle.EXT1 + b"\x01")),
    "persistent id": lambda d: b64(assemble(u("x") + pickle.BINPERSID)),
    "raw protocol 0": lambda d: f"cos\nsystem\n(Vtouch {d / 'pwned'}\ntR.",
    # the data-only form
    "data: a class not on the list": lambda d: '{"v":1,"c":"os.system","d":{}}',
    "data: a backend as the class": lambda d: (
        '{"v":1,"c":"django.core.mail.backends.smtp.EmailBackend","d":{}}'
    ),
    "data: special attributes": lambda d: (
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{"__class__":"x",' + _FIELDS + "}}"
    ),
    "data: an unlisted object in a header": lambda d: (
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{' + _FIELDS
        + ',"extra_headers":{"X":{"$obj":["os._wrap_close",{}]}}}}'
    ),
    "data: a MIME part with special attributes": lambda d: (
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{' + _FIELDS
        + ',"attachments":[{"$obj":["email.mime.text.MIMEText",{"__dict__":{}}]}]}}'
    ),
    "data: an unknown tag": lambda d: (
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{' + _FIELDS
        + ',"attachments":[{"$pickle":"gASV"}]}}'
    ),
    "data: a time zone naming a path": lambda d: (
        '{"v":1,"c":"django.core.mail.message.EmailMessage","d":{' + _FIELDS
        + ',"send_at":{"$dtz":["2026-01-01T00:00:00","../../../tmp/x",0]}}}'
    ),
    "data: nested without end": lambda d: '{"v":1,"value":' + "[" * 50_000 + "]" * 50_000 + "}",
}


@contextmanager
def process_state_watched() -> Iterator[None]:
    """Assert that nothing a crafted row could change did change, and undo it."""
    import email

    from mailer.pickled import _base_table

    _base_table()  # the decoder's own imports (a fixed list) happen first
    path = list(email.__path__)
    modules = set(sys.modules)
    subtype = EmailMessage.content_subtype
    try:
        yield
        assert list(email.__path__) == path, "email.__path__ changed"
        assert EmailMessage.content_subtype == subtype, "EmailMessage changed"
        new = {m for m in set(sys.modules) - modules if m.startswith("email.")}
        assert not new, f"imported {new}"
    finally:
        email.__path__[:] = path
        EmailMessage.content_subtype = subtype
        for name in set(sys.modules) - modules:
            if name.startswith("email."):
                del sys.modules[name]
