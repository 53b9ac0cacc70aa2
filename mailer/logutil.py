"""Commands show what they do: the ``mailer`` logger on their stderr by default.

A project without a ``LOGGING`` entry for django-mailer would otherwise see
nothing from a worker but its final summary (Python's last-resort handler
prints warnings only, without a time). :func:`log_to_stream` gives the
``mailer`` logger a handler on the command's standard error, like the
workers of django-tasks and Celery do, unless the project routes those
records somewhere already: a handler on ``mailer``, on one of its children
or on an ancestor they propagate to (the root logger included).
"""

from __future__ import annotations

import logging
from typing import IO, Any

LOGGER_NAME = "mailer"

#: ``--verbosity`` to the level of the ``mailer`` logger.
VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO}

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_for(verbosity: int, *, debug: bool = False) -> int:
    """0: WARNING, 1: INFO, 2 or more (or ``--debug``): DEBUG."""
    if debug:
        return logging.DEBUG
    return VERBOSITY_LEVELS.get(verbosity, logging.DEBUG if verbosity > 1 else logging.WARNING)


class CommandLogHandler(logging.StreamHandler):
    """The handler :func:`log_to_stream` installs (recognisable, so it is installed once)."""


def project_handles_mailer_logs() -> bool:
    """True when the logging configuration already outputs ``mailer`` records."""
    logger: logging.Logger | None = logging.getLogger(LOGGER_NAME)
    while logger is not None:
        if any(not isinstance(h, CommandLogHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            break
        logger = logger.parent
    prefix = LOGGER_NAME + "."
    for name, child in logging.root.manager.loggerDict.items():
        if name.startswith(prefix) and isinstance(child, logging.Logger) and child.handlers:
            return True
    return False


def log_to_stream(stream: IO[str] | Any, level: int) -> logging.Handler | None:
    """Show ``mailer`` records of ``level`` and above on ``stream``.

    Sets the ``mailer`` logger's level in every case (``--verbosity`` is
    documented to do so). Adds a handler writing to ``stream`` only when the
    project has none for these records; replaces one added before (a second
    command in the same process writes to its own stream). Returns the
    handler added, or None.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    for old in [h for h in logger.handlers if isinstance(h, CommandLogHandler)]:
        logger.removeHandler(old)
    if project_handles_mailer_logs():
        return None
    handler = CommandLogHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    return handler


def stop_logging_to_stream(handler: logging.Handler | None) -> None:
    """Remove a handler :func:`log_to_stream` added (None: nothing to do)."""
    if handler is not None:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)
        handler.flush()
