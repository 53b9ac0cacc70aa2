"""``send_mail``: one pass over the mail queue (for cron)."""

from typing import Any

from django.core.management.base import CommandError, CommandParser

from mailer.conf import conf
from mailer.engine import send_all
from mailer.locking import LockPathError
from mailer.management.base import MailerCommand


class Command(MailerCommand):
    help = "Do one pass over the mail queue: send what can be sent (for cron)."
    accepts_cron = True

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        self.add_concurrency_argument(parser)
        self.add_route_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        self.require_delivery_settings()
        if conf.PAUSE_SEND:
            self.say(options, "MAILER_PAUSE_SEND is set: not sending.")
            return
        try:
            concurrency = self.concurrency(options)
            routes = self.routes(options)
            if routes is not None:
                result = send_all(concurrency=concurrency, routes=routes)
            elif concurrency is None:
                result = send_all()
            else:
                result = send_all(concurrency=concurrency)
        except LockPathError as err:
            raise CommandError(str(err)) from None
        self.say(options, f"send_mail: {result}")
