"""``mailer_convert``: rewrite the pickled rows of the queue and the log in the data-only stored form."""

import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer.conf import conf
from mailer.convert import Converted, convert_table
from mailer.management.base import MailerCommand
from mailer.models import Message, MessageLog

logger = logging.getLogger("mailer.commands")


class Command(MailerCommand):
    help = (
        "Rewrite the pickled rows of the queue and the log in the data-only stored form "
        "(MAILER_MESSAGE_FORMAT = \"json\"), after which MAILER_READ_PICKLE can be False."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Read and convert every pickled row, write nothing; say what would be done.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=500,
            metavar="N",
            help="Rows per batch (one transaction each; default 500).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be 1 or more.")
        if not conf.READ_PICKLE:
            raise CommandError(
                "MAILER_READ_PICKLE is False, so pickled rows can't be read to convert them: "
                "set it to True (the default) while mailer_convert runs."
            )
        dry_run = options["dry_run"]
        verb = "would convert" if dry_run else "converted"

        def progress(result: Converted) -> None:
            self.say(
                options,
                f"mailer_convert: {result.table}: {result.read} pickled rows read, "
                f"{result.converted} {verb}, {len(result.kept)} kept as they are",
            )

        kept = 0
        for model in (Message, MessageLog):
            result = convert_table(
                model, batch_size=options["batch_size"], dry_run=dry_run, progress=progress
            )
            if not result.read:
                self.say(options, f"mailer_convert: {result.table}: no pickled rows")
            for pk, reason in result.kept:
                logger.warning("%s row %s kept as pickle: %s", result.table, pk, reason)
            kept += len(result.kept)
        if kept:
            self.say(
                options,
                f"mailer_convert: {kept} rows kept as pickle (see the warnings above); "
                "they stay readable only while MAILER_READ_PICKLE is True.",
            )
        elif not dry_run:
            self.say(options, "mailer_convert: no pickled rows left; MAILER_READ_PICKLE can be False.")
