"""Lists of tables that may be huge: a capped count, and rows fetched without their stored data.

List pages read only the denormalised columns (``recipients``,
``subject_text``, ``message_id``) and never load ``message_data``, so a page
costs the same however large the stored messages are and nothing is
unpickled. Counting is bounded (:class:`CappedCountPaginator`): a table of
millions of rows is never ``COUNT(*)``-ed in full.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import EmptyPage, Page, PageNotAnInteger, Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property
from django.utils.text import Truncator

#: How many rows list pages count at most before saying "more than".
DEFAULT_COUNT_CAP = 10_000


# --- counting large tables --------------------------------------------------------


def planner_row_estimate(queryset: QuerySet) -> int | None:
    """PostgreSQL's estimate of the rows in an *unfiltered* table, else None."""
    if queryset.query.where:
        return None
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    table = connection.ops.quote_name(queryset.model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    if not row or row[0] is None or row[0] < 0:
        return None  # never analysed
    return int(row[0])


class CappedCountPaginator(Paginator):
    """A paginator that never counts more than ``count_cap`` rows.

    The count is ``SELECT COUNT(*) FROM (SELECT ... LIMIT cap + 1)``: exact up
    to the cap, and never a scan of the whole table. Past the cap it is
    PostgreSQL's planner estimate when the list is unfiltered (one catalogue
    lookup) and otherwise the cap itself; either way ``count_is_exact`` is
    False and pages past the estimated end are simply empty instead of an
    error, so nobody gets stuck on a stale estimate.
    """

    count_cap = DEFAULT_COUNT_CAP

    def __init__(self, *args: Any, count_cap: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if count_cap is not None:
            self.count_cap = count_cap
        self.count_is_exact = True
        self.count_is_estimate = False

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if not isinstance(object_list, QuerySet):
            return len(object_list)
        counted = object_list.order_by()[: self.count_cap + 1].count()
        if counted <= self.count_cap:
            return counted
        self.count_is_exact = False
        estimate = planner_row_estimate(object_list)
        if estimate is not None and estimate > self.count_cap:
            self.count_is_estimate = True
            return estimate
        return self.count_cap

    def validate_number(self, number: Any) -> int:
        try:
            return super().validate_number(number)
        except EmptyPage:
            if self.count_is_exact or isinstance(number, bool):
                raise
            # An inexact count: a page past it may still hold rows.
            try:
                number = int(number)
            except (TypeError, ValueError) as err:
                raise PageNotAnInteger(str(err)) from err
            if number < 1:
                raise
            return number

    def page(self, number: Any) -> Page:
        number = self.validate_number(number)
        if self.count_is_exact:
            return super().page(number)
        bottom = (number - 1) * self.per_page
        # _get_page: Paginator's hook for the Page class (all supported
        # Djangos have it; django-stubs leaves it out as private).
        return self._get_page(  # type: ignore[attr-defined]
            self.object_list[bottom : bottom + self.per_page], number, self
        )


class _CheckboxRow:
    """What ``ModelAdmin.action_checkbox`` reads of a row: its pk and str()."""

    def __init__(self, pk: Any, label: str) -> None:
        self.pk = pk
        self.label = label

    def __str__(self) -> str:
        return self.label


def _row_label(obj: Any) -> str:
    """A short description of a row from its denormalised columns only."""
    first = next(iter((obj.recipients or "").splitlines()), "")
    subject = Truncator(obj.subject_text or "").chars(60)
    return f'{obj.pk}: "{subject}" {first}'.strip()


class Titled:
    """A row as the admin's templates see it, whose ``str()`` is its
    detail title (what, to whom, a date formatted as the admin formats
    dates); every attribute is the row's own."""

    def __init__(self, obj: Any, title: str) -> None:
        self._obj = obj
        self._title = title

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    def __str__(self) -> str:
        return self._title


class LeanChangeList(ChangeList):
    """A change list whose rows are fetched without ``message_data``.

    Only the displayed rows are affected: actions still receive full rows
    (they get a fresh queryset from ``get_queryset``).
    """

    model_admin: LargeTableAdmin  # the only admin that uses this change list

    def get_results(self, request: HttpRequest) -> None:
        self.queryset = self.queryset.defer("message_data")
        super().get_results(request)
        self.model_admin.prepare_rows(self.result_list)


class LargeTableAdmin(admin.ModelAdmin):
    """Options shared by the queue and the log, tables that may be huge."""

    paginator = CappedCountPaginator
    count_cap = DEFAULT_COUNT_CAP
    show_full_result_count = False  # no unfiltered COUNT(*) next to every search
    list_per_page = 100
    if hasattr(admin, "ShowFacets"):  # Django 5.0+: facets count every filter choice
        show_facets = admin.ShowFacets.NEVER

    def get_paginator(
        self, request: HttpRequest, queryset: Any, per_page: int, *args: Any, **kwargs: Any
    ) -> Paginator:
        return self.paginator(queryset, per_page, *args, count_cap=self.count_cap, **kwargs)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LeanChangeList

    def prepare_rows(self, rows: list[Any]) -> None:
        """Fetch what the list columns need for the rows of one page, at once."""

    def detail_title(self, obj: Any) -> str:
        """The detail page's heading (and ``<title>``): what, to whom, when."""
        return str(obj)

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        obj = kwargs.get("obj", args[3] if len(args) > 3 else None)
        if obj is not None:
            context["subtitle"] = self.detail_title(obj)
            # The breadcrumb shows str(original): 2.3.2's str() of a row has
            # its raw date ("On 2026-12-07 04:16:48.944187+00:00, ..."), which
            # stays as it is for the sites that rely on it.
            context["original"] = Titled(obj, context["subtitle"])
        return super().render_change_form(request, context, *args, **kwargs)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def action_checkbox(self, obj: Any) -> Any:
        # Django labels each row's checkbox with str(obj), which would decode
        # the stored email (and, with message_data deferred, query for it).
        return super().action_checkbox(_CheckboxRow(obj.pk, _row_label(obj)))

    action_checkbox.__dict__.update(admin.ModelAdmin.action_checkbox.__dict__)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Stored mail is evidence: the detail page is read-only. The actions
        # ask for their own permissions below.
        return False
