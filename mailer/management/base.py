"""What the mailer commands share: verbosity → logging, the deprecated --cron."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from mailer.logutil import level_for, log_to_stream, stop_logging_to_stream


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
        """Set the ``mailer`` log level from ``-v``; log to stderr unless LOGGING does.

        See :mod:`mailer.logutil`.
        """
        # The raw stream: Django's stderr wrapper would paint every line red.
        stream = getattr(self.stderr, "_out", self.stderr)
        level = level_for(options.get("verbosity", 1), debug=debug)
        self._log_handler = log_to_stream(stream, level)
        if options.get("cron"):
            warnings.warn(
                "The -c/--cron option is deprecated and does nothing; remove it.",
                DeprecationWarning,
                stacklevel=2,
            )
            self.stderr.write("The -c/--cron option is deprecated and does nothing; remove it.")

    def execute(self, *args: Any, **options: Any) -> Any:
        self._log_handler = None
        try:
            return super().execute(*args, **options)
        finally:
            # Called from code (call_command), leave the process's logging as it was.
            stop_logging_to_stream(self._log_handler)

    def add_concurrency_argument(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            metavar="N",
            help="SMTP connections to keep busy at once (default: MAILER_CONCURRENCY, 1).",
        )

    def concurrency(self, options: dict[str, Any]) -> int | None:
        value = options.get("concurrency")
        if value is not None and value < 1:
            from django.core.management.base import CommandError

            raise CommandError("--concurrency must be 1 or more.")
        return value

    def add_route_argument(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--route",
            action="append",
            default=None,
            metavar="NAME",
            help="Serve only this route (repeatable; default: every route). "
            "Unrouted mail is served by the alias it is delivered through "
            "(MAILERS) or 'default'.",
        )

    def routes(self, options: dict[str, Any]) -> list[str] | None:
        """The ``--route`` names, checked (None: every route)."""
        names = options.get("route")
        if not names:
            return None
        from django.core.exceptions import ImproperlyConfigured
        from django.core.management.base import CommandError

        from mailer.routelanes import require_served

        try:
            return require_served(names)
        except ImproperlyConfigured as err:
            raise CommandError(f"--route: {err}") from err

    def require_delivery_settings(self) -> None:
        """Refuse to deliver with settings that can't (``mailer.E003``,
        ``E004``, ``E005``): a ``CommandError`` naming the problem and the fix.
        Only the commands that deliver ask; elsewhere ``E004`` is a warning."""
        from django.core.management.base import CommandError

        from mailer.checks import delivery_problems

        problems = [p for p in delivery_problems() if p.is_serious()]
        if problems:
            raise CommandError(
                "\n".join(
                    f"{p.id}: {p.msg}" + (f"\n\tHINT: {p.hint}" if p.hint else "")
                    for p in problems
                )
            )

    def say(self, options: dict[str, Any], text: str) -> None:
        if options.get("verbosity", 1) >= 1:
            self.stdout.write(text)

    def report(
        self,
        options: dict[str, Any],
        text: str,
        log: logging.Logger,
        level: int,
        msg: str,
        *args: Any,
    ) -> None:
        """Tell the operator once: the summary ``text`` on standard output
        (verbosity 1 or more) and the log record ``msg``, but never both on the
        command's own streams (a cron line's ``>> mailer.log 2>&1`` would show
        it twice). With the command's stderr handler, an informational record
        goes down to DEBUG (the summary says it) and a warning is logged
        instead of printed; a project's ``LOGGING`` gets the record as is."""
        ours = getattr(self, "_log_handler", None) is not None
        if level >= logging.WARNING:
            log.log(level, msg, *args)
            if not ours:
                self.say(options, text)
            return
        self.say(options, text)
        log.log(logging.DEBUG if ours else level, msg, *args)
