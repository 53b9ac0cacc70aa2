import logging
from typing import Any

from mailer.management.base import MailerCommand
from mailer.models import Message

logger = logging.getLogger("mailer.commands")


class Command(MailerCommand):
    help = "Put deferred messages back on the queue (for cron)."
    accepts_cron = True

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        count = Message.objects.retry_deferred()
        logger.info("%s message(s) retried", count)
        self.say(options, f"retry_deferred: {count} message(s) back on the queue")
