"""Routes: the alias a queued message is delivered through, and its backend.

A *route* is a name stored on each queued row (``Message.route``). ``NULL``
(``None`` here) is the delivery backend chosen as before (see
:func:`mailer.compat.get_sending_backend`: ``MAILER_EMAIL_BACKEND``,
``MAILER_USING`` or the one real ``MAILERS`` entry), so 2.3.2's rows and
sites that never route behave exactly as they did.

* Django 6.1 with ``MAILERS``: a route is an alias of a ``MAILERS`` entry
  that is not a ``DbBackend``; a ``DbBackend`` entry names the route of what
  it queues with its ``OPTIONS`` key ``using`` (DEP 0018's wrapper option).
  ``MAILER_ROUTES[name]`` may add ``CONCURRENCY`` and ``RATE`` only.
* Otherwise (Django 4.2-6.0): ``MAILER_ROUTES`` maps a route name to
  ``{"BACKEND": ..., "OPTIONS": {...}, "CONCURRENCY": N}`` (``MAILERS``'
  shape; ``BACKEND`` defaults to Django's SMTP backend).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.utils.module_loading import import_string

from mailer.compat import (
    HAS_MAILERS,
    bound_waits,
    get_sending_backend,
    mailer_backend,
    mailers_configured,
)
from mailer.conf import DB_BACKEND, conf

#: The keys a ``MAILER_ROUTES`` entry may have (``BACKEND``/``OPTIONS`` only
#: without ``MAILERS``; ``RATE``: see :mod:`mailer.quotas`).
ROUTE_KEYS = frozenset({"BACKEND", "OPTIONS", "CONCURRENCY", "RATE"})


#: Django 4.2-6.0: the ``--route`` name of unrouted mail (``route`` NULL);
#: ``MAILER_ROUTES[UNROUTED_NAME]`` without ``BACKEND`` gives that mail its
#: ``CONCURRENCY`` and ``RATE`` (it is delivered through the backend chosen
#: as before) rather than naming a route of its own.
UNROUTED_NAME = "default"


def _unrouted_entry(name: str, entry: Any) -> bool:
    """Is ``MAILER_ROUTES[name]`` the settings of unrouted mail (no MAILERS)?"""
    return name == UNROUTED_NAME and isinstance(entry, dict) and "BACKEND" not in entry


class UnknownRoute(ImproperlyConfigured):
    """A route or alias that names nothing to deliver through."""


def _where() -> str:
    return "MAILERS" if mailers_configured() else "MAILER_ROUTES"


def route_names() -> list[str]:
    """Every route a worker serves by default, sorted (``None`` aside)."""
    if mailers_configured():
        mailers = settings.MAILERS
        return sorted(a for a, c in mailers.items() if mailer_backend(c) != DB_BACKEND)
    routes = conf.ROUTES
    if not isinstance(routes, dict):
        return []
    return sorted(name for name, entry in routes.items() if not _unrouted_entry(name, entry))


def is_route(name: str) -> bool:
    """Can mail be delivered through the route ``name``?"""
    if mailers_configured():
        config = settings.MAILERS.get(name)
        return config is not None and mailer_backend(config) != DB_BACKEND
    routes = conf.ROUTES
    return isinstance(routes, dict) and name in routes and not _unrouted_entry(name, routes[name])


def require_route(name: str) -> str:
    """``name``, or ``UnknownRoute`` saying which routes there are."""
    if not is_route(name):
        known = ", ".join(route_names()) or "none"
        raise UnknownRoute(
            f"{name!r} is not a route to deliver mail through ({_where()} routes: {known}). "
            f"Add it to {_where()} or name one of those."
        )
    return name


@dataclass(frozen=True)
class QueueAlias:
    """What ``using=`` names once resolved: a route and the queue's options."""

    route: str | None
    priority: Any = None
    batch_size: int | None = None


def resolve_using(using: str) -> QueueAlias:
    """The route (and queue options) ``using=`` names: a route itself, or on
    Django 6.1 a ``DbBackend`` alias of ``MAILERS`` (its ``using`` option)."""
    if mailers_configured():
        config = settings.MAILERS.get(using)
        if config is not None and mailer_backend(config) == DB_BACKEND:
            options = config.get("OPTIONS", {})
            route = options.get("using")
            return QueueAlias(
                None if route is None else require_route(route),
                options.get("priority"),
                options.get("batch_size"),
            )
    return QueueAlias(require_route(using))


def backend_path(route: str | None) -> str:
    """Dotted path of the backend ``route`` delivers through."""
    if route is None:
        from mailer.compat import sending_backend_path

        return sending_backend_path()
    require_route(route)
    if mailers_configured():
        return mailer_backend(settings.MAILERS[route])
    return mailer_backend(conf.ROUTES[route])


def new_backend(route: str | None) -> BaseEmailBackend:
    """A new instance of the backend that delivers ``route``'s mail, with
    bounded waits (``None``: :func:`mailer.compat.get_sending_backend`)."""
    if route is None:
        return get_sending_backend()
    backend = _new_route_backend(require_route(route))
    # Delivery errors name the route's settings (mailer.errors).
    backend.mailer_route = route  # type: ignore[attr-defined]
    return backend


def _new_route_backend(route: str) -> BaseEmailBackend:
    if mailers_configured():
        from django.core.mail import mailers  # type: ignore[attr-defined]  # Django 6.1+

        return bound_waits(mailers[route])
    entry = conf.ROUTES[route]
    path = mailer_backend(entry)
    if path == DB_BACKEND:
        raise ImproperlyConfigured(
            f"MAILER_ROUTES[{route!r}]['BACKEND'] is {DB_BACKEND!r}: the worker would put "
            "every message back on the queue. Name the backend that really sends."
        )
    backend_class = import_string(path)
    options = dict(entry.get("OPTIONS") or {})
    if HAS_MAILERS:
        # Django 6.1 without MAILERS: created as MAILER_EMAIL_BACKEND is.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Directly creating", category=PendingDeprecationWarning
            )
            return bound_waits(backend_class(**options))
    return bound_waits(backend_class(**options))


def concurrency(route: str | None, override: int | None = None) -> int:
    """SMTP connections a pass keeps busy for ``route``: ``override`` (a
    command's ``--concurrency``), else its ``CONCURRENCY``, else
    ``MAILER_CONCURRENCY``."""
    if override is not None:
        return override
    routes = conf.ROUTES
    if not isinstance(routes, dict):
        return conf.CONCURRENCY
    if route is None:
        if mailers_configured():
            return conf.CONCURRENCY
        route = UNROUTED_NAME  # its entry, if any, has no BACKEND (see above)
        if not _unrouted_entry(route, routes.get(route)):
            return conf.CONCURRENCY
    entry = routes.get(route) or {}
    value = entry.get("CONCURRENCY") if isinstance(entry, dict) else None
    return conf.CONCURRENCY if value is None else value
