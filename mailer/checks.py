"""System checks for the ``MAILER_*`` settings (ids ``mailer.E0xx``/``W0xx``)."""

from __future__ import annotations

import os
import re
from numbers import Real
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from mailer.compat import (
    delivery_alias,
    implicit_delivery_alias,
    legacy_email_backend,
    mailer_backend,
    mailers_configured,
    smtp_timeout_unset,
)
from mailer.conf import (
    BOOLEAN_SETTINGS,
    DB_BACKEND,
    DEFAULT_SMTP_TIMEOUT,
    NUMERIC_SETTINGS,
    boolean_error,
    conf,
)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@checks.register("mailer")
def check_numeric_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for name, allow_none, minimum in NUMERIC_SETTINGS:
        value = getattr(conf, name)
        if value is None and allow_none:
            continue
        if not _is_number(value) or value < minimum:
            wanted = "a number" if minimum == float("-inf") else f"a number ≥ {minimum:g}"
            if allow_none:
                wanted += " or None"
            errors.append(
                checks.Error(
                    f"MAILER_{name} must be {wanted}; it is {value!r}.",
                    hint=f"Fix or remove MAILER_{name} in your settings.",
                    id="mailer.E001",
                )
            )
    return errors


@checks.register("mailer")
def check_boolean_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for name, default in BOOLEAN_SETTINGS:
        message = boolean_error(name, getattr(settings, f"MAILER_{name}", default))
        if message is not None:
            errors.append(
                checks.Error(
                    message,
                    hint=f"Set MAILER_{name} to True or False (not a string or number), "
                    "or remove it.",
                    id="mailer.E006",
                )
            )
    return errors


@checks.register("mailer")
def check_idle_sleep(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if _is_number(conf.EMPTY_QUEUE_SLEEP) and conf.EMPTY_QUEUE_SLEEP == 0:
        return [
            checks.Warning(
                "MAILER_EMPTY_QUEUE_SLEEP is 0: runmailer and runmailer_pg would query the "
                "database without pause while the queue is empty.",
                hint="Use a small positive number, e.g. 1, or the default 30.",
                id="mailer.W001",
            )
        ]
    return []


@checks.register("mailer")
def check_error_handler(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    path = conf.ERROR_HANDLER
    try:
        handler = import_string(path)
    except ImportError as err:
        return [
            checks.Error(
                f"MAILER_ERROR_HANDLER {path!r} can't be imported: {err}.",
                hint="Set it to the dotted path of a function "
                "(connection, message, exc) -> (connection_or_None, 'sent'|'deferred').",
                id="mailer.E002",
            )
        ]
    if not callable(handler):
        return [
            checks.Error(
                f"MAILER_ERROR_HANDLER {path!r} is not callable.",
                hint="Point it at a function.",
                id="mailer.E002",
            )
        ]
    return []


@checks.register("mailer")
def check_backends(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The delivery side's settings, for every command.

    ``mailer.E004`` (no single ``MAILERS`` alias to deliver through) is only
    a warning here, ``mailer.W004``: a host that only queues mail (web
    servers whose settings hold just the queue backend) must still run
    ``migrate`` and the rest. The commands that deliver refuse to start on
    it (:func:`delivery_problems`, ``MailerCommand.require_delivery_settings``).
    """
    return [_as_warning(p) if p.id == "mailer.E004" else p for p in delivery_problems()]


def _as_warning(error: checks.CheckMessage) -> checks.Warning:
    return checks.Warning(
        f"{error.msg} send_mail, runmailer and runmailer_pg refuse to start until it is "
        "fixed (mailer.E004); a host that only queues mail can leave it so "
        '(SILENCED_SYSTEM_CHECKS = ["mailer.W004"]).',
        hint=error.hint,
        id="mailer.W004",
    )


def delivery_problems() -> list[checks.CheckMessage]:
    """What stops the worker delivering: ``mailer.E003`` (it would deliver
    into the queue), ``E004`` (no single ``MAILERS`` alias), ``E005`` (the
    backend can't be imported); all errors."""
    errors: list[checks.CheckMessage] = []
    if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET:
        return _check_mailers()
    sending = conf.EMAIL_BACKEND
    if sending == DB_BACKEND:
        both = legacy_email_backend() == DB_BACKEND
        errors.append(
            _loop_error(
                "EMAIL_BACKEND and MAILER_EMAIL_BACKEND are both"
                if both
                else "MAILER_EMAIL_BACKEND"
            )
        )
    else:
        try:
            import_string(sending)
        except ImportError as err:
            errors.append(
                checks.Error(
                    f"MAILER_EMAIL_BACKEND {sending!r} can't be imported: {err}.",
                    hint="Set it to the dotted path of an email backend class.",
                    id="mailer.E005",
                )
            )
    return errors


def _check_mailers() -> list[checks.CheckMessage]:
    """Django 6.1 ``MAILERS``: is there exactly one alias to deliver through?"""
    mailers = settings.MAILERS
    alias = conf.USING
    if alias and alias in mailers or not alias and implicit_delivery_alias(mailers):
        chosen = delivery_alias()
        if mailer_backend(mailers[chosen]) == DB_BACKEND:
            return [_loop_error(f"MAILERS[{chosen!r}]['BACKEND']")]
        return []
    queue_aliases = sorted(a for a, c in mailers.items() if mailer_backend(c) == DB_BACKEND)
    real = sorted(a for a, c in mailers.items() if mailer_backend(c) != DB_BACKEND)
    if alias:
        what = f"MAILER_USING is {alias!r}, which is not in MAILERS."
    elif real:
        what = (
            f"MAILER_USING is not set and several MAILERS entries really send "
            f"({', '.join(real)}): django-mailer can't tell which one to use."
        )
    else:
        what = (
            "MAILER_USING is not set and every MAILERS entry is a DbBackend: nothing "
            "would deliver the queued mail."
        )
    if real:
        hint = f"Add MAILER_USING = {real[0]!r} (or another of: {', '.join(real)})."
    else:
        target = alias or "smtp"
        hint = (
            f"Add a MAILERS[{target!r}] entry with the backend that really sends, e.g. "
            "{'BACKEND': 'django.core.mail.backends.smtp.EmailBackend', 'OPTIONS': {...}}."
        )
    return [
        checks.Error(
            f"django-mailer delivers queued mail through one MAILERS alias, but {what}"
            + (f" (Queue aliases: {', '.join(queue_aliases)}.)" if queue_aliases else ""),
            hint=hint,
            id="mailer.E004",
        )
    ]


def _loop_error(what: str) -> checks.Error:
    return checks.Error(
        f"{what} {DB_BACKEND!r}: the worker would put every message back on the queue.",
        hint="The sending side must be the backend that really sends, e.g. "
        "'django.core.mail.backends.smtp.EmailBackend'.",
        id="mailer.E003",
    )


@checks.register("mailer")
def check_lock_path(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """An explicit ``MAILER_LOCK_PATH`` must be in a writable directory.

    The default (the working directory) is not checked here: where cron or
    the service manager starts ``send_mail`` is not where ``check`` runs.
    """
    from mailer.locking import lock_path_problem

    path = conf.LOCK_PATH
    use_lock = getattr(settings, "MAILER_USE_FILE_LOCK", True)
    if use_lock is False or path is None or path == "":
        return []  # no lock (a non-boolean is mailer.E006's), or the default
    if not isinstance(path, (str, os.PathLike)):
        problem = "it must be a file path (a string)"
    else:
        problem = lock_path_problem(os.fspath(path))
    if problem is None:
        return []
    return [
        checks.Error(
            f"MAILER_LOCK_PATH {path!r} can't hold the send_mail lock file: {problem}.",
            hint="Create that directory and make it writable by the user that runs "
            "send_mail/runmailer, or point MAILER_LOCK_PATH (without '.lock') into one "
            "that is, e.g. '/run/mailer/send_mail'. On a host that never sends, add "
            "'mailer.E007' to SILENCED_SYSTEM_CHECKS.",
            id="mailer.E007",
        )
    ]


_DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*(\.\*)?\Z")


@checks.register("mailer")
def check_pickle_allowlist(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    value = getattr(settings, "MAILER_PICKLE_ALLOWLIST", [])
    entries = value if isinstance(value, (list, tuple)) else None
    bad = (
        [repr(value)]
        if entries is None
        else [repr(e) for e in entries if not isinstance(e, str) or not _DOTTED.match(e) or "." not in e]
    )
    if not bad:
        return []
    return [
        checks.Error(
            f"MAILER_PICKLE_ALLOWLIST must be a list of dotted names; bad: {', '.join(bad)}.",
            hint=(
                'Give classes as "pkg.module.Class" ("pkg.module.*" allows only classes '
                "of a module that is already imported)."
            ),
            id="mailer.E008",
        )
    ]


@checks.register("mailer")
def check_retry_delays(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The automatic retry delay's cap must not be below the first delay."""
    first, cap = conf.RETRY_DELAY, conf.RETRY_DELAY_MAX
    if not (_is_number(first) and _is_number(cap)) or cap >= first:
        return []  # wrong types are mailer.E001's
    return [
        checks.Error(
            f"MAILER_RETRY_DELAY_MAX ({cap!r}) is smaller than MAILER_RETRY_DELAY ({first!r}): "
            "every automatic retry would wait the cap, not the first delay.",
            hint="Raise MAILER_RETRY_DELAY_MAX to at least MAILER_RETRY_DELAY, or lower the latter.",
            id="mailer.E011",
        )
    ]


@checks.register("mailer", deploy=True)
def check_smtp_timeout(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    if not smtp_timeout_unset():
        return []
    where = (
        f"MAILERS[{delivery_alias()!r}]['OPTIONS']['timeout']"
        if mailers_configured() and not conf.EMAIL_BACKEND_IS_SET
        else "EMAIL_TIMEOUT"
    )
    return [
        checks.Warning(
            f"{where} is not set: Django's SMTP backend would wait for ever on a server that "
            f"stops answering. django-mailer's workers use {DEFAULT_SMTP_TIMEOUT} seconds.",
            hint=f"Set {where} to the number of seconds you want (e.g. 30).",
            id="mailer.W002",
        )
    ]


@checks.register("mailer")
def check_concurrency(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    value = conf.CONCURRENCY
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return []
    return [
        checks.Error(
            f"MAILER_CONCURRENCY must be a whole number ≥ 1; it is {value!r}.",
            hint="Fix or remove MAILER_CONCURRENCY (default 1: one SMTP connection).",
            id="mailer.E001",
        )
    ]


@checks.register("mailer")
def check_attachment_storage(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILER_ATTACHMENT_STORAGE`` must name an entry of ``STORAGES``."""
    alias = getattr(settings, "MAILER_ATTACHMENT_STORAGE", None)
    if alias is None:
        return []
    storages = getattr(settings, "STORAGES", {}) or {}
    if isinstance(alias, str) and alias in storages:
        return []
    keys = ", ".join(repr(k) for k in sorted(storages)) or "none"
    return [
        checks.Error(
            f"MAILER_ATTACHMENT_STORAGE must be None or a key of STORAGES; it is {alias!r} "
            f"(STORAGES has: {keys}).",
            hint="Add an entry to STORAGES for the attachments, e.g. STORAGES['mailer'] = "
            "{'BACKEND': 'django.core.files.storage.FileSystemStorage', 'OPTIONS': "
            "{'location': '/var/lib/myproject/mailer'}}, and set MAILER_ATTACHMENT_STORAGE "
            "= 'mailer'; or remove the setting.",
            id="mailer.E010",
        )
    ]


@checks.register("mailer")
def check_task_backend(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILER_TASK_BACKEND`` must name a ``TASKS`` backend that can run
    ``mailer.tasks.send_queued_mail``; say what it can't do."""
    from mailer import tasks

    alias = conf.TASK_BACKEND
    if alias is None:
        return []

    def error(problem: str, hint: str) -> list[checks.CheckMessage]:
        return [checks.Error(f"MAILER_TASK_BACKEND: {problem}", hint=hint, id="mailer.E020")]

    if not isinstance(alias, str):
        return error(
            f"must be None or a key of TASKS; it is {alias!r}.",
            "Set it to the alias of a TASKS entry, e.g. 'default', or remove it.",
        )
    found = tasks.framework()
    if found is None:
        return error(
            f"{alias!r} needs Django's tasks framework, which this installation lacks.",
            "Use Django 6.0 or later, or install the django-tasks package "
            "(pip install django-tasks) on Django 4.2/5.2; or remove MAILER_TASK_BACKEND.",
        )
    configured = getattr(settings, "TASKS", None) or {}
    try:
        task_backend = found.task_backends[alias]
    except Exception as err:
        keys = ", ".join(repr(k) for k in sorted(configured)) or "none"
        return error(
            f"{alias!r} is not a usable TASKS backend ({err}; TASKS has: {keys}).",
            f"Add TASKS[{alias!r}] = {{'BACKEND': ...}} (e.g. django-tasks-db's "
            "DatabaseBackend), or set MAILER_TASK_BACKEND to one of the TASKS keys.",
        )
    try:
        tasks.send_queued_mail_task().using(backend=alias)
    except Exception as err:
        return error(
            f"TASKS[{alias!r}] can't run mailer.tasks.send_queued_mail: {err}",
            "The task runs on the backend's 'default' queue with the default priority "
            "and takes its context: give that backend a 'default' queue (QUEUES).",
        )
    messages: list[checks.CheckMessage] = []
    name = type(task_backend).__name__
    if name == "ImmediateBackend":
        messages.append(
            checks.Warning(
                f"MAILER_TASK_BACKEND {alias!r} is an ImmediateBackend: every delivery pass "
                "runs inside the request (or command) that queued the mail, right after its "
                "transaction commits, and the caller waits for the SMTP server.",
                hint="Use a backend with its own workers (e.g. django-tasks-db's "
                "DatabaseBackend and its db_worker), or remove MAILER_TASK_BACKEND.",
                id="mailer.W020",
            )
        )
    if not getattr(task_backend, "supports_defer", False):
        messages.append(
            checks.Warning(
                f"TASKS[{alias!r}] ({name}) can't defer a task (run_after): mail scheduled "
                "with send_at, automatic retries, and a pass that found the send_mail lock "
                "held get no task at their time.",
                hint="Keep send_mail in cron (or runmailer) beside the tasks for those, or "
                "use a backend that supports run_after (e.g. django-tasks-db).",
                id="mailer.W021",
            )
        )
    return messages


@checks.register("mailer")
def check_stored_form(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILER_MESSAGE_FORMAT`` and ``MAILER_MESSAGE_CLASSES``."""
    errors: list[checks.CheckMessage] = []
    fmt = getattr(settings, "MAILER_MESSAGE_FORMAT", "json")
    if fmt not in ("json", "pickle"):
        errors.append(
            checks.Error(
                f'MAILER_MESSAGE_FORMAT must be "json" or "pickle"; it is {fmt!r}.',
                hint='Remove it (default "json", data only), or set "pickle" to keep '
                "writing 2.3.2's form.",
                id="mailer.E012",
            )
        )
    value = getattr(settings, "MAILER_MESSAGE_CLASSES", [])
    if not isinstance(value, (list, tuple)):
        errors.append(
            checks.Error(
                f"MAILER_MESSAGE_CLASSES must be a list of dotted class names; it is {value!r}.",
                hint='Give classes as ["pkg.module.Class"].',
                id="mailer.E012",
            )
        )
        value = []
    from django.core.mail import EmailMessage

    for entry in value:
        try:
            cls = import_string(entry) if isinstance(entry, str) else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, EmailMessage)):
            errors.append(
                checks.Error(
                    f"MAILER_MESSAGE_CLASSES: {entry!r} is not the dotted name of an "
                    "importable EmailMessage subclass.",
                    hint='Give classes as "pkg.module.Class".',
                    id="mailer.E012",
                )
            )
    return errors


@checks.register("mailer")
def check_routes(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILER_ROUTES`` and ``DbBackend``'s ``using`` option (see mailer.routes)."""
    from mailer.routechecks import route_checks

    return route_checks()
