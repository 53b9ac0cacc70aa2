"""System checks for routes: ``MAILER_ROUTES`` and ``DbBackend``'s ``using`` option."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from mailer.compat import mailer_backend, mailers_configured
from mailer.conf import DB_BACKEND, ROUTE_MAX_LENGTH, conf
from mailer.quotas import parse_rate
from mailer.routes import ROUTE_KEYS, UNROUTED_NAME


def route_checks() -> list[checks.CheckMessage]:
    """Every route error: ``mailer.E030`` (shape), ``E031`` (a queue's
    ``using``), ``E032`` (``MAILER_ROUTES`` next to ``MAILERS``), ``E033``
    (a route's backend), ``E034`` (a route's ``RATE``)."""
    errors = _check_shape()
    if errors:
        return errors
    if mailers_configured():
        return _check_queue_aliases() + _check_routes_with_mailers()
    return _check_route_backends()


def _error(msg: str, hint: str, number: int) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"mailer.E0{number}")


def _check_shape() -> list[checks.CheckMessage]:
    routes = conf.ROUTES
    hint = (
        'MAILER_ROUTES = {"bulk": {"BACKEND": "...", "OPTIONS": {...}, "CONCURRENCY": 2}}; '
        "see the Several providers page."
    )
    if not isinstance(routes, dict):
        return [_error(f"MAILER_ROUTES must be a dict; it is {routes!r}.", hint, 30)]
    errors: list[checks.CheckMessage] = []
    for name, entry in routes.items():
        where = f"MAILER_ROUTES[{name!r}]"
        if not isinstance(name, str) or not name or len(name) > ROUTE_MAX_LENGTH:
            errors.append(
                _error(
                    f"{where}: a route name is a string of 1 to {ROUTE_MAX_LENGTH} characters.",
                    hint,
                    30,
                )
            )
            continue
        if not isinstance(entry, dict):
            errors.append(_error(f"{where} must be a dict; it is {entry!r}.", hint, 30))
            continue
        unknown = sorted(set(entry) - ROUTE_KEYS)
        if unknown:
            errors.append(
                _error(
                    f"{where} has unknown keys: {', '.join(map(repr, unknown))}.",
                    f"A route takes {', '.join(sorted(ROUTE_KEYS))}.",
                    30,
                )
            )
        value = entry.get("CONCURRENCY")
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            errors.append(
                _error(
                    f"{where}['CONCURRENCY'] must be a whole number ≥ 1; it is {value!r}.",
                    "Fix or remove it (default: MAILER_CONCURRENCY).",
                    30,
                )
            )
        try:
            parse_rate(entry.get("RATE"))
        except ValueError as err:
            errors.append(
                _error(
                    f"{where}['RATE']: {err}.",
                    'Give one limit or a list, one per unit: "RATE": ["14/s", "50000/d"] '
                    "(see the Several providers page).",
                    34,
                )
            )
        options = entry.get("OPTIONS", {})
        if not isinstance(options, dict):
            errors.append(_error(f"{where}['OPTIONS'] must be a dict; it is {options!r}.", hint, 30))
    return errors


def _check_queue_aliases() -> list[checks.CheckMessage]:
    """Django 6.1: every ``DbBackend`` entry's ``using`` names an alias that really sends."""
    mailers: dict[str, Any] = settings.MAILERS
    errors: list[checks.CheckMessage] = []
    real = sorted(a for a, c in mailers.items() if mailer_backend(c) != DB_BACKEND)
    for alias, config in mailers.items():
        if mailer_backend(config) != DB_BACKEND:
            continue
        route = (config.get("OPTIONS") or {}).get("using")
        if route is None:
            continue
        where = f"MAILERS[{alias!r}]['OPTIONS']['using']"
        hint = f"Name the alias of a backend that really sends ({', '.join(real) or 'none yet'})."
        if not isinstance(route, str) or route not in mailers:
            errors.append(_error(f"{where} is {route!r}, which is not in MAILERS.", hint, 31))
        elif mailer_backend(mailers[route]) == DB_BACKEND:
            errors.append(
                _error(
                    f"{where} is {route!r}, another DbBackend: queued mail would be queued again.",
                    hint,
                    31,
                )
            )
        elif len(route) > ROUTE_MAX_LENGTH:
            errors.append(
                _error(f"{where}: a route name has at most {ROUTE_MAX_LENGTH} characters.", hint, 31)
            )
    return errors


def _check_routes_with_mailers() -> list[checks.CheckMessage]:
    """Django 6.1: ``MAILER_ROUTES`` only adds ``CONCURRENCY`` and ``RATE`` to ``MAILERS`` aliases."""
    mailers: dict[str, Any] = settings.MAILERS
    errors: list[checks.CheckMessage] = []
    for name, entry in conf.ROUTES.items():
        where = f"MAILER_ROUTES[{name!r}]"
        carried = sorted({"BACKEND", "OPTIONS"} & set(entry))
        if carried:
            errors.append(
                _error(
                    f"{where} has {' and '.join(carried)}, but with MAILERS a route's backend "
                    "comes from MAILERS.",
                    f"Move them to MAILERS[{name!r}] and keep only CONCURRENCY and RATE here.",
                    32,
                )
            )
        if name not in mailers or mailer_backend(mailers[name]) == DB_BACKEND:
            errors.append(
                _error(
                    f"{where}: {name!r} is not a MAILERS alias that really sends.",
                    f"Add MAILERS[{name!r}] with the backend that delivers this route.",
                    32,
                )
            )
    return errors


def _check_route_backends() -> list[checks.CheckMessage]:
    """Django 4.2-6.0: each route's ``BACKEND`` imports and is not ``DbBackend``."""
    errors: list[checks.CheckMessage] = []
    for name, entry in conf.ROUTES.items():
        if name == UNROUTED_NAME and "BACKEND" not in entry:
            # The settings of unrouted mail (CONCURRENCY, RATE), not a route.
            if "OPTIONS" in entry:
                errors.append(
                    _error(
                        f"MAILER_ROUTES[{name!r}] has OPTIONS but no BACKEND: without BACKEND "
                        "it holds only CONCURRENCY and RATE for unrouted mail, which is "
                        "delivered through MAILER_EMAIL_BACKEND.",
                        "Remove OPTIONS, or add the BACKEND they are for.",
                        33,
                    )
                )
            continue
        path = mailer_backend(entry)
        where = f"MAILER_ROUTES[{name!r}]['BACKEND']"
        if path == DB_BACKEND:
            errors.append(
                _error(
                    f"{where} is {DB_BACKEND!r}: the worker would put every message back on "
                    "the queue.",
                    "Name the backend that really sends, e.g. "
                    "'django.core.mail.backends.smtp.EmailBackend'.",
                    33,
                )
            )
            continue
        try:
            import_string(path)
        except ImportError as err:
            errors.append(
                _error(
                    f"{where} {path!r} can't be imported: {err}.",
                    "Set it to the dotted path of an email backend class.",
                    33,
                )
            )
    return errors
