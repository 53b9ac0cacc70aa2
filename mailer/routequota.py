"""The shared state of each route's provider quota and pause: one row per route."""

from __future__ import annotations

from django.db import models

from mailer.conf import ROUTE_MAX_LENGTH


class RouteQuota(models.Model):
    """What every worker sharing the database knows of one route's quota.

    Times are microseconds since the Unix epoch (UTC), whole numbers, so
    that a worker can give a slot back by comparing exactly. ``slot_at``:
    the earliest time the next message may go under the route's per-second
    limit (a GCRA's theoretical arrival time). ``*_window``/``*_count``: the
    current minute, hour and UTC day (their number since the epoch) and how
    many messages were handed to the provider in it. ``paused_until``: the
    provider asked to slow down (SMTP 421, HTTP 429) and nothing goes out
    before then; ``pauses`` counts the pauses in a row, for the back-off.
    """

    route = models.CharField(max_length=ROUTE_MAX_LENGTH, unique=True)
    slot_at = models.BigIntegerField(default=0)
    m_window = models.BigIntegerField(default=0)
    m_count = models.BigIntegerField(default=0)
    h_window = models.BigIntegerField(default=0)
    h_count = models.BigIntegerField(default=0)
    d_window = models.BigIntegerField(default=0)
    d_count = models.BigIntegerField(default=0)
    paused_until = models.BigIntegerField(default=0)
    pauses = models.IntegerField(default=0)
    pause_reason = models.TextField(blank=True, default="")

    class Meta:
        app_label = "mailer"
        verbose_name = "route quota"

    def __str__(self) -> str:
        return self.route
