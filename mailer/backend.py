"""``DbBackend``: an email backend that puts messages on the queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend

from mailer.compat import HAS_MAILERS
from mailer.priorities import get_priority


class DbBackend(BaseEmailBackend):
    """Queue every message instead of sending it.

    Use it as ``EMAIL_BACKEND = "mailer.backend.DbBackend"`` or, on Django
    6.1+, as a ``MAILERS`` entry. Options (``OPTIONS`` in ``MAILERS``, or
    keyword arguments): ``batch_size`` (bulk insert batch size, default
    ``MAILER_MESSAGES_BATCH_SIZE``), ``priority`` (``1``-``4`` or a label,
    default medium) and ``using`` (the route: the alias the queued mail is
    delivered through, see :mod:`mailer.routes`; default: as before).
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        batch_size: int | None = None,
        priority: int | str | None = None,
        using: str | None = None,
        **kwargs: Any,
    ) -> None:
        if HAS_MAILERS:
            # Django 6.1 deprecates fail_silently in the base class: we keep
            # our own; ``alias`` and anything unknown go to the base class,
            # which reports unknown MAILERS options.
            super().__init__(**kwargs)
        else:
            super().__init__(fail_silently=fail_silently, **kwargs)
            self.alias = kwargs.get("alias")
        self.fail_silently = fail_silently
        self.batch_size = batch_size
        self.priority = get_priority(priority)
        # DEP 0018's wrapper option: the route (alias) this queue's mail is
        # delivered through; None: the delivery backend chosen as before.
        self.route = using
        if using is not None:
            from mailer.routes import require_route

            require_route(using)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Store the messages on the queue; return how many were stored."""
        # Imported here, as before the move: mailer.queueing imports the
        # models, which need the app registry.
        from mailer.queueing import queue_emails

        if not email_messages:
            return 0
        return queue_emails(
            email_messages,
            priority=self.priority,
            batch_size=self.batch_size,
            route=self.route,
        )
