"""Rewriting the pickled rows of the queue and the log in the data-only stored form (``manage.py mailer_convert``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import router, transaction
from django.db.models import Model, QuerySet

from mailer import dataform, storage

__all__ = ["Converted", "convert_table", "pickled_rows"]


@dataclass
class Converted:
    """What one table's conversion did (or, with ``dry_run``, would do)."""

    table: str
    read: int = 0
    converted: int = 0
    #: ``(primary key, reason)`` of the rows left as they are
    kept: list[tuple[Any, str]] = field(default_factory=list)


def pickled_rows(model: type[Model]) -> QuerySet[Any]:
    """The rows of ``model`` whose ``message_data`` is stored as pickle."""
    return (
        model._default_manager.exclude(message_data__isnull=True)
        .exclude(message_data="")
        .exclude(message_data__startswith="{")
    )


def convert_table(
    model: type[Model],
    *,
    batch_size: int,
    dry_run: bool = False,
    progress: Callable[[Converted], None] | None = None,
) -> Converted:
    """Rewrite ``model``'s pickled rows in the data-only form, in batches by
    primary key, one transaction per batch.

    Each row is decoded as the worker decodes it and encoded with
    :func:`mailer.dataform.encode`; a row that can't be (refused,
    undecodable, holding something that is not plain data, of a class not in
    ``MAILER_MESSAGE_CLASSES``) is kept as it is, with the reason. A row is
    written only if its data is still what was read (the worker may have sent
    and deleted it meanwhile). Converted rows no longer match
    :func:`pickled_rows`: running again goes on where a stopped run left off.
    """
    result = Converted(model._meta.db_table)
    using = router.db_for_write(model)
    last: Any = None
    while True:
        rows = pickled_rows(model).order_by("pk")
        if last is not None:
            rows = rows.filter(pk__gt=last)
        batch = list(rows.values_list("pk", "message_data")[:batch_size])
        if not batch:
            break
        last = batch[-1][0]
        updates = []
        for pk, data in batch:
            result.read += 1
            obj, reason = storage.decode(data)
            if obj is None:
                result.kept.append((pk, reason or "can't be decoded"))
                continue
            try:
                new = dataform.encode(obj)
            except dataform.NotData as err:
                result.kept.append((pk, f"can't be stored as data: {err}"))
                continue
            updates.append((pk, data, new))
        if dry_run:
            result.converted += len(updates)
        else:
            with transaction.atomic(using=using):
                for pk, old, new in updates:
                    result.converted += (
                        model._default_manager.using(using)
                        .filter(pk=pk, message_data=old)
                        .update(message_data=new)
                    )
        if progress is not None:
            progress(result)
    return result
