"""What differs between the Django versions we support in a message itself.

How an address is checked, Django's header error, the named alternatives and
attachments of Django 5.2+, and how a message pickled by an older Django is
repaired after unpickling (re-exported by :mod:`mailer.compat`).
"""

from __future__ import annotations

import warnings
from typing import Any

import django
from django.core.mail import EmailMessage

DJANGO_VERSION = django.VERSION[:2]
HAS_MAILERS = DJANGO_VERSION >= (6, 1)


# --- addresses ------------------------------------------------------------

if DJANGO_VERSION >= (6, 0):
    from django.core.mail.backends.smtp import EmailBackend as _SMTPBackend

    _prep = _SMTPBackend.__new__(_SMTPBackend)

    def check_address(address: Any, encoding: str, *, utf8: bool = False) -> None:
        """``ValueError`` for an address Django's SMTP backend would refuse.

        ``utf8``: as it is with SMTPUTF8 (a non-ASCII local part is fine).
        """
        _prep.prep_address(address, force_ascii=not utf8)  # type: ignore[attr-defined]

else:
    from django.core.mail.message import sanitize_address

    def check_address(address: Any, encoding: str, *, utf8: bool = False) -> None:
        """``ValueError`` for an address Django's SMTP backend would refuse
        (it encodes a non-ASCII local part: ``utf8`` changes nothing)."""
        sanitize_address(address, encoding)


#: Does Django decode a ``text/*`` attachment given as bytes when it sends?
#: (Before 6.1 only ``attach()`` does; a triple put in ``attachments``
#: directly fails when the message is built.)
TEXT_ATTACHMENT_BYTES = DJANGO_VERSION >= (6, 1)


with warnings.catch_warnings():
    # Django may deprecate the name in favour of plain ValueError.
    warnings.simplefilter("ignore")
    try:
        from django.core.mail import BadHeaderError
    except ImportError:  # pragma: no cover - depends on the Django version
        BadHeaderError = ValueError  # type: ignore[misc, assignment]


# --- repairing messages pickled by an older Django -----------------------

if DJANGO_VERSION >= (5, 2):
    from django.core.mail.message import EmailAlternative, EmailAttachment
else:  # pragma: no cover - depends on the Django version
    # Neither class exists before Django 5.2 (the stubs describe 5.2).
    EmailAlternative = EmailAttachment = None  # type: ignore[misc, assignment]


def repair_email(email: Any) -> Any:
    """Bring an unpickled message up to the running Django's expectations.

    * Django < 5.2 stored alternatives and attachments as plain tuples; 5.2+
      reads ``.content``/``.mimetype`` from named tuples.
    * Django < 6.1 kept the connection in ``connection``; 6.1 reads
      ``_connection`` (and a stored connection is never wanted anyway).
    * Django 6.1 refuses an instance ``mixed_subtype``/``alternative_subtype``
      (the "related" inline-image recipe): such a message goes out as
      ``multipart/mixed`` instead of failing forever.
    """
    state = getattr(email, "__dict__", None)
    if state is None:
        return email
    # Never resurrect a pickled connection: the worker provides its own.
    if HAS_MAILERS:
        state.pop("connection", None)
        state["_connection"] = None
    else:
        state["connection"] = None
    for name in ("mixed_subtype", "alternative_subtype"):
        if name in state and not hasattr(type(email), name):
            del state[name]
    if EmailAlternative is not None:
        alternatives = state.get("alternatives")
        if alternatives:
            state["alternatives"] = [
                a if isinstance(a, EmailAlternative) else EmailAlternative(*a) for a in alternatives
            ]
        attachments = state.get("attachments")
        if attachments:
            state["attachments"] = [
                EmailAttachment(*a)
                if isinstance(a, tuple) and not isinstance(a, EmailAttachment)
                else a
                for a in attachments
            ]
    return email


def strip_connection(email: EmailMessage) -> dict[str, Any] | None:
    """Detach the connection before pickling; return what to restore."""
    state = email.__dict__
    saved = {k: state[k] for k in ("connection", "_connection") if state.get(k) is not None}
    for key in saved:
        state[key] = None
    return saved or None
