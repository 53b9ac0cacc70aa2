"""The data-only stored form of a message: JSON, decoded without pickle and without importing anything the data names.

A row in this form is a JSON object (so its first character is ``{``; a
pickled row never starts with one)::

    {"v": 1, "c": "django.core.mail.message.EmailMessage", "d": {...}}

``c`` is the message class, looked up in a fixed table of exact names
(Django's and django-anymail's message classes, and the classes of
``MAILER_MESSAGE_CLASSES``): a name outside it is refused, never imported.
``d`` is the instance's attributes (subject, body, addresses, headers,
alternatives, attachments, and any extra attribute a subclass keeps) as JSON
values. Values JSON can't hold are objects of one key that starts with ``$``
(a tag), built back by this module's own code:

* ``$b``/``$ba`` bytes/bytearray (base64), ``$t`` a tuple, ``$alt``/``$att``
  Django's ``EmailAlternative``/``EmailAttachment``, ``$dict`` a dict whose
  keys are not plain strings (or look like a tag);
* ``$dt``, ``$dtz`` (a ``ZoneInfo`` zone, by key), ``$d``, ``$tm``, ``$td``
  dates and times;
* ``$obj``: an object of an exact listed class (MIME parts of the email
  package and Django, ``email.charset.Charset``, ``email.header.Header``,
  message classes for ``message/rfc822`` attachments, django-anymail's status
  objects) made with ``__new__`` and given its attributes, no method run;
  ``$policy`` an email policy by name (``compat32``, ``default``, ``SMTP``...,
  optionally with plain changes); ``$h`` a header object of the email
  package's header registry, parsed again from its text;
* ``$ref`` a :class:`mailer.attachments.StoredAttachment`;
* ``$unset`` django-anymail's ``UNSET``.

Anything else (a lazy string is forced first, in the active language) can't
be stored: :class:`NotData` names the attribute.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.charset
import email.header
import email.policy
import functools
import importlib
import json
import re
import sys
import zoneinfo
from collections.abc import Callable
from email._policybase import Policy
from typing import Any

from django.utils.functional import Promise

from mailer.attachments import StoredAttachment
from mailer.emailcompat import EmailAlternative, EmailAttachment

__all__ = ["NotData", "decode", "encode", "encode_value", "message_class_name"]

VERSION = 1
#: Attributes never stored (the connection: the worker brings its own).
NOT_STORED = frozenset({"connection", "_connection"})


class NotData(ValueError):
    """A value can't be stored as data; ``path`` says where (``tags[2]``)."""

    def __init__(self, problem: str, path: str = "") -> None:
        self.problem = problem
        self.path = path
        super().__init__(f"{path}: {problem}" if path else problem)

    def inside(self, segment: str) -> NotData:
        joined = segment + (self.path if self.path.startswith("[") else f".{self.path}")
        return NotData(self.problem, joined if self.path else segment)


# --- exact class tables -------------------------------------------------------------

_MESSAGE_NAMES = (
    "django.core.mail.message.EmailMessage",
    "django.core.mail.message.EmailMultiAlternatives",
    "anymail.message.AnymailMessage",
)
_OBJECT_NAMES = (
    "email.message.Message",
    "email.message.MIMEPart",
    "email.message.EmailMessage",
    "email.mime.base.MIMEBase",
    "email.mime.nonmultipart.MIMENonMultipart",
    "email.mime.multipart.MIMEMultipart",
    "email.mime.text.MIMEText",
    "email.mime.image.MIMEImage",
    "email.mime.audio.MIMEAudio",
    "email.mime.application.MIMEApplication",
    "email.mime.message.MIMEMessage",
    "email.charset.Charset",
    "email.header.Header",
    "email.headerregistry.Address",
    "email.headerregistry.Group",
    "django.core.mail.message.SafeMIMEText",
    "django.core.mail.message.SafeMIMEMultipart",
    "django.core.mail.message.SafeMIMEMessage",
    "anymail.message.AnymailStatus",
    "anymail.message.AnymailRecipientStatus",
)


_LAZY_NAMES = frozenset(n for n in (*_MESSAGE_NAMES, *_OBJECT_NAMES) if n.startswith("anymail."))


def _resolve(dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)  # a name of this module's lists
    except ImportError:
        return None
    value = vars(module).get(name)
    return value if isinstance(value, type) else None


_Tables = tuple[dict[str, type], dict[type, str], dict[str, type], dict[type, str]]


def _make_tables(lazy: bool) -> _Tables:
    def wanted(name: str) -> bool:
        return name.startswith(_LAZY) == lazy

    messages = {n: c for n in _MESSAGE_NAMES if wanted(n) and (c := _resolve(n)) is not None}
    objects = {n: c for n in _OBJECT_NAMES if wanted(n) and (c := _resolve(n)) is not None}
    objects.update(messages)  # a message may be attached (message/rfc822)
    return (
        messages,
        {c: n for n, c in messages.items()},
        objects,
        {c: n for n, c in objects.items()},
    )


#: Names of a package that is imported only when a row names it or the
#: process has imported it already (django-anymail brings in requests).
_LAZY = "anymail."


@functools.cache
def _eager_tables() -> _Tables:
    return _make_tables(False)


@functools.cache
def _all_tables() -> _Tables:
    eager, lazy = _eager_tables(), _make_tables(True)
    return (
        {**eager[0], **lazy[0]},
        {**eager[1], **lazy[1]},
        {**eager[2], **lazy[2]},
        {**eager[3], **lazy[3]},
    )


def _builtin_tables(name: str | None = None) -> _Tables:
    """The exact classes: ``(messages by name, names of messages, objects by
    name, names of objects)``; django-anymail's only once it is imported, or
    when ``name`` (a name a row gives) is one of them."""
    if "anymail.message" in sys.modules or (
        name is not None and name.startswith(_LAZY) and name in _LAZY_NAMES
    ):
        return _all_tables()
    return _eager_tables()


@functools.cache
def _project_classes(names: tuple[str, ...]) -> dict[str, type]:
    """``MAILER_MESSAGE_CLASSES``: imported by their names in the setting."""
    from django.utils.module_loading import import_string

    found = {}
    for name in names:
        cls = import_string(name)
        if isinstance(cls, type):
            found[name] = cls
    return found


def _project() -> dict[str, type]:
    from mailer.conf import conf

    names = conf.MESSAGE_CLASSES
    return _project_classes(tuple(names)) if names else {}


def message_class_name(cls: type) -> str:
    """The stored name of a message class; :class:`NotData` when it isn't listed."""
    name = _builtin_tables()[1].get(cls)
    if name is not None:
        return name
    for name, listed in _project().items():
        if listed is cls:
            return name
    dotted = f"{cls.__module__}.{cls.__qualname__}"
    raise NotData(
        f"{dotted} is not a message class the stored form restores; if it is your own "
        f'EmailMessage subclass, add "{dotted}" to MAILER_MESSAGE_CLASSES'
    )


# --- policies --------------------------------------------------------------------------

_POLICIES: dict[str, Any] = {
    "compat32": email.policy.compat32,
    "default": email.policy.default,
    "SMTP": email.policy.SMTP,
    "SMTPUTF8": email.policy.SMTPUTF8,
    "HTTP": email.policy.HTTP,
    "strict": email.policy.strict,
}
_POLICY_NAMES = {id(p): n for n, p in _POLICIES.items()}
_PLAIN = (str, int, float, bool, type(None))


def _policy(policy: Any) -> Any:
    name = _POLICY_NAMES.get(id(policy))
    if name is not None:
        return {"$policy": name}
    for name, base in _POLICIES.items():
        if type(base) is not type(policy):
            continue
        mine, theirs = vars(policy), vars(base)
        if "header_factory" in mine and vars(mine["header_factory"]) != vars(
            theirs.get("header_factory", mine["header_factory"])
        ):
            continue
        changes = {
            k: v
            for k, v in mine.items()
            if k != "header_factory" and theirs.get(k, getattr(type(base), k, None)) != v
        }
        if all(type(v) in _PLAIN for v in changes.values()):
            return {"$policy": [name, changes]}
    raise NotData(f"an email policy of its own ({type(policy).__name__})")


def _load_policy(value: Any) -> Any:
    if type(value) is str:
        return _POLICIES[value]
    name, changes = value
    base = _POLICIES[name]
    if type(changes) is not dict or not all(
        type(v) in _PLAIN and type(getattr(base, k, ...)) in _PLAIN for k, v in changes.items()
    ):
        raise ValueError("bad policy changes")
    return base.clone(**changes)


# --- encoding --------------------------------------------------------------------------

_TAGS = frozenset(
    {
        "$b", "$ba", "$t", "$alt", "$att", "$dict", "$dt", "$dtz", "$d", "$tm", "$td",
        "$obj", "$policy", "$h", "$ref", "$unset",
    }
)  # fmt: skip
_ATOMS = frozenset({str, int, float, bool, type(None)})
_MAX_DEPTH = 32


_NOTHING = object()


def _unset() -> Any:
    """django-anymail's ``UNSET`` if django-anymail is imported (a message
    can hold it only then), else a value nothing is."""
    module = sys.modules.get("anymail.utils")
    return getattr(module, "UNSET", _NOTHING) if module is not None else _NOTHING


def _load_unset(value: Any) -> Any:
    from anymail.utils import UNSET  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return UNSET


@functools.cache
def _header_base() -> type:
    from email.headerregistry import BaseHeader

    return BaseHeader


def _list(items: Any, depth: int) -> list[Any]:
    out = []
    for index, item in enumerate(items):
        try:
            out.append(item if type(item) in _ATOMS else encode_value(item, depth + 1))
        except NotData as err:
            raise err.inside(f"[{index}]") from None
    return out


def _dict(value: dict[Any, Any], depth: int) -> Any:
    if all(type(k) is str for k in value) and not (len(value) == 1 and next(iter(value))[:1] == "$"):
        out = {}
        for key, item in value.items():
            try:
                out[key] = item if type(item) in _ATOMS else encode_value(item, depth + 1)
            except NotData as err:
                raise err.inside(f"[{key!r}]") from None
        return out
    pairs = []
    for key, item in value.items():
        try:
            pairs.append([encode_value(key, depth + 1), encode_value(item, depth + 1)])
        except NotData as err:
            raise err.inside(f"[{key!r}]") from None
    return {"$dict": pairs}


def _object(value: Any, depth: int) -> Any:
    kind = type(value)
    name = _builtin_tables()[3].get(kind)
    if name is None:
        name = next((n for n, c in _project().items() if c is kind), None)
        if name is None:
            raise NotData(f"{kind.__module__}.{kind.__qualname__} is not plain data")
    state = {}
    for key, item in vars(value).items():
        if key in NOT_STORED and name in _builtin_tables()[0]:
            continue
        if key == "esp_response" and name.startswith("anymail."):
            item = None  # the provider's HTTP response: never data
        try:
            state[key] = item if type(item) in _ATOMS else encode_value(item, depth + 1)
        except NotData as err:
            raise err.inside(key) from None
    return {"$obj": [name, state]}


def encode_value(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able data; :class:`NotData` (with the path) if it can't be."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if depth > _MAX_DEPTH:
        raise NotData("nested too deeply")
    if kind is list:
        return _list(value, depth)
    if kind is dict:
        return _dict(value, depth)
    if kind is tuple:
        return {"$t": _list(value, depth)}
    if EmailAttachment is not None and kind is EmailAttachment:
        return {"$att": _list(value, depth)}
    if EmailAlternative is not None and kind is EmailAlternative:
        return {"$alt": _list(value, depth)}
    if kind is bytes:
        return {"$b": binascii.b2a_base64(value, newline=False).decode("ascii")}
    if kind is bytearray:
        return {"$ba": binascii.b2a_base64(value, newline=False).decode("ascii")}
    if kind is memoryview:  # Django sends it as the bytes it holds
        return {"$b": binascii.b2a_base64(value, newline=False).decode("ascii")}
    if isinstance(value, Promise):
        return str(value)  # a lazy string, in the active language
    if isinstance(value, str):
        if isinstance(value, _header_base()):
            return {"$h": [value.name, str(value)]}  # type: ignore[attr-defined]
        return str(value)  # SafeString and other str subclasses: the text
    if kind is datetime.datetime:
        tz = value.tzinfo
        if isinstance(tz, zoneinfo.ZoneInfo) and tz.key:
            naive = value.replace(tzinfo=None).isoformat()
            return {"$dtz": [naive, tz.key, value.fold]}
        return {"$dt": value.isoformat()}
    if kind is datetime.date:
        return {"$d": value.isoformat()}
    if kind is datetime.time and value.tzinfo is None:
        return {"$tm": value.isoformat()}
    if kind is datetime.timedelta:
        return {"$td": [value.days, value.seconds, value.microseconds]}
    if kind is StoredAttachment:
        return {"$ref": dict(vars(value))}
    if value is _unset():
        return {"$unset": 1}
    if isinstance(value, Policy):
        return _policy(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)  # an IntEnum and the like: the number
    if isinstance(value, float):
        return float(value)
    return _object(value, depth)


def encode(message: Any) -> str:
    """The stored text of a message (or of any plain value).

    :class:`NotData` naming the attribute when something in it is not plain
    data, or when the message class is not listed.
    """
    kind = type(message)
    if hasattr(message, "__dict__") and not isinstance(message, type):
        try:
            name = message_class_name(kind)
        except NotData:
            if kind in _builtin_tables()[3]:
                return _dumps({"v": VERSION, "value": encode_value(message)})
            raise
        state = vars(message)
        if _plain_state(state):
            return _dumps({"v": VERSION, "c": name, "d": without_connection(state)})
        state = {}
        for key, item in vars(message).items():
            if key in NOT_STORED:
                state[key] = None  # never stored (as the quick path, which keeps None)
                continue
            try:
                state[key] = item if type(item) in _ATOMS else encode_value(item, 1)
            except NotData as err:
                raise err.inside(key) from None
        return _dumps({"v": VERSION, "c": name, "d": state})
    return _dumps({"v": VERSION, "value": encode_value(message)})


def without_connection(state: dict[str, Any]) -> dict[str, Any]:
    """``state``, or a copy with the connection ``None`` (never stored)."""
    if state.get("connection") is None and state.get("_connection") is None:
        return state
    return {k: None if k in NOT_STORED else v for k, v in state.items()}


def _plain_state(state: dict[str, Any]) -> bool:
    """Only atoms, lists of strings and string-to-string dicts (no tag-like
    one-key dict), besides the connection: stored as it is."""
    for key, item in state.items():
        kind = type(item)
        if kind in _ATOMS or key in NOT_STORED:
            continue
        if kind is list:
            for entry in item:
                if type(entry) is not str:
                    return False
        elif kind is dict:
            if len(item) == 1 and next(iter(item))[:1] == "$":
                return False
            for k, v in item.items():
                if type(k) is not str or type(v) is not str:
                    return False
        else:
            return False
    return True


_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False)
_c_encoder = json.encoder.c_make_encoder  # type: ignore[attr-defined]
if _c_encoder is not None:
    # The C encoder made once (JSONEncoder.encode makes one per call).
    _c_encode = _c_encoder(
        None, _encoder.default, json.encoder.encode_basestring_ascii,
        None, ":", ",", False, False, True,
    )

    def _dumps(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))

else:  # pragma: no cover - CPython has the C encoder
    _dumps = _encoder.encode  # type: ignore[assignment]


def encode_simple(cls_name: str, state: dict[str, Any]) -> str:
    """:func:`encode` for a message of plain strings only (no tag can occur
    but in a one-header dict, which the caller has ruled out)."""
    return _dumps({"v": VERSION, "c": cls_name, "d": state})


# --- decoding --------------------------------------------------------------------------


def _b64(value: Any) -> bytes:
    return base64.b64decode(value.encode("ascii"), validate=True)


_ZONE_KEY = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*\Z")


@functools.cache
def _zone_keys() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _dtz(value: Any) -> datetime.datetime:
    naive, key, fold = value
    if type(key) is not str or not _ZONE_KEY.match(key) or key not in _zone_keys():
        raise ValueError(f"unknown time zone {key!r}")
    return datetime.datetime.fromisoformat(naive).replace(tzinfo=zoneinfo.ZoneInfo(key), fold=fold)


def _new(value: Any) -> Any:
    name, state = value
    cls: Any = _builtin_tables(name)[2].get(name) or _project().get(name)
    if cls is None:
        raise ValueError(f"{name!r} is not a class the stored form restores")
    if type(state) is not dict or any(k[:2] == "__" for k in state):
        raise ValueError(f"bad state for {name}")
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _header(value: Any) -> Any:
    name, text = value
    return email.policy.default.header_factory(name, text)


def _ref(value: Any) -> StoredAttachment:
    if type(value) is not dict or set(value) != {"key", "name", "mimetype", "size", "sha256", "text"}:
        raise ValueError("bad stored attachment reference")
    ref = StoredAttachment.__new__(StoredAttachment)
    ref.__dict__.update(value)
    return ref


def _alt(value: Any) -> Any:
    return EmailAlternative(*value) if EmailAlternative is not None else tuple(value)


def _att(value: Any) -> Any:
    return EmailAttachment(*value) if EmailAttachment is not None else tuple(value)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$b": _b64,
    "$ba": lambda v: bytearray(_b64(v)),
    "$t": tuple,
    "$alt": _alt,
    "$att": _att,
    "$dict": lambda v: {k: item for k, item in v},
    "$dt": datetime.datetime.fromisoformat,
    "$dtz": _dtz,
    "$d": datetime.date.fromisoformat,
    "$tm": datetime.time.fromisoformat,
    "$td": lambda v: datetime.timedelta(*v),
    "$obj": _new,
    "$policy": _load_policy,
    "$h": _header,
    "$ref": _ref,
    "$unset": _load_unset,
}


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        for key in obj:
            if key[:1] == "$":
                decoder = _DECODERS.get(key)
                if decoder is None:
                    raise ValueError(f"unknown tag {key!r}")
                return decoder(obj[key])
    return obj


_scan = json.JSONDecoder(object_hook=_hook).scan_once  # type: ignore[attr-defined]


def _loads(data: str) -> Any:
    """One JSON value filling ``data`` (the C scanner, without the checks for
    surrounding whitespace that the stored form never has)."""
    obj, end = _scan(data, 0)
    if end != len(data):
        raise ValueError(f"extra data at {end}")
    return obj


def decode(data: str) -> tuple[Any, str | None]:
    """``(message or value, None)``, or ``(None, why it can't be decoded)``."""
    try:
        top = _loads(data)
    except Exception as err:  # only this module's own code ran
        return None, f"not valid stored data: {type(err).__name__}: {err}"
    if type(top) is not dict or top.get("v") != VERSION:
        return None, "not valid stored data: unknown version"
    if "value" in top:
        return top["value"], None
    name, state = top.get("c"), top.get("d")
    cls: Any = _builtin_tables(name)[0].get(name) if type(name) is str else None
    if cls is None and type(name) is str:
        cls = _project().get(name)
    if cls is None:
        return None, (
            f"refused: {name} is not a message class the stored form restores; if it is "
            f'your own EmailMessage subclass, add "{name}" to MAILER_MESSAGE_CLASSES.'
        )
    if type(state) is not dict or any(type(k) is not str or k[:2] == "__" for k in state):
        return None, "not valid stored data: bad attributes"
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj, None
