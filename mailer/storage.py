"""The stored form of a message: encoding, and decoding that runs no code.

A message is stored as ASCII text: base64 of its pickle (2.3.2's format, so
either version reads the other's rows). Unpickling can call any importable
function, so whoever can write the queue table could run code in the worker
and in the admin. Decoding here goes through :class:`SafeUnpickler`, which
resolves only the classes on an allow-list:

* Django's mail classes (``django.core.mail.message``) and the ``email``
  package;
* plain builtins (containers, strings, numbers), ``datetime`` and
  ``zoneinfo``, and the helpers pickle itself uses for old protocols;
* Django's lazy and safe strings;
* django-anymail's message classes;
* :class:`mailer.attachments.StoredAttachment` (a reference to a large
  attachment kept in ``MAILER_ATTACHMENT_STORAGE``; data only);
* whatever the project adds with ``MAILER_PICKLE_ALLOWLIST``
  (``"pkg.mod.Class"`` or ``"pkg.mod.*"``).

Anything else is refused with :class:`RefusedClass`, naming the class and
the setting; the row is kept in the log as a failure, never executed.
A stored connection (an email backend pickled with the message by an old
Django) is replaced by an inert placeholder: the worker always supplies its
own connection.
"""

from __future__ import annotations

import _compat_pickle
import base64
import binascii
import io
import logging
import pickle
import re
from typing import Any

from mailer.conf import conf
from mailer.emailcompat import repair_email, strip_connection

logger = logging.getLogger("mailer.storage")

__all__ = [
    "RefusedClass",
    "SafeUnpickler",
    "decode",
    "db_to_email",
    "decode_error",
    "email_to_db",
]

# Modules whose every class and function may be loaded.
_ALLOWED_MODULES = (
    "django.core.mail.message",
    "django.core.mail.utils",
    "email",
    "email.*",
)
# Single names that may be loaded ("module.name").
_ALLOWED_NAMES = frozenset(
    [
        *(
            f"builtins.{name}"
            for name in (
                "object",
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "str",
                "bytes",
                "bytearray",
                "int",
                "float",
                "complex",
                "bool",
            )
        ),
        # Pickle's own helpers for protocols 0-2 (objects, and bytes on
        # protocols < 3).
        "copyreg._reconstructor",
        "_codecs.encode",
        "collections.OrderedDict",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "zoneinfo.ZoneInfo",
        "zoneinfo.ZoneInfo._unpickle",
        # Lazy strings unpickle by calling their function again: only
        # Django's translation functions are allowed as that function.
        "django.utils.functional._lazy_proxy_unpickle",
        "django.utils.translation.gettext",
        "django.utils.translation.ngettext",
        "django.utils.translation.pgettext",
        "django.utils.translation.npgettext",
        "django.utils.text._format_lazy",
        "django.utils.safestring.SafeString",
        "django.utils.safestring.SafeText",
        "django.utils.safestring.SafeData",
        "anymail.message.AnymailMessage",
        "anymail.message.AnymailMessageMixin",
        "anymail.message.AnymailStatus",
        "anymail.message.AnymailRecipientStatus",
        # A reference to an attachment in MAILER_ATTACHMENT_STORAGE: data
        # only, resolved explicitly at send time (mailer.attachments.load).
        "mailer.attachments.StoredAttachment",
    ]
)
# A connection stored with the message (Django < 6.1 pickled it along).
_CONNECTION_MODULES = "django.core.mail.backends."


class StoredConnection:
    """Stands in for an email backend found in stored data; does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class RefusedClass(pickle.UnpicklingError):
    """Stored data names a class or function that is not on the allow-list."""

    def __init__(self, dotted: str) -> None:
        self.dotted = dotted
        super().__init__(
            f"{dotted} is not allowed in stored messages; if this is your own trusted "
            f'class, add "{dotted}" to MAILER_PICKLE_ALLOWLIST.'
        )


def _module_allowed(module: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            if module == pattern[:-2] or module.startswith(pattern[:-1]):
                return True
        elif module == pattern:
            return True
    return False


def is_allowed(module: str, name: str, extra: tuple[str, ...] = ()) -> bool:
    """May ``module.name`` be loaded from stored data?"""
    dotted = f"{module}.{name}"
    if dotted in _ALLOWED_NAMES or dotted in extra:
        return True
    # A dotted name reaches through attributes (``mod.os.system``): only
    # full names listed above may do that.
    if "." in name:
        return False
    wildcards = tuple(e[:-2] for e in extra if e.endswith(".*"))
    return _module_allowed(module, _ALLOWED_MODULES) or _module_allowed(module, wildcards)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that loads only allow-listed classes and functions."""

    def __init__(self, file: Any, *, extra: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.extra = extra

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 may use Python 2 names (copy_reg, __builtin__).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module.startswith(_CONNECTION_MODULES):
            return StoredConnection
        if not is_allowed(module, name, self.extra):
            raise RefusedClass(f"{module}.{name}")
        found = super().find_class(module, name)
        # A name imported into an allowed module from elsewhere (say
        # ``functools.partial`` in ``email.charset``) is not allowed with it.
        home = getattr(found, "__module__", None)
        if (
            "." not in name
            and isinstance(home, str)
            and home != module
            and not is_allowed(home, name, self.extra)
        ):
            raise RefusedClass(f"{home}.{name}")
        return found


def safe_loads(raw: bytes, extra: tuple[str, ...] | None = None) -> Any:
    if extra is None:
        extra = tuple(conf.PICKLE_ALLOWLIST)
    return SafeUnpickler(io.BytesIO(raw), extra=extra).load()


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
