"""``runmailer``: the worker that sends mail forever, a pass whenever the queue has mail."""

from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer.management.base import MailerCommand
from mailer.worker import Worker


class Command(MailerCommand):
    help = "Send mail forever: a pass whenever the queue has mail (SIGTERM/SIGINT stop it)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--debug", action="store_true", help="Log at DEBUG level.")
        parser.add_argument(
            "--max-passes", type=int, default=None, help="Stop after this many passes."
        )
        self.add_concurrency_argument(parser)
        self.add_route_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options, debug=options["debug"])
        if options["max_passes"] is not None and options["max_passes"] < 1:
            raise CommandError(
                "--max-passes must be 1 or more (leave it out to run until stopped)."
            )
        self.require_delivery_settings()
        passes = Worker(
            max_passes=options["max_passes"],
            concurrency=self.concurrency(options),
            routes=self.routes(options),
        ).run()
        self.say(options, f"runmailer: stopped after {passes} pass(es)")
