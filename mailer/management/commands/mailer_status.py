"""``mailer_status``: the state of the queue and the log, as text or JSON, for people and monitors."""

import argparse
import json
from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer.management.base import MailerCommand
from mailer.monitoring import queue_summary, summary_problems, summary_text
from mailer.routestatus import route_lines, route_summary


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {number}")
    return number


class Command(MailerCommand):
    help = (
        "Queue health for people and monitors: counts by state and priority, how long "
        "mail has waited, the last success, outcomes in the last hour and day. "
        "Exits 1 when a --max-* threshold is exceeded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")
        parser.add_argument(
            "--max-age",
            type=_non_negative,
            default=None,
            metavar="SECONDS",
            help="Exit 1 when a message that should have gone out by now (queued, deferred, "
            "waiting for a retry; not one scheduled for later) has waited longer than SECONDS.",
        )
        parser.add_argument(
            "--max-deferred",
            type=_non_negative,
            default=None,
            metavar="COUNT",
            help="Exit 1 when more than COUNT messages are deferred (waiting for an "
            "automatic retry or for an operator).",
        )
        parser.add_argument(
            "--max-silence",
            type=_non_negative,
            default=None,
            metavar="SECONDS",
            help="Exit 1 when mail is waiting and nothing was sent for SECONDS.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        summary = queue_summary()
        by_route = route_summary(summary.now)
        problems = summary_problems(
            summary,
            max_age=options["max_age"],
            max_deferred=options["max_deferred"],
            max_silence=options["max_silence"],
        )
        if options["json"]:
            data = summary.as_dict()
            data["ok"] = not problems
            data["problems"] = problems
            data["routes"] = by_route
            self.stdout.write(json.dumps(data, sort_keys=True))
        else:
            self.stdout.write("\n".join([summary_text(summary, problems), *route_lines(by_route)]))
        if problems:
            raise CommandError("; ".join(problems), returncode=1)
