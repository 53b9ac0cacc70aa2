"""What queue time refuses: a message is checked before anything is stored.

A message that could never be sent must fail in the caller's code, not later
in the worker (where it would be deferred and stop a pass again after every
``retry_deferred``). :func:`validate_email` raises ``ValueError`` naming the
field (``to[0]``, ``extra_headers['X-Tag']``, ``attachments[1] filename``...):

* a newline or another control character in anything that becomes a header
  (subject, addresses, extra headers, attachment file names and MIME types):
  Django's own ``BadHeaderError``, a ``ValueError``;
* an empty or unparseable address in from, to, cc, bcc or reply-to (the
  message starts with Django's own wording, ``Invalid address ...``; whether
  a non-ASCII local part is acceptable is the delivery backend's call:
  :func:`mailer.compat.accepts_utf8_local_parts`);
* an extra header name that is not a header field name (printable ASCII
  without a space or a colon);
* an attachment that is neither a ``(filename, content, mimetype)`` triple
  nor a MIME part, or whose content is not text, bytes or a message.

:func:`force_lazy` turns lazy (translated) strings into plain ones under the
caller's active language, so a message is sent in the language it was queued
in. :func:`encode_for_queue` stores a message, refusing one that can't be
pickled or that the worker's allow-listed decoder would refuse, and names the
attribute that is the problem.
"""

from __future__ import annotations

import base64
import copy
import email.message
import pickle
import re
from collections.abc import Callable
from email.headerregistry import Address
from typing import Any, NoReturn

from django.conf import settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.functional import Promise

from mailer import dataform
from mailer.attachments import StoredAttachment
from mailer.compat import accepts_utf8_local_parts
from mailer.emailcompat import (
    TEXT_ATTACHMENT_BYTES,
    BadHeaderError,
    EmailAlternative,
    EmailAttachment,
    check_address,
)
from mailer.storage import RefusedClass, message_format, pickle_to_db, safe_loads

REFUSED = "django-mailer refused to queue this message"

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# A bare ASCII addr-spec (local@domain.tld) that every Django accepts as is:
# those skip the full RFC 5322 parser, which would dominate queueing time.
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*\Z")
# Every control character but tab, and the Unicode line separators: Python's
# email package turns some of them (e.g. \x0b, \x1c, \u2028) into line breaks
# when it writes a header, which is header injection without a "\n".
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A header field name (RFC 5322 2.2): printable ASCII but space and colon.
# Anything else is written as is and makes another header ("X A: b: v").
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")


def _refuse_header(field: str, text: str, char: str) -> NoReturn:
    if char in "\r\n":
        problem = "can't contain newlines"
    else:
        problem = f"can't contain the control character U+{ord(char):04X}"
    raise BadHeaderError(f"{REFUSED}: {field} {problem} (got {text!r}).")


def check_header(field: str, value: Any) -> str:
    """``value`` as text; ``BadHeaderError`` if it can't go into a header."""
    text = str(value)
    found = _UNSAFE_IN_HEADER.search(text)
    if found:
        _refuse_header(field, text, found.group())
    return text


def _invalid_address(field: str, detail: str) -> ValueError:
    """Django's own words (``Invalid address ...``), then the field."""
    return ValueError(f"{detail} ({field}; {REFUSED}).")


def check_address_field(field: str, address: Any, encoding: str) -> None:
    """Refuse an empty, header-unsafe or unparseable address.

    The error starts as Django's does (``Invalid address ...``): sites'
    code and tests match on those words.
    """
    if address is None or (isinstance(address, str) and not address.strip()):
        raise _invalid_address(field, f"Invalid address {address!r}: it is empty")
    if not isinstance(address, (str, Promise, Address)):
        raise _invalid_address(
            field,
            f"Invalid address {address!r}: it must be a string, not {type(address).__name__}",
        )
    text = check_header(field, address)
    if isinstance(address, str) and _PLAIN_ADDRESS.match(text):
        return
    # The object itself: whether an Address object is accepted is Django's call.
    value = text if isinstance(address, Promise) else address
    try:
        check_address(value, encoding)
    except (ValueError, TypeError, IndexError) as err:
        if not text.isascii() and _utf8_retry(value, encoding):
            return
        detail = str(err)
        if not detail.startswith("Invalid address"):
            # Django < 6 raises TypeError for "<>" (an address without addr-spec).
            detail = f'Invalid address "{text}" ({type(err).__name__}: {err})'
        raise _invalid_address(field, detail) from err


def _utf8_retry(value: Any, encoding: str) -> bool:
    """Is ``value`` acceptable to a delivery backend that speaks SMTPUTF8,
    and is the delivery backend one (:func:`mailer.compat.accepts_utf8_local_parts`)?"""
    if not accepts_utf8_local_parts():
        return False
    try:
        check_address(value, encoding, utf8=True)
    except (ValueError, TypeError, IndexError):
        return False
    return True


def _attachment_parts(attachment: Any) -> tuple[Any, Any] | None:
    """``(filename, mimetype)`` of an attachment tuple, or None (a MIME part)."""
    if isinstance(attachment, (tuple, list)) and len(attachment) == 3:
        return attachment[0], attachment[2]
    return None


#: What an attachment triple's content may be: text, bytes, a message (for
#: ``message/rfc822``), or the stand-in of a stored attachment (a requeue).
_CONTENT_TYPES = (str, bytes, bytearray, memoryview, email.message.Message, EmailMessage,
                  StoredAttachment)
#: For a ``text/*`` triple: bytes only where Django decodes them when it sends.
_TEXT_CONTENT_TYPES = (str, StoredAttachment) + ((bytes,) if TEXT_ATTACHMENT_BYTES else ())


def check_attachment(index: int, attachment: Any) -> None:
    """Refuse an attachment Django could not turn into a MIME part when sending."""
    field = f"attachments[{index}]"
    if isinstance(attachment, email.message.Message):  # a MIME part (MIMEBase, MIMEPart)
        for name, value in attachment.items():
            check_header(f"{field} header {name!r}", value)
        return
    parts = _attachment_parts(attachment)
    if parts is None:
        shape = (
            f"a {len(attachment)}-item {type(attachment).__name__}"
            if isinstance(attachment, (tuple, list))
            else f"a {type(attachment).__name__}"
        )
        raise ValueError(
            f"{REFUSED}: {field} must be a (filename, content, mimetype) triple or a MIME "
            f"part (email.message.Message), not {shape} ({attachment!r:.100})."
        )
    filename, mimetype = parts
    if filename is not None and not isinstance(filename, str):
        raise ValueError(
            f"{REFUSED}: {field} filename must be a string, not {type(filename).__name__}."
        )
    if not isinstance(mimetype, str) or "/" not in mimetype:
        what = type(mimetype).__name__ if not isinstance(mimetype, str) else repr(mimetype)
        raise ValueError(
            f"{REFUSED}: {field} mimetype must be a string such as 'text/plain', not {what}."
        )
    content = attachment[1]
    text_types = _TEXT_CONTENT_TYPES if mimetype.lower().startswith("text/") else _CONTENT_TYPES
    # Content that can't be pickled is named by the storage check instead.
    if not isinstance(content, text_types) and not _unpicklable(content):
        kinds = "str" if text_types is _TEXT_CONTENT_TYPES else "str or bytes"
        raise ValueError(
            f"{REFUSED}: {field} content must be {kinds} (or a message for "
            f"message/rfc822), not {type(content).__name__} ({content!r:.100})."
        )
    if filename is not None:
        check_header(f"{field} filename", filename)
    check_header(f"{field} mimetype", mimetype)


def check_header_name(name: Any) -> None:
    """Refuse an extra header name that would not be written as one header."""
    field = f"the name of extra_headers[{name!r}]"
    text = check_header(field, name)
    if not _FIELD_NAME.match(text):
        raise BadHeaderError(
            f"{REFUSED}: {field} must be printable ASCII without spaces or colons "
            f"(got {text!r})."
        )


def validate_email(email: EmailMessage) -> None:
    """Raise ``ValueError`` (naming the field) for a message that can't be sent.

    Checks what Django checks when it sends, and what it lets through but the
    email package turns into header injection. Plain ``local@domain``
    addresses are recognised cheaply; anything else goes through Django's
    own address check.
    """
    check_header("subject", email.subject)
    for name, value in email.extra_headers.items():
        check_header_name(name)
        check_header(f"extra_headers[{name!r}]", value)
    encoding = email.encoding or settings.DEFAULT_CHARSET
    check_address_field("from_email", email.from_email, encoding)
    for field in ("to", "cc", "bcc", "reply_to"):
        for index, address in enumerate(getattr(email, field, None) or []):
            check_address_field(f"{field}[{index}]", address, encoding)
    for index, alternative in enumerate(getattr(email, "alternatives", None) or []):
        if isinstance(alternative, (tuple, list)) and len(alternative) == 2:
            check_header(f"alternatives[{index}] mimetype", alternative[1])
    for index, attachment in enumerate(email.attachments or []):
        check_attachment(index, attachment)


_STRINGS = frozenset({str})
_ENCODINGS = frozenset({str, type(None)})
#: Every attribute Django's message classes set (4.2 to 6.1); a message with
#: any other attribute takes the full checks.
_KNOWN_ATTRIBUTES = frozenset(
    {
        "to",
        "cc",
        "bcc",
        "reply_to",
        "from_email",
        "subject",
        "body",
        "attachments",
        "alternatives",
        "extra_headers",
        "encoding",
        "connection",
        "_connection",
    }
)


def quick_check(email: EmailMessage) -> bool | None:
    """:func:`simple_message` and :func:`validate_email` at once, for what
    ``send_mail`` and ``send_mass_mail`` make, without a loop in Python.

    ``True``: a simple message (plain strings, no attachment, no
    alternative) that passes every check: its header text printable, one
    regular expression match per address. ``False``: a simple
    message in some doubt (a control character, an address in another form):
    :func:`validate_email` decides and names the field. ``None``: not such a
    message (an attribute of another kind or name, a lazy string, a subclass):
    the full path (:func:`force_lazy`, :func:`validate_email`, the decoder's
    check in :func:`encode_for_queue`) takes it.
    """
    if type(email) not in _MESSAGE_CLASSES:
        return None
    state = email.__dict__
    if not state.keys() <= _KNOWN_ATTRIBUTES:
        return None
    try:
        subject, sender, headers = state["subject"], state["from_email"], state["extra_headers"]
        to, cc, bcc, reply_to = state["to"], state["cc"], state["bcc"], state["reply_to"]
        if (
            type(state["body"]) is not str
            or type(subject) is not str
            or type(sender) is not str
            or type(headers) is not dict
            or type(state.get("encoding")) not in _ENCODINGS
            or state["attachments"] != []
            or state.get("alternatives", []) != []
        ):
            return None
        addresses = [*to, *cc, *bcc, *reply_to]
        texts = [subject, sender, *headers, *headers.values(), *addresses]
    except (KeyError, TypeError):  # a missing attribute, an address list of another kind
        return None
    if (
        not _STRINGS.issuperset(map(type, texts))  # exactly str: nothing lazy, no subclass
        or type(to) is not list
        or type(cc) is not list
        or type(bcc) is not list
        or type(reply_to) is not list
    ):
        return None
    # Not printable: any control character (tab too), a line or paragraph
    # separator, and some other Unicode (validate_email() lets most through).
    if not (" ".join(texts).isprintable() and all(map(_PLAIN_ADDRESS.match, addresses))):
        return False
    if headers and not all(map(_FIELD_NAME.match, headers)):
        return False  # a space, a colon or non-ASCII in a header name
    # The sender is most often the very same string as the message before's
    # (DEFAULT_FROM_EMAIL, a bulk's one sender): checked once.
    if sender is not _plain_sender[0]:
        if not _PLAIN_ADDRESS.match(sender):
            return False
        _plain_sender[0] = sender
    return True


#: The last sender found plain (any thread's: a str never changes).
_plain_sender: list[Any] = [None]


# --- lazy strings ------------------------------------------------------------


def _force(value: Any) -> Any:
    return str(value) if isinstance(value, Promise) else value


def _force_list(values: Any) -> Any:
    if values and any(isinstance(v, Promise) for v in values):
        return [_force(v) for v in values]
    return values


def _force_pair_items(items: Any, positions: tuple[int, ...]) -> Any:
    """Alternatives/attachments with their lazy strings forced, same types."""
    if not items:
        return items
    changed = False
    result = []
    for item in items:
        if isinstance(item, tuple) and any(isinstance(item[i], Promise) for i in positions):
            values = [_force(v) if i in positions else v for i, v in enumerate(item)]
            item = item._make(values) if hasattr(item, "_make") else tuple(values)
            changed = True
        result.append(item)
    return result if changed else items


def force_lazy(email: EmailMessage) -> EmailMessage:
    """``email`` with lazy (translated) strings made plain, in the active language.

    Subject, body, addresses, extra header names and values, alternatives'
    content and attachments' file names and text content. Returns ``email``
    itself when nothing was lazy, else a shallow copy (the caller's object is
    not changed).
    """
    state = email.__dict__
    changes: dict[str, Any] = {}
    for name in ("subject", "body", "from_email"):
        if isinstance(state.get(name), Promise):
            changes[name] = str(state[name])
    for name in ("to", "cc", "bcc", "reply_to"):
        forced = _force_list(state.get(name))
        if forced is not state.get(name):
            changes[name] = forced
    headers = state.get("extra_headers") or {}
    if any(isinstance(k, Promise) or isinstance(v, Promise) for k, v in headers.items()):
        changes["extra_headers"] = {_force(k): _force(v) for k, v in headers.items()}
    for name, positions in (("alternatives", (0,)), ("attachments", (0, 1))):
        forced = _force_pair_items(state.get(name), positions)
        if forced is not state.get(name):
            changes[name] = forced
    if not changes:
        return email
    forced_email = copy.copy(email)
    forced_email.__dict__.update(changes)
    return forced_email


# --- what can't be stored ----------------------------------------------------

_MAX_DEPTH = 8
_NOT_STORED = ("connection", "_connection")  # email_to_db leaves it out


def _unpicklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return True
    return False


def _refused_on_reading(obj: Any) -> bool:
    """Pickles, but the worker's allow-listed unpickler would refuse it."""
    try:
        safe_loads(pickle.dumps(obj))
    except RefusedClass:
        return True
    except Exception:
        return False
    return False


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    def join(name: str) -> str:
        return f"{path}.{name}" if path else name

    if isinstance(obj, dict):
        return [(f"{path}[{key!r}]", value) for key, value in obj.items()]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # EmailAttachment...
        return [(join(name), value) for name, value in zip(obj._fields, obj, strict=False)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"{path}[{index}]", value) for index, value in enumerate(obj)]
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        return [(join(name), value) for name, value in state.items()]
    return []


def find_unpicklable(
    obj: Any,
    path: str = "",
    *,
    skip: tuple[str, ...] = (),
    fails: Callable[[Any], bool] = _unpicklable,
) -> str | None:
    """Where in ``obj`` pickling fails, or ``None`` when ``obj`` pickles.

    The path of the innermost attribute, item or key that can't be pickled,
    as written in Python: ``custom_attr``, ``attachments[0].content``,
    ``extra_headers['X-Foo']``. Top-level attributes named in ``skip`` are
    ignored (the connection, which is never stored). ``""`` when ``obj``
    itself is the problem. ``fails`` says what "can't" means (default: can't
    be pickled).
    """
    return _find(obj, path, skip, 0, fails)


def _find(
    obj: Any, path: str, skip: tuple[str, ...], depth: int, fails: Callable[[Any], bool]
) -> str | None:
    children = [(p, v) for p, v in _children(obj, path) if p not in skip]
    if depth < _MAX_DEPTH:
        for child_path, child in children:
            if fails(child):
                return _find(child, child_path, (), depth + 1, fails) or child_path
    if skip or not fails(obj):
        return None
    return path


_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})
_CONTAINERS = frozenset({list, tuple, *(c for c in (EmailAlternative, EmailAttachment) if c)})
_MESSAGE_CLASSES = frozenset({EmailMessage, EmailMultiAlternatives})


def _plain(obj: Any, depth: int = 0) -> bool:
    """Only builtin atoms in lists, tuples, str-keyed dicts: pickles to no
    global the decoder could refuse. Conservative: anything else is False."""
    kind = type(obj)
    if kind in _ATOMS:
        return True
    if depth > 4:
        return False
    if kind in _CONTAINERS:
        return all(_plain(item, depth + 1) for item in obj)
    if kind is dict:
        return all(type(k) is str and _plain(v, depth + 1) for k, v in obj.items())
    return False


def simple_message(email: EmailMessage) -> bool:
    """Django's own message class holding only plain strings, without
    attachments or alternatives (what ``send_mail`` and ``send_mass_mail``
    make), besides its connection (never stored): nothing lazy, nothing the
    decoder could refuse. :func:`quick_check` decides it."""
    return quick_check(email) is not None


def _plain_message(email: EmailMessage) -> bool:
    """A Django message class holding only plain data (the usual case)."""
    return type(email) in _MESSAGE_CLASSES and all(
        _plain(value) for name, value in email.__dict__.items() if name not in _NOT_STORED
    )


#: The stored names of the classes a simple message can be of.
_SIMPLE_NAMES = {cls: f"{cls.__module__}.{cls.__qualname__}" for cls in _MESSAGE_CLASSES}


def encode_for_queue(email: EmailMessage, *, simple: bool = False) -> str:
    """``email_to_db(email)``, refusing what couldn't be stored or read back.

    ``ValueError`` naming the attribute when something in the message is not
    plain data (the data-only form) or can't be pickled, or when a pickle
    would hold a class the worker's allow-listed decoder would refuse
    (``MAILER_PICKLE_ALLOWLIST``): such a row could never be sent.
    ``simple``: the caller found ``email`` to be a :func:`simple_message`.
    """
    if message_format() != "pickle":
        state = email.__dict__
        if simple and not (len(state["extra_headers"]) == 1 and _tag_like(state["extra_headers"])):
            # Plain strings only: nothing to tag (the connection is stored as None).
            return dataform.encode_simple(
                _SIMPLE_NAMES[type(email)], dataform.without_connection(state)
            )
        try:
            return dataform.encode(email)
        except dataform.NotData as err:
            what = f"its attribute {err.path}" if err.path else "it"
            raise ValueError(
                f"{REFUSED}: {what} can't be stored: {err.problem}. Queued messages are "
                "stored as data: keep only strings, numbers, booleans, None, lists, dicts, "
                "dates, bytes and email.message objects on the message."
            ) from err
    try:
        data = pickle_to_db(email)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as err:
        raise _storage_error(email, err, _unpicklable, "can't be stored") from err
    if simple or _plain_message(email):
        return data  # nothing in it the decoder could refuse: skip the check
    try:
        safe_loads(base64.decodebytes(data.encode("ascii")))
    except RefusedClass as err:
        raise _storage_error(email, err, _refused_on_reading, "would not be read back") from err
    return data


def _tag_like(headers: dict[str, Any]) -> bool:
    return next(iter(headers))[:1] == "$"


def _storage_error(
    email: EmailMessage, err: BaseException, fails: Callable[[Any], bool], problem: str
) -> ValueError:
    where = find_unpicklable(email, skip=_NOT_STORED, fails=fails)
    what = f"its attribute {where}" if where else "it"
    if isinstance(err, RefusedClass):
        return ValueError(f"{REFUSED}: {what} {problem} by the worker: {err}")
    return ValueError(
        f"{REFUSED}: {what} {problem} ({type(err).__name__}: {err}). Queued "
        "messages are pickled: keep only plain data (strings, bytes, numbers, lists, "
        "dicts, dates, email.message objects) on the message."
    )
