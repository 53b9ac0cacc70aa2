"""``purge_deferred``: old deferred messages leave the queue, each logged as a failure."""

import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer.management.base import MailerCommand
from mailer.purge import purge_deferred, purgeable

logger = logging.getLogger("mailer.commands")


class Command(MailerCommand):
    help = (
        "Take deferred messages queued more than DAYS days ago off the queue, each "
        "logged as a failure with the reason."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "days", type=float, help="Remove deferred messages queued more than DAYS days ago."
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only say how many messages would be removed.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="Messages per transaction (default MAILER_PURGE_BATCH_SIZE, 10000).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        days = options["days"]
        if not days >= 0:  # NaN too
            raise CommandError("DAYS must be 0 or more.")
        if options["batch_size"] is not None and options["batch_size"] < 1:
            raise CommandError("--batch-size must be 1 or more.")
        if options["dry_run"]:
            count = purgeable(days).count()
            self.say(
                options,
                f"purge_deferred: {count} deferred message(s) queued more than {days:g} "
                "day(s) ago would be removed (dry run, nothing changed)",
            )
            return
        count = purge_deferred(days, batch_size=options["batch_size"])
        self.report(
            options,
            f"purge_deferred: {count} deferred message(s) queued more than {days:g} day(s) "
            "ago removed, each logged as a failure",
            logger,
            logging.INFO,
            "%s deferred message(s) removed from the queue",
            count,
        )
