"""The overview at the top of the admin's message list.

Counts by state, and a chart of outcomes (sent / deferred / failed) per hour
over the last 48 hours, drawn here as inline SVG: no JavaScript, nothing
loaded from anywhere. Two queries whatever the size of the queue and the
log (see :mod:`mailer.monitoring`): the queue's counts stop at
``COUNT_CAP`` rows each, as the list's own count does. A third reads the
routes' quota rows: a route paused by its provider or over its quota is
named, with the reason.
"""

from __future__ import annotations

import datetime as dt

from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from mailer import quotastatus
from mailer.models import PRIORITY_DEFERRED
from mailer.monitoring import capped_state_counts, hourly_outcomes

#: Hours the chart covers.
HOURS = 48

#: Stacked bottom to top: (outcome, colour).
SERIES = (("sent", "#2e7d32"), ("deferred", "#ed8b00"), ("failed", "#c62828"))

BAR = 12  # px per hour
GAP = 2
LEFT = 44  # room for the y-axis labels
TOP = 8
PLOT_HEIGHT = 120
BOTTOM = 22  # room for the hour labels


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _n(value: float) -> str:
    """A coordinate for SVG: one decimal."""
    return f"{value:.1f}"


def _label(start: dt.datetime, fmt: str) -> str:
    return date_format(timezone.localtime(start), fmt)


def outcome_chart(hours: list[tuple[dt.datetime, dict[str, int]]]) -> SafeString:
    """Stacked bars, one per hour, as an ``<svg>`` element (escaped text only)."""
    top = nice_ceiling(max((sum(c[n] for n, _col in SERIES) for _s, c in hours), default=0))
    width = LEFT + len(hours) * BAR + 4
    height = TOP + PLOT_HEIGHT + BOTTOM
    scale = PLOT_HEIGHT / top
    bottom = TOP + PLOT_HEIGHT
    parts: list[SafeString] = []
    # Grid lines and their labels: 0, half, top.
    for value in (0, top // 2 if top >= 2 else None, top):
        if value is None:
            continue
        y = bottom - value * scale
        parts.append(
            format_html(
                '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999" stroke-width="0.5"/>'
                '<text x="{}" y="{}" text-anchor="end" font-size="10" fill="currentColor">'
                "{}</text>",
                LEFT - 2,
                _n(y),
                width - 2,
                _n(y),
                LEFT - 5,
                _n(y + 3.5),
                value,
            )
        )
    for index, (start, counts) in enumerate(hours):
        x = LEFT + index * BAR
        end = start + dt.timedelta(hours=1)
        title = _("%(start)s–%(end)s: %(sent)d sent, %(deferred)d deferred, %(failed)d failed") % {
            "start": _label(start, "SHORT_DATETIME_FORMAT"),
            "end": _label(end, "H:i"),
            "sent": counts["sent"],
            "deferred": counts["deferred"],
            "failed": counts["failed"],
        }
        rects = []
        y = float(bottom)
        for name, colour in SERIES:
            h = counts[name] * scale
            if counts[name]:
                h = max(h, 1.0)  # one failure among thousands still shows
                y -= h
                rects.append(
                    format_html(
                        '<rect class="mailer-bar-{}" x="{}" y="{}" width="{}" height="{}" '
                        'fill="{}"/>',
                        name,
                        x,
                        _n(y),
                        BAR - GAP,
                        _n(h),
                        colour,
                    )
                )
        # A transparent full-height target so the tooltip shows on empty hours too.
        parts.append(
            format_html(
                '<g class="mailer-hour"><title>{}</title>'
                '<rect x="{}" y="{}" width="{}" height="{}" fill="transparent"/>{}</g>',
                title,
                x,
                TOP,
                BAR,
                PLOT_HEIGHT,
                SafeString("".join(rects)),
            )
        )
        local = timezone.localtime(start)
        if local.hour % 6 == 0:
            parts.append(
                format_html(
                    '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999" stroke-width="0.5"/>'
                    '<text x="{}" y="{}" font-size="10" fill="currentColor">{}</text>',
                    x,
                    bottom,
                    x,
                    bottom + 4,
                    x,
                    bottom + 15,
                    _label(start, "H:i") if local.hour else _label(start, "M j"),
                )
            )
    total = {name: sum(c[name] for _s, c in hours) for name, _col in SERIES}
    summary = _(
        "Outcomes per hour over the last %(hours)d hours: %(sent)d sent, %(deferred)d "
        "deferred, %(failed)d failed."
    ) % {"hours": len(hours), **total}
    return format_html(
        '<svg class="mailer-chart" xmlns="http://www.w3.org/2000/svg" role="img" '
        'width="{}" height="{}" viewBox="0 0 {} {}" style="max-width: 100%; height: auto">'
        "<title>{}</title>{}</svg>",
        width,
        height,
        width,
        height,
        summary,
        SafeString("".join(parts)),
    )


def _legend() -> SafeString:
    return format_html_join(
        " ",
        '<span class="mailer-legend"><span style="display: inline-block; width: 0.8em; '
        'height: 0.8em; background: {}; vertical-align: middle"></span> {}</span>',
        ((colour, label) for (_name, colour), label in zip(SERIES, _series_labels(), strict=True)),
    )


def _series_labels() -> list[str]:
    return [_("sent"), _("deferred"), _("failed")]


#: Queue rows counted at most per state (like the list's own count).
COUNT_CAP = 10_000


def _count(template_one: str, template_many: str, count: int, cap: int) -> str:
    """``"3 queued"``; past the cap ``"10000+ queued"``."""
    shown = f"{cap}+" if count > cap else str(count)
    return ngettext(template_one, template_many, min(count, cap)) % {"count": shown}


def overview(
    changelist_url: str, now: dt.datetime | None = None, cap: int | None = None
) -> SafeString:
    """The counts, held routes and the chart, as HTML for the top of the message list
    (three queries)."""
    cap = COUNT_CAP if cap is None else cap
    now = now or timezone.now()
    counts = capped_state_counts(now, cap)
    hours = hourly_outcomes(HOURS, now=now)
    deferred_link = format_html(
        '<a href="{}?priority={}">{}</a>',
        changelist_url,
        PRIORITY_DEFERRED,
        _count("%(count)s deferred", "%(count)s deferred", counts["deferred"], cap),
    )
    states = format_html(
        "<strong>{}</strong> · {} · <strong>{}</strong> ({})",
        _count("%(count)s queued", "%(count)s queued", counts["queued"], cap),
        _count("%(count)s scheduled", "%(count)s scheduled", counts["scheduled"], cap),
        deferred_link,
        _count(
            "%(count)s waiting for an operator",
            "%(count)s waiting for an operator",
            counts["deferred_waiting"],
            cap,
        ),
    )
    return format_html(
        '<div class="mailer-overview module" style="padding: 0.5em 1em; margin-bottom: 1em">'
        '<p class="mailer-states" style="margin: 0 0 0.5em">{}</p>{}{}'
        '<p class="mailer-legend-line" style="margin: 0.25em 0 0; font-size: 0.9em">{}</p>'
        "</div>",
        states,
        held_routes(),
        outcome_chart(hours),
        _legend(),
    )


def held_routes() -> SafeString:
    """A line per route whose mail waits for its provider's pause or its
    quota, saying why and for how long (one query of the routes' rows)."""
    lines = []
    for name, row in sorted(quotastatus.rows().items()):
        state = quotastatus.quota_state(name, row)
        if state["paused"]:
            text = _(
                "Route %(route)s is paused for %(seconds)ss more at its provider's request "
                "(%(reason)s): its mail waits on the queue."
            ) % {
                "route": name,
                "seconds": f"{state['paused_for_seconds']:.0f}",
                "reason": state["pause_reason"] or _("pushback"),
            }
        elif state["waiting_for"] == "rate limit":
            used = ", ".join(f"{lim['used']} of {lim['rate']}" for lim in state["limits"])
            text = _("Route %(route)s has used its quota (%(used)s): its mail waits on the queue.") % {
                "route": name,
                "used": used,
            }
        else:
            continue
        lines.append((text,))
    if not lines:
        return SafeString("")
    return format_html_join(
        "",
        '<p class="mailer-held" style="margin: 0 0 0.5em; color: #ba2121"><strong>{}</strong></p>',
        lines,
    )
