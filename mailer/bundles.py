"""The stored files' lifecycle: where bundles live, and their deletion.

A *bundle* (see :mod:`mailer.attachments`) is deleted when the last row
referring to it goes (:func:`release`); bundles no row refers to are swept
once older than :data:`ORPHAN_MIN_AGE` (:func:`sweep_orphans`). The rows that
refer to bundles are those of this app's models with an ``attachment_bundle``
column, found through the app registry: nothing here imports the models.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import Storage
from django.db import transaction
from django.db.models import Model
from django.utils import timezone

from mailer.conf import conf

logger = logging.getLogger("mailer.attachments")


#: Where in the storage the bundles live.
PREFIX = "mailer/attachments"
#: A bundle no row refers to is deleted only when its newest file is older
#: than this: a row whose transaction is still open (it may yet commit) is
#: invisible to ``purge_mail_log``, and no transaction stays open a day.
ORPHAN_MIN_AGE = timedelta(days=1)


# --- the storage -----------------------------------------------------------------------


def storage_alias() -> str | None:
    value = conf.ATTACHMENT_STORAGE
    return value or None


def get_storage(alias: str | None = None) -> Storage:
    """The storage named by ``MAILER_ATTACHMENT_STORAGE`` (or ``alias``)."""
    from django.core.files.storage import storages

    alias = alias or storage_alias()
    if alias is None:
        raise ImproperlyConfigured("MAILER_ATTACHMENT_STORAGE is not set.")
    if alias not in settings.STORAGES:
        raise ImproperlyConfigured(
            f"MAILER_ATTACHMENT_STORAGE is {alias!r}, which is not a key of STORAGES "
            f"(keys: {', '.join(sorted(settings.STORAGES)) or 'none'})."
        )
    return storages[alias]


# --- deleting ----------------------------------------------------------------------------


def _referring_models() -> list[type[Model]]:
    """This app's models with an ``attachment_bundle`` column (the queue and
    the log, in that order)."""
    return [
        model
        for model in apps.get_app_config("mailer").get_models()
        if any(field.name == "attachment_bundle" for field in model._meta.fields)
    ]


def is_referenced(bundle: str, using: str | None = None) -> bool:
    """Does a queue row or a log entry refer to ``bundle``?"""
    for model in _referring_models():
        manager = model._default_manager.using(using) if using else model._default_manager
        if manager.filter(attachment_bundle=bundle).exists():
            return True
    return False


#: What a bundle's name looks like: nothing else is ever deleted (a row's
#: ``attachment_bundle`` is data, and may have been written by anyone who
#: can write the table).
BUNDLE_NAME = re.compile(rf"{re.escape(PREFIX)}/\d{{4}}/\d{{2}}/\d{{2}}/[0-9a-f]{{32}}\Z")


def delete_bundle(bundle: str, storage: Storage | None = None) -> int:
    """Delete every file of ``bundle``; return how many."""
    if not BUNDLE_NAME.match(bundle):
        raise ValueError(f"{bundle!r} is not the name of a stored attachments directory.")
    storage = storage or get_storage()
    try:
        _, files = storage.listdir(bundle)
    except FileNotFoundError:
        return 0
    for name in files:
        storage.delete(f"{bundle}/{name}")
    _remove_empty_dir(storage, bundle)
    return len(files)


def _remove_empty_dir(storage: Storage, name: str) -> None:
    """A local directory left empty (object stores have none)."""
    try:
        path = storage.path(name)
    except NotImplementedError:
        return
    try:
        os.rmdir(path)
    except OSError:
        pass


def release(bundle: str | None, using: str | None = None) -> bool:
    """Delete ``bundle`` if no row refers to it any more; True if deleted.

    Never raises: a bundle left behind is no row's and is swept later.
    """
    if not bundle or storage_alias() is None:
        return False
    try:
        if is_referenced(bundle, using):
            return False
        delete_bundle(bundle)
        return True
    except Exception:
        logger.warning(
            "Could not delete stored attachments %s (purge_mail_log will retry).",
            bundle,
            exc_info=True,
        )
        return False


def release_on_commit(bundle: str | None, using: str) -> None:
    """:func:`release` once the current transaction on ``using`` commits
    (at once in autocommit): a rolled-back deletion deletes no file."""
    if bundle and storage_alias() is not None:
        transaction.on_commit(functools.partial(release, bundle, using), using=using)


def _bundles(storage: Storage) -> Iterator[str]:
    """Every bundle directory under :data:`PREFIX` (``YYYY/MM/DD/<uuid>``)."""

    def dirs(path: str) -> list[str]:
        try:
            return sorted(storage.listdir(path)[0])
        except FileNotFoundError:
            return []

    for year in dirs(PREFIX):
        for month in dirs(f"{PREFIX}/{year}"):
            for day in dirs(f"{PREFIX}/{year}/{month}"):
                base = f"{PREFIX}/{year}/{month}/{day}"
                for bundle in dirs(base):
                    yield f"{base}/{bundle}"
                _remove_empty_dir(storage, base)
            _remove_empty_dir(storage, f"{PREFIX}/{year}/{month}")
        _remove_empty_dir(storage, f"{PREFIX}/{year}")


def _newest(storage: Storage, bundle: str, files: list[str]) -> datetime | None:
    times = [storage.get_modified_time(f"{bundle}/{name}") for name in files]
    return max(times) if times else None


def sweep_orphans(
    *, min_age: timedelta = ORPHAN_MIN_AGE, now: datetime | None = None, using: str | None = None
) -> int:
    """Delete bundles no row refers to, once older than ``min_age``; return
    how many files were deleted.

    A bundle whose newest file is younger may belong to a row whose
    transaction has not committed yet, and is left alone.
    """
    if storage_alias() is None:
        return 0
    storage = get_storage()
    now = now or timezone.now()
    deleted = 0
    for bundle in _bundles(storage):
        try:
            _, files = storage.listdir(bundle)
            newest = _newest(storage, bundle, files)
            if newest is not None:
                if timezone.is_naive(newest):
                    newest = timezone.make_aware(newest, timezone.get_default_timezone())
                if now - newest < min_age:
                    continue
            if is_referenced(bundle, using):
                continue
            deleted += delete_bundle(bundle, storage)
        except Exception:
            logger.warning("Could not sweep stored attachments %s", bundle, exc_info=True)
    return deleted
