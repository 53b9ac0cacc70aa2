"""``retry_deferred``: put deferred messages back on the queue (for cron)."""

import logging
from typing import Any

from mailer.conf import conf
from mailer.management.base import MailerCommand
from mailer.models import Message

logger = logging.getLogger("mailer.commands")


class Command(MailerCommand):
    help = "Put deferred messages back on the queue (for cron)."
    accepts_cron = True

    def handle(self, *args: Any, **options: Any) -> None:
        self.setup_logging(options)
        count = Message.objects.retry_deferred()
        self.report(
            options,
            f"retry_deferred: {count} message(s) back on the queue",
            logger,
            logging.INFO,
            "%s message(s) retried",
            count,
        )
        max_retries = conf.EMAIL_MAX_RETRIES
        if max_retries is not None:
            left = Message.objects.deferred().filter(retry_count__gte=max_retries).count()
            if left:
                self.report(
                    options,
                    f"retry_deferred: {left} message(s) left deferred: retry_count reached "
                    f"MAILER_EMAIL_MAX_RETRIES ({max_retries})",
                    logger,
                    logging.WARNING,
                    "%s deferred message(s) left deferred: they have used up "
                    "MAILER_EMAIL_MAX_RETRIES (%s); retry them from the admin, or raise it",
                    left,
                    max_retries,
                )
