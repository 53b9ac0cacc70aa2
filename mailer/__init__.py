"""django-mailer: queue outgoing email in the database, send it later.

The functions here mirror ``django.core.mail``'s but put the message on the
queue (inside the caller's transaction) instead of sending it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

# Neither needs the app registry (mailer.models does: imported on first use).
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.encoding import force_str

from mailer.priorities import get_priority

if TYPE_CHECKING:
    from collections.abc import Callable

    from mailer.backend import DbBackend
    from mailer.monitoring import MessageStatus

__version__ = "3.0.0"

__all__ = [
    "get_priority",
    "mail_admins",
    "mail_managers",
    "send_html_mail",
    "send_mail",
    "send_mass_mail",
    "status",
]


_loaded: list[tuple[Callable[..., int], type[DbBackend]]] = []


def _queueing() -> tuple[Callable[..., int], type[DbBackend]]:
    """``(queue_emails, DbBackend)``, imported on the first call (the app
    registry isn't ready when Django imports this package), then kept: an
    import statement per call is a few per cent of a ``send_mail``."""
    if not _loaded:
        from mailer.backend import DbBackend
        from mailer.queueing import queue_emails

        _loaded.append((queue_emails, DbBackend))
    return _loaded[0]


def _deliver(
    emails: Sequence[Any],
    priority: int | str | None,
    *,
    using: str | None = None,
    connection: Any = None,
    send_at: Any = None,
) -> int:
    """Queue ``emails`` (``using``: for that route), or hand them to the
    backend instance the caller gave (``connection``, not a ``DbBackend``).

    ``send_at``: not sent before then (on the queue; a mailer named by the
    caller gets it as the message's ``send_at`` attribute, anymail's way).
    """
    queue_emails, db_backend = _queueing()
    if using is not None:
        # A route, or (Django 6.1) a queue alias of MAILERS: queued for
        # delivery through that route (see mailer.routes).
        from mailer.routes import resolve_using

        target = resolve_using(using)
        return queue_emails(
            emails,
            priority=get_priority(target.priority if priority is None else priority),
            batch_size=target.batch_size,
            send_at=send_at,
            route=target.route,
        )
    priority = get_priority(priority)
    if connection is not None and not isinstance(connection, db_backend):
        # The caller asked for this mailer explicitly: send through it.
        if send_at is not None:
            for email in emails:
                email.send_at = send_at
        return connection.send_messages(list(emails)) or 0
    if connection is None:
        return queue_emails(emails, priority=priority, send_at=send_at)
    return queue_emails(
        emails,
        priority=priority,
        batch_size=connection.batch_size,
        send_at=send_at,
        route=connection.route,
    )


def _make_email(
    subject: Any,
    message: Any,
    from_email: str | None,
    recipient_list: Iterable[str] | None,
    *,
    html_message: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    if isinstance(recipient_list, str):
        # Django's own words; list("a@example.com") would be single letters.
        raise TypeError('"to" argument must be a list or tuple')
    # Lazy (translated) strings become plain strings now.
    kwargs = {
        "subject": force_str(subject),
        "body": force_str(message),
        "from_email": from_email,
        "to": list(recipient_list or []),
        "headers": dict(headers) if headers else None,
    }
    if html_message is None:
        return EmailMessage(**kwargs)
    email = EmailMultiAlternatives(**kwargs)
    email.attach_alternative(force_str(html_message), "text/html")
    return email


def send_mail(
    subject: Any,
    message: Any,
    from_email: str | None,
    recipient_list: Iterable[str],
    priority: int | str | None = None,
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    *,
    html_message: str | None = None,
    connection: Any = None,
    using: str | None = None,
    send_at: Any = None,
) -> int:
    """Queue one message (with an optional HTML alternative).

    Returns how many messages were queued: 1, or 0 for an empty
    ``recipient_list``. Addresses on the don't-send list are queued like any
    other and dropped when the message's turn comes (a message left with
    nobody is then logged "don't send", as in 2.3.2). ``fail_silently``, ``auth_user`` and ``auth_password`` are
    accepted for compatibility and ignored: nothing is sent now.

    ``send_at``: not sent before this time (an aware ``datetime``; a naive one
    is in the current time zone; a time in the past means now).
    """
    email = _make_email(subject, message, from_email, recipient_list, html_message=html_message)
    return _deliver([email], priority, using=using, connection=connection, send_at=send_at)


def send_html_mail(
    subject: Any,
    message: Any,
    message_html: Any,
    from_email: str | None,
    recipient_list: Iterable[str],
    priority: int | str | None = None,
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    connection: Any = None,
    using: str | None = None,
    send_at: Any = None,
) -> int:
    """Queue a text message with a ``text/html`` alternative.

    Returns how many were queued (1, or 0 with nobody to send to).
    ``send_at`` as for :func:`send_mail`.
    """
    email = _make_email(
        subject, message, from_email, recipient_list, html_message=message_html, headers=headers
    )
    return _deliver([email], priority, using=using, connection=connection, send_at=send_at)


def send_mass_mail(
    datatuple: Iterable[tuple[Any, Any, str | None, Iterable[str]]],
    fail_silently: bool = False,
    auth_user: str | None = None,
    auth_password: str | None = None,
    connection: Any = None,
    *,
    priority: int | str | None = None,
    using: str | None = None,
) -> int:
    """Queue one message per ``(subject, message, sender, recipients)``.

    All of them go in one bulk insert. Returns how many were queued.
    """
    emails = [_make_email(s, m, f, r) for s, m, f, r in datatuple]
    return _deliver(emails, priority, using=using, connection=connection)


def _mail_server_people(
    setting_name: str,
    subject: Any,
    message: Any,
    *,
    connection: Any,
    priority: int | str | None,
    html_message: str | None,
    using: str | None,
) -> int:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.utils.encoding import force_str

    people = getattr(settings, setting_name)
    if not people:
        return 0
    addresses = []
    for entry in people:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            addresses.append(entry[1])  # (name, address), Django < 6.0 style
        elif not isinstance(entry, (list, tuple)):
            addresses.append(entry)  # a plain (maybe lazy) address, checked when queued
        else:
            raise ImproperlyConfigured(
                f"{setting_name} must be a list of email addresses (or of "
                f"(name, address) pairs); found {entry!r}."
            )
    email = _make_email(
        f"{settings.EMAIL_SUBJECT_PREFIX}{force_str(subject)}",
        message,
        settings.SERVER_EMAIL,
        addresses,
        html_message=html_message,
    )
    return _deliver([email], priority, using=using, connection=connection)


def status(message_id: str) -> MessageStatus | None:
    """What happened to the message with this Message-ID (``None``: never queued).

    ``message_id`` is the header's value, angle brackets included: the one
    the queued ``EmailMessage`` carries in ``extra_headers["Message-ID"]``
    (given at queue time) and the recipient sees. Returns a
    :class:`mailer.monitoring.MessageStatus` with ``state`` ("queued",
    "scheduled", "deferred", "sent", "failed" or "dont_send"), ``attempts``,
    ``last_attempt``, ``next_attempt`` and ``error``. At most two queries.
    """
    from mailer.monitoring import message_status

    return message_status(message_id)


def mail_admins(
    subject: Any,
    message: Any,
    fail_silently: bool = False,
    connection: Any = None,
    priority: int | str | None = None,
    *,
    html_message: str | None = None,
    using: str | None = None,
) -> int:
    """Queue a message to ``ADMINS`` (addresses or (name, address) pairs)."""
    return _mail_server_people(
        "ADMINS",
        subject,
        message,
        connection=connection,
        priority=priority,
        html_message=html_message,
        using=using,
    )


def mail_managers(
    subject: Any,
    message: Any,
    fail_silently: bool = False,
    connection: Any = None,
    priority: int | str | None = None,
    *,
    html_message: str | None = None,
    using: str | None = None,
) -> int:
    """Queue a message to ``MANAGERS`` (addresses or (name, address) pairs)."""
    return _mail_server_people(
        "MANAGERS",
        subject,
        message,
        connection=connection,
        priority=priority,
        html_message=html_message,
        using=using,
    )
