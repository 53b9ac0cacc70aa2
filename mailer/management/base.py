"""What the mailer commands share: verbosity → logging, the deprecated --cron."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


class MailerCommand(BaseCommand):
    accepts_cron = False

    def add_arguments(self, parser: CommandParser) -> None:
        if self.accepts_cron:
            parser.add_argument(
                "-c",
                "--cron",
                type=int,
                default=0,
                help="Deprecated and ignored (kept so old crontabs keep working).",
            )

    def setup_logging(self, options: dict[str, Any], *, debug: bool = False) -> None:
        level = logging.DEBUG if debug else LEVELS.get(options.get("verbosity", 1), logging.DEBUG)
        logging.getLogger("mailer").setLevel(level)
        if options.get("cron"):
            warnings.warn(
                "The -c/--cron option is deprecated and does nothing; remove it.",
                DeprecationWarning,
                stacklevel=2,
            )
            self.stderr.write("The -c/--cron option is deprecated and does nothing; remove it.")

    def say(self, options: dict[str, Any], text: str) -> None:
        if options.get("verbosity", 1) >= 1:
            self.stdout.write(text)
