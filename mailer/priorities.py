"""The priorities of queued mail: their numbers and labels, and ``get_priority``."""

from __future__ import annotations

import warnings

PRIORITY_HIGH = 1
PRIORITY_MEDIUM = 2
PRIORITY_LOW = 3
PRIORITY_DEFERRED = 4

PRIORITIES = [
    (PRIORITY_HIGH, "high"),
    (PRIORITY_MEDIUM, "medium"),
    (PRIORITY_LOW, "low"),
    (PRIORITY_DEFERRED, "deferred"),
]
PRIORITY_MAPPING = {label: number for number, label in PRIORITIES}


def get_priority(priority: int | str | None) -> int:
    """The priority number for ``priority`` (``None``: medium).

    The labels ``"high"``, ``"medium"``, ``"low"`` and ``"deferred"`` still
    work but are deprecated; pass ``mailer.models.PRIORITY_*``.
    """
    if priority is None:
        return PRIORITY_MEDIUM
    if isinstance(priority, str) and priority in PRIORITY_MAPPING:
        warnings.warn(
            f"Pass one of the mailer.models.PRIORITY_* constants, not {priority!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        return PRIORITY_MAPPING[priority]
    if priority not in PRIORITY_MAPPING.values() or isinstance(priority, bool):
        raise ValueError(
            f"Invalid priority {priority!r}: use one of mailer.models.PRIORITY_HIGH, "
            "PRIORITY_MEDIUM, PRIORITY_LOW or PRIORITY_DEFERRED."
        )
    return int(priority)
