"""The stored form of a message: encoding in the configured format, and decoding either format without running code.

New rows are written in the data-only form of :mod:`mailer.dataform` (JSON,
decoded without pickle; ``MAILER_MESSAGE_FORMAT = "json"``, the default) or,
with ``MAILER_MESSAGE_FORMAT = "pickle"``, in 2.3.2's form: ASCII base64 of
the message's pickle, which 2.3.2 can read back. ``message_data`` stays a
text column; the two forms are told apart by their first character (``{``
starts the data-only form and never a pickle).

Pickled rows (2.3.2's, and this package's before the data-only form) are
read through :mod:`mailer.pickled`'s unpickler, which hands out only classes
and functions from a fixed table of exact names, never a module, never sets
state on a class, and treats any email backend found as the message's
connection as an inert placeholder. Anything else is refused with
:class:`RefusedClass`, naming the class and the setting; the row is kept in
the log as a failure, never executed. With ``MAILER_READ_PICKLE = False`` a
pickled row is refused without being read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import pickle
import re
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from mailer import dataform
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
    "is_pickled",
    "pickle_to_db",
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
    """Serialize a message (or a plain value) in ``MAILER_MESSAGE_FORMAT``.

    ``"json"``: the data-only form (:func:`mailer.dataform.encode`; raises
    :class:`mailer.dataform.NotData`, a ``ValueError``, naming what is not
    plain data). ``"pickle"``: ASCII base64 of its pickle, as 2.3.2 stores
    it. A connection held by the message is left out either way.
    """
    if message_format() != "pickle":
        return dataform.encode(email)
    return pickle_to_db(email)


_format: list[str] = []


def message_format() -> str:
    """``MAILER_MESSAGE_FORMAT``, read once and again after a change of
    settings (``override_settings``): a missing setting costs microseconds
    to look up, and queueing reads it for every message."""
    if not _format:
        _format.append(conf.MESSAGE_FORMAT)
    return _format[0]


@receiver(setting_changed)
def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "MAILER_MESSAGE_FORMAT":
        _format.clear()


def pickle_to_db(email: Any) -> str:
    """2.3.2's stored form: ASCII base64 of the pickle, without the connection."""
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
    if data[:1] in _DATA_FORM:
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        obj, reason = dataform.decode(text)
        if obj is None:
            if reason and reason.startswith("refused"):
                logger.warning("Refused to decode a stored message: %s", reason)
            return None, reason
        return _repaired(obj)
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
    return _repaired(obj)


_DATA_FORM = ("{", b"{")


def is_pickled(data: str | bytes | None) -> bool:
    """Is ``data`` (non-empty) in a pickled form rather than the data-only one?"""
    return bool(data) and data[:1] not in _DATA_FORM  # type: ignore[index]


def _repaired(obj: Any) -> tuple[Any, str | None]:
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
