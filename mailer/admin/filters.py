"""The list filters of the queue and the log."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from mailer.models import PRIORITY_LABELS, RESULT_LABELS


class PriorityFilter(admin.SimpleListFilter):
    title = _("priority")
    parameter_name = "priority"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(str(number), label) for number, label in PRIORITY_LABELS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(priority=int(value))
        return queryset


class NextAttemptFilter(admin.SimpleListFilter):
    """Messages by what they wait for: their time, a retry, or an operator."""

    title = _("waiting for")
    parameter_name = "waiting"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("scheduled", _("scheduled")),
            ("retrying", _("automatic retry")),
            ("operator", _("an operator")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "scheduled":
            return queryset.scheduled()  # type: ignore[attr-defined]
        if value == "retrying":
            return queryset.retrying()  # type: ignore[attr-defined]
        if value == "operator":
            return queryset.waiting_for_operator()  # type: ignore[attr-defined]
        return queryset


class WhenAttemptedFilter(admin.DateFieldListFilter):
    """Django's date filter, titled with a translated name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = _("when attempted")


class ResultFilter(admin.SimpleListFilter):
    title = _("result")
    parameter_name = "result"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return list(RESULT_LABELS.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value in RESULT_LABELS:
            return queryset.filter(result=value)
        return queryset
