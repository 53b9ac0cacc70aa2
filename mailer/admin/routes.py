"""The route (the alias a message is delivered through) in the queue's and the
log's admin: a column, a filter and a search term while the site has routes,
and a line on every detail page."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from mailer import routes
from mailer.conf import conf
from mailer.routelanes import unrouted_name


def routes_in_use() -> bool:
    """Does the site have routes besides the default delivery?"""
    return bool(conf.ROUTES) or len(routes.route_names()) > 1


class RouteFilter(admin.SimpleListFilter):
    """Messages by route; unrouted ones under the name that serves them."""

    title = _("route")
    parameter_name = "route"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        names = dict.fromkeys([unrouted_name(), *routes.route_names()])
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        q = Q(route=value)
        if value == unrouted_name():
            q |= Q(route__isnull=True)
        return queryset.filter(q)


class RouteColumns:
    """Mixed into the queue's and the log's ``ModelAdmin``."""

    route_fields = ("route_display",)

    def get_list_display(self, request: HttpRequest) -> Any:
        shown = list(super().get_list_display(request))  # type: ignore[misc]
        if routes_in_use() and "route_display" not in shown:
            shown.insert(min(4, len(shown)), "route_display")
        return shown

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters = list(super().get_list_filter(request))  # type: ignore[misc]
        if routes_in_use():
            filters.append(RouteFilter)
        return filters

    def get_search_fields(self, request: HttpRequest) -> Any:
        fields = list(super().get_search_fields(request))  # type: ignore[misc]
        if routes_in_use():
            fields.append("=route")  # the whole name: an index-friendly equality
        return fields

    @admin.display(description=_("route"), ordering="route")
    def route_display(self, obj: Any) -> str:
        return obj.route or f"{unrouted_name()} ({_('default')})"
