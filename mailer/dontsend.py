"""The don't-send list as one pass sees it: read once, refreshed now and then,
applied to each claimed message."""

from __future__ import annotations

import time

from django.core.mail import EmailMessage

from mailer.models import DontSendEntry

#: How long a pass trusts its copy of the don't-send list before reading it again.
DONT_SEND_REFRESH_SECONDS = 30.0


class DontSendSnapshot:
    """The don't-send list as a pass sees it, applied to each claimed message.

    Read with one query when the pass meets its first message, and again
    whenever the copy is older than ``DONT_SEND_REFRESH_SECONDS``: no query
    per message, and an address added during a long pass is honoured for
    every message whose turn comes at least that long after it was added
    (and for every message of the next pass).
    """

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = refresh_seconds
        self.addresses: frozenset[str] | None = None
        self.loaded_at = 0.0
        self.loads = 0

    def current(self) -> frozenset[str]:
        refresh = (
            DONT_SEND_REFRESH_SECONDS if self.refresh_seconds is None else self.refresh_seconds
        )
        now = time.monotonic()
        if self.addresses is None or now - self.loaded_at >= refresh:
            self.addresses = DontSendEntry.objects.all_addresses()
            self.loaded_at = now
            self.loads += 1
        return self.addresses

    def apply(self, email: EmailMessage) -> list[str]:
        """Drop listed addresses from ``email``'s To, Cc and Bcc; return them."""
        blocked = self.current()
        if not blocked:
            return []
        dropped: list[str] = []
        for field in ("to", "cc", "bcc"):
            values = list(getattr(email, field, None) or [])
            kept = [a for a in values if not DontSendEntry.matches(a, blocked)]
            if len(kept) != len(values):
                dropped.extend(str(a) for a in values if DontSendEntry.matches(a, blocked))
                setattr(email, field, kept)
        return dropped
