"""``purge_mail_log``: delete old log entries (and stored attachments no row refers to)."""

import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer import attachments
from mailer.management.base import MailerCommand
from mailer.models import RESULT_DONT_SEND, RESULT_FAILURE, RESULT_SUCCESS, MessageLog

logger = logging.getLogger("mailer.commands")

RESULTS = {
    "success": [RESULT_SUCCESS],
    "failure": [RESULT_FAILURE],
    "all": [RESULT_SUCCESS, RESULT_FAILURE, RESULT_DONT_SEND],
}


class Command(MailerCommand):
    help = (
        "Delete message log entries older than DAYS days (success only by default), and "
        "stored attachments (MAILER_ATTACHMENT_STORAGE) that nothing refers to any more."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("days", type=int, help="Keep entries newer than this many days.")
        parser.add_argument(
            "-r",
            "--result",
            choices=sorted(RESULTS),
            default="success",
            help="Which entries to delete (default: success).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="Rows per DELETE (default MAILER_PURGE_BATCH_SIZE, 10000).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        days = options["days"]
        if days < 0:
            raise CommandError("days must be 0 or more.")
        if options["batch_size"] is not None and options["batch_size"] < 1:
            raise CommandError("--batch-size must be 1 or more.")
        count = MessageLog.objects.purge_old_entries(
            days, RESULTS[options["result"]], batch_size=options["batch_size"]
        )
        self.report(
            options,
            f"purge_mail_log: {count} {options['result']} entries older than {days} days deleted",
            logger,
            logging.INFO,
            "%s log entries deleted",
            count,
        )
        if attachments.storage_alias() is not None:
            # Files of rows that never committed, or were deleted by other means.
            swept = attachments.sweep_orphans()
            self.report(
                options,
                f"purge_mail_log: {swept} stored attachment files that no message refers "
                "to deleted",
                logger,
                logging.INFO,
                "%s orphaned attachment files deleted",
                swept,
            )
