"""``runmailer_pg``: the worker woken by PostgreSQL's LISTEN/NOTIFY."""

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError, CommandParser

from mailer.management.base import MailerCommand


class Command(MailerCommand):
    help = (
        "PostgreSQL only: send mail as soon as it is committed (LISTEN/NOTIFY), plus a "
        "pass every MAILER_EMPTY_QUEUE_SLEEP seconds. SIGTERM/SIGINT stop it."
    )

    # The system checks touch every database connection; without a driver for
    # the queue's database that is a traceback. They run in handle() instead,
    # once the database has been found usable.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        from mailer.postgres import PROBE_INTERVAL

        parser.add_argument("--skip-checks", action="store_true", help="Skip system checks.")
        parser.add_argument("--debug", action="store_true", help="Log at DEBUG level.")
        parser.add_argument(
            "--probe-interval",
            type=float,
            default=PROBE_INTERVAL,
            help="Seconds of silence after which the LISTEN connection is checked with "
            f"SELECT 1 (default {PROBE_INTERVAL:g}).",
        )
        self.add_concurrency_argument(parser)
        self.add_route_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        from mailer.postgres import (
            PostgresUnavailable,
            PostgresWorker,
            TriggerInstallError,
            database_alias,
            get_driver,
        )

        self.setup_logging(options, debug=options["debug"])
        if options["probe_interval"] <= 0:
            raise CommandError("--probe-interval must be a positive number of seconds.")
        try:
            get_driver(database_alias())
            if not options.get("skip_checks"):
                self.check()
            self.require_delivery_settings()
            worker = PostgresWorker(
                probe_interval=options["probe_interval"],
                concurrency=self.concurrency(options),
                routes=self.routes(options),
            )
            passes = worker.run()
        except (ImproperlyConfigured, PostgresUnavailable, TriggerInstallError) as exc:
            raise CommandError(str(exc)) from None
        self.say(options, f"runmailer_pg: stopped after {passes} pass(es)")
