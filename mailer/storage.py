"""The stored form of a message: encoding, and decoding that runs no code.

A message is stored as ASCII text: base64 of its pickle (2.3.2's format, so
either version reads the other's rows). Unpickling can call any importable
function, so whoever can write the queue table could run code in the worker
and in the admin. Decoding here goes through :mod:`mailer.pickled`'s
unpickler, which hands out only classes and functions from a fixed table of
exact names (Django's and the email package's message classes, plain
builtins, dates, Django's lazy and safe strings, django-anymail's message
classes, :class:`mailer.attachments.StoredAttachment`, and the exact classes
of ``MAILER_PICKLE_ALLOWLIST``), never a module, never sets state on a class,
and treats any email backend found as the message's connection as an inert
placeholder (the worker always supplies its own connection).

Anything else is refused with :class:`RefusedClass`, naming the class and
the setting; the row is kept in the log as a failure, never executed. With
``MAILER_READ_PICKLE = False`` a pickled row is refused without being read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import pickle
import re
from typing import Any

from mailer.conf import conf
from mailer.emailcompat import repair_email, strip_connection
from mailer.pickled import RefusedClass, SafeUnpickler, StoredConnection, safe_loads

logger = logging.getLogger("mailer.storage")

__all__ = [
    "PICKLE_OFF",
    "RefusedClass",
    "SafeUnpickler",
    "StoredConnection",
    "decode",
    "db_to_email",
    "decode_error",
    "email_to_db",
    "safe_loads",
]

#: Why a pickled row is not read when ``MAILER_READ_PICKLE`` is False.
PICKLE_OFF = (
    "refused: the row is stored as pickle and MAILER_READ_PICKLE is False (set it to "
    "True to read it, and run manage.py mailer_convert to store it as data)"
)


_LINES = re.compile(r".{1,76}", re.S)


def _encodebytes(raw: bytes) -> str:
    """``base64.encodebytes(raw).decode()`` (76-character lines, each ending
    in a newline, as 2.3.2 stores it), in half the time."""
    text = binascii.b2a_base64(raw, newline=False).decode("ascii")
    if not text:
        return ""
    return "\n".join(_LINES.findall(text)) + "\n"


def email_to_db(email: Any) -> str:
    """Serialize a message (or any allowed object): ASCII base64 of its pickle.

    A connection held by the message (an SMTP connection can't be pickled, and
    a stored one would never be wanted) is left out.
    """
    saved = strip_connection(email) if hasattr(email, "__dict__") else None
    try:
        return _encodebytes(pickle.dumps(email))
    finally:
        if saved:
            email.__dict__.update(saved)


def decode(data: str | bytes | None) -> tuple[Any, str | None]:
    """Decode stored data: ``(object, None)``, or ``(None, reason)``.

    Never raises and never runs code that is not on the allow-list. The
    oldest django-mailer stored the raw pickle instead of base64 of it; that
    form is read too.
    """
    if not data:
        return None, "empty message data"
    if not conf.READ_PICKLE:
        return None, PICKLE_OFF
    extra = tuple(conf.PICKLE_ALLOWLIST)
    try:
        raw = data.encode("ascii") if isinstance(data, str) else data
        obj = safe_loads(base64.decodebytes(raw), extra)
    except RefusedClass as err:
        return None, _refused(err)
    except Exception as err:
        try:
            legacy = data.encode("latin-1") if isinstance(data, str) else data
            obj = safe_loads(legacy, extra)
        except RefusedClass as legacy_err:
            return None, _refused(legacy_err)
        except Exception:
            if isinstance(err, (binascii.Error, UnicodeEncodeError)):
                return None, f"not base64: {err}"
            return None, f"unpickling failed: {type(err).__name__}: {err}"
    try:
        return repair_email(obj), None
    except Exception as err:  # a broken object must not break the reader
        return None, f"repairing the stored message failed: {type(err).__name__}: {err}"


def _refused(err: RefusedClass) -> str:
    logger.warning("Refused to decode a stored message: %s", err)
    return f"refused: {err}"


def db_to_email(data: str | bytes | None) -> Any:
    """Decode ``message_data``; ``None`` (never an exception) when it can't be."""
    return decode(data)[0]


def decode_error(data: str | bytes | None) -> str | None:
    """Why ``data`` can't be decoded, or ``None`` when it can."""
    return decode(data)[1]
