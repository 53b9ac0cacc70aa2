"""INSERTs of rows on the hot paths, compiled once per model and database.

For one ``send_mail`` call, one log entry per sent message and a bulk of
queued messages, the ORM's per-query compile costs more than the database.
:class:`RowInserter` writes the same rows the ORM would, from unsaved model
instances or from lists of values in the inserter's column order (the bulk
queueing path builds those directly, without a model instance per row).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import connections, models

from mailer.cursors import kept_cursor

__all__ = ["RowInserter", "copy_line", "copy_lines"]

_NOTHING = object()
_PLAIN_FIELDS: dict[type[models.Field], type] = {
    models.TextField: str,
    models.CharField: str,
    models.IntegerField: int,
    models.SmallIntegerField: int,
    models.PositiveSmallIntegerField: int,
    models.BigIntegerField: int,
}
#: Rows written to COPY per ``write()`` call.
COPY_CHUNK = 500


def _escaped(value: str) -> str:
    """A string in ``COPY``'s text format: its reserved characters escaped."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\n" in value:
        value = value.replace("\n", "\\n")
    if "\t" in value:
        value = value.replace("\t", "\\t")
    if "\r" in value:
        value = value.replace("\r", "\\r")
    return value


def _copy_text(value: Any) -> str | None:
    """``value`` in ``COPY ... FROM STDIN``'s text format, or ``None`` when
    it is not a string, an integer, ``None`` or a ``datetime``."""
    kind = type(value)
    if kind is str:
        return _escaped(value)
    if value is None:
        return "\\N"
    if kind is int:
        return str(value)
    if kind is datetime:
        # ISO 8601; a naive value is read in the session's time zone, as
        # psycopg's own dumper leaves it.
        return value.isoformat()
    return None


def copy_line(values: Sequence[Any]) -> str | None:
    """``values`` as one line of ``COPY ... FROM STDIN``'s text format, or
    ``None`` when one of them is not a string, an integer, ``None`` or a
    ``datetime`` (psycopg's own adaptation then writes that row).

    psycopg adapts every value through its dumpers, a third of the Python
    time of a bulk of queued rows; these four kinds are all a queue row
    holds, and their text forms are PostgreSQL's own input forms.
    """
    out = []
    for value in values:
        text = _copy_text(value)
        if text is None:
            return None
        out.append(text)
    return "\t".join(out) + "\n"


def copy_lines(rows: Sequence[Sequence[Any]]) -> list[str] | None:
    """:func:`copy_line` of each of ``rows`` (all of one width), or ``None``
    when a value of any of them can't be written as text.

    A column that holds the very same object in every row (a bulk's time
    and priority, the defaults) is formatted once, into a line template:
    per row only the values that differ are escaped, and the line is one
    ``%`` formatting (formatting every column of every row was a fifth of
    the instructions of a queued row on PostgreSQL).
    """
    if not rows:
        return []
    first = rows[0]
    varying = [i for i in range(len(first)) if any(row[i] is not first[i] for row in rows)]
    parts = []
    for i, value in enumerate(first):
        if i in varying:
            parts.append("%s")
            continue
        text = _copy_text(value)
        if text is None:
            return None
        parts.append(text.replace("%", "%%"))
    template = "\t".join(parts) + "\n"
    if not varying:
        return [template % ()] * len(rows)
    pick = operator.itemgetter(*varying)
    lines = []
    for row in rows:
        picked = pick(row)
        texts = []
        for value in picked if len(varying) > 1 else (picked,):
            text = _escaped(value) if type(value) is str else _copy_text(value)
            if text is None:
                return None
            texts.append(text)
        lines.append(template % tuple(texts))
    return lines


def _sqlite_unwatched(connection: Any) -> bool:
    """A SQLite connection whose statements nobody formats for display.

    Django's SQLite cursor turns each ``%s`` into sqlite3's ``?`` with a
    regular expression: for a bulk of queued rows, a sixth of the Python
    time per row. Statements already written with ``?`` pass through it
    unchanged, but only Django's formatting for display (the query log,
    ``assertNumQueries``, the debug toolbar's panel) can't take them: those
    get ``%s``, as do ``execute_wrapper()`` hooks.
    """
    return (
        connection.vendor == "sqlite"
        and not connection.queries_logged
        and not connection.execute_wrappers
        and "cursor" not in connection.__dict__  # not wrapped by a tool (debug toolbar)
    )


class RowInserter:
    """INSERTs of unsaved instances (or of their values), compiled once.

    Values go through each field's ``get_db_prep_save``, as the ORM does,
    except plain text and integer values of plain text and integer fields,
    which that would return unchanged. No signals are sent and primary keys
    are not read back.
    """

    _made: dict[tuple[type[models.Model], str], RowInserter] = {}

    @classmethod
    def for_model(cls, model: type[models.Model], using: str) -> RowInserter:
        """The inserter of ``model`` on ``using``, made once per process."""
        key = (model, using)
        inserter = cls._made.get(key)
        if inserter is None:
            inserter = cls._made[key] = cls(model, using)
        return inserter

    def __init__(self, model: type[models.Model], using: str) -> None:
        self.using = using
        self.fields = [f for f in model._meta.concrete_fields if not f.primary_key]
        #: Each column's position in a row of values.
        self.index = {f.attname: i for i, f in enumerate(self.fields)}
        # One C call reads every value; then only values that aren't of
        # their field's plain type (a datetime, a lazy string) are prepared.
        names = [f.attname for f in self.fields]
        get = operator.attrgetter(*names)
        self._get = get if len(names) > 1 else (lambda obj: (get(obj),))
        self._checks = [(i, _PLAIN_FIELDS.get(type(f))) for i, f in enumerate(self.fields)]
        quote = connections[using].ops.quote_name
        self.head = "INSERT INTO {} ({}) VALUES ".format(
            quote(model._meta.db_table), ", ".join(quote(f.column) for f in self.fields)
        )
        self.row = "({})".format(", ".join(["%s"] * len(self.fields)))
        self._last: list[tuple[Any, Any]] = [(_NOTHING, None)] * len(self.fields)
        self.sql = self.head + self.row
        # sqlite3's own placeholders (see _sqlite_unwatched).
        self._qmark_row = self.row.replace("%s", "?")
        self._qmark_sql = self.head + self._qmark_row
        self._unnest: str | None = None

    @property
    def connection(self) -> Any:
        return connections[self.using]  # this thread's

    def prepare(self, index: int, value: Any) -> Any:
        """``value`` for the column at ``index``, as the database takes it."""
        plain = self._checks[index][1]
        if value is None or type(value) is plain:
            return value
        return self.fields[index].get_db_prep_save(value, self.connection)

    def values(self, obj: models.Model) -> list[Any]:
        """``obj``'s row, prepared for the database."""
        values = list(self._get(obj))
        last = self._last
        connection = None
        for index, plain in self._checks:
            value = values[index]
            if value is None or type(value) is plain:
                continue
            if value is (cached := last[index])[0]:  # the same object as the row before
                values[index] = cached[1]
                continue
            if connection is None:
                connection = self.connection
            prepared = self.fields[index].get_db_prep_save(value, connection)
            last[index] = (value, prepared)
            values[index] = prepared
        return values

    def insert(self, obj: models.Model) -> None:
        self.insert_values(self.values(obj))

    def insert_values(self, values: list[Any], connection: Any = None) -> None:
        """One INSERT of one prepared row (one round trip in autocommit).
        ``connection``: this thread's connection to ``using``, if at hand."""
        connection = connection or self.connection
        sql = self._qmark_sql if _sqlite_unwatched(connection) else self.sql
        kept_cursor(connection).execute(sql, values)

    def insert_many(self, objs: Sequence[models.Model], batch_size: int | None = None) -> None:
        self.insert_rows([self.values(obj) for obj in objs], batch_size)

    def insert_rows(self, rows: Sequence[list[Any]], batch_size: int | None = None) -> None:
        """Prepared rows in multi-row INSERTs of at most ``batch_size`` rows
        (and at most what the database takes in one statement); on
        PostgreSQL with psycopg 3, ``COPY``."""
        connection = self.connection
        if connection.vendor == "postgresql":
            size = batch_size or len(rows)
            with connection.cursor() as cursor:
                raw = cursor.cursor
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    if hasattr(raw, "copy"):  # psycopg 3: COPY, a third of an INSERT's time
                        self._copy(connection, raw, chunk)
                    else:  # psycopg2: one array per column, a small statement
                        columns = [list(c) for c in zip(*chunk, strict=True)]
                        cursor.execute(self._unnest_sql(connection), columns)
            return
        # 65535: the most parameters PostgreSQL's protocol carries.
        most = min(connection.ops.bulk_batch_size(self.fields, rows), 65535 // len(self.fields))
        size = max(1, min(batch_size or most, most))
        one = self._qmark_row if _sqlite_unwatched(connection) else self.row
        with connection.cursor() as cursor:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                params: list[Any] = []
                for row in chunk:
                    params.extend(row)
                cursor.execute(self.head + ", ".join([one] * len(chunk)), params)

    def _copy(self, connection: Any, raw: Any, rows: Sequence[list[Any]]) -> None:
        """``COPY ... FROM STDIN`` (fires the INSERT triggers, once per
        statement); shown in Django's query log like any statement."""
        sql = self.head.replace(" VALUES ", " FROM STDIN").replace("INSERT INTO", "COPY", 1)
        start = time.monotonic()
        lines = copy_lines(rows)
        with raw.copy(sql) as copy:
            if lines is None:  # a value of another kind: psycopg adapts them all
                for row in rows:
                    copy.write_row(row)
            else:
                for at in range(0, len(lines), COPY_CHUNK):
                    copy.write("".join(lines[at : at + COPY_CHUNK]))
        if connection.queries_logged:
            connection.queries_log.append(
                {"sql": f"{sql} -- {len(rows)} rows", "time": f"{time.monotonic() - start:.3f}"}
            )

    def _unnest_sql(self, connection: Any) -> str:
        if self._unnest is None:
            arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in self.fields)
            self._unnest = self.head.replace(" VALUES ", f" SELECT * FROM unnest({arrays})")
        return self._unnest
