"""Large attachments off the database: ``MAILER_ATTACHMENT_STORAGE``.

With ``MAILER_ATTACHMENT_STORAGE`` set (a key of Django's ``STORAGES``), every
attachment, MIME attachment or alternative whose content is larger than
``MAILER_ATTACHMENT_INLINE_MAX`` bytes is written to that storage when the
message is queued, and the stored message keeps a :class:`StoredAttachment`
in its place: plain data (storage key, name, MIME type, size, sha256), loaded
by the allow-listed unpickler of :mod:`mailer.storage` like any other stored
value and never opening anything by itself. :func:`load` puts the content
back, explicitly, when the message is about to be sent: the message that goes
out is byte for byte the one that would have gone out inline.

The files of one queued message form a *bundle*: a directory
``mailer/attachments/YYYY/MM/DD/<uuid>/`` whose name is kept in the
``attachment_bundle`` column of the queue row and of every log entry that
keeps the message's data (an indexed column, so "does anything still refer to
this bundle?" is two index lookups). Files are written before the row; a
bundle is deleted when the last row referring to it goes
(:func:`mailer.bundles.release`), and bundles that no row refers to (the
row's transaction rolled back, the process died between writing and committing, the row was
deleted by other means) are swept by ``purge_mail_log`` once older than
:data:`ORPHAN_MIN_AGE` (:func:`mailer.bundles.sweep_orphans`).
"""

from __future__ import annotations

import binascii
import copy
import email.message
import email.mime.base as email_mime_base
import hashlib
import logging
import posixpath
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.utils import timezone

# The stored files' lifecycle (mailer.bundles): its names stay importable here.
from mailer.bundles import BUNDLE_NAME as BUNDLE_NAME
from mailer.bundles import ORPHAN_MIN_AGE as ORPHAN_MIN_AGE
from mailer.bundles import PREFIX as PREFIX
from mailer.bundles import delete_bundle as delete_bundle
from mailer.bundles import get_storage as get_storage
from mailer.bundles import is_referenced as is_referenced
from mailer.bundles import release as release
from mailer.bundles import release_on_commit as release_on_commit
from mailer.bundles import storage_alias as storage_alias
from mailer.bundles import sweep_orphans as sweep_orphans
from mailer.conf import conf

logger = logging.getLogger(__name__)

__all__ = [
    "ORPHAN_MIN_AGE",
    "PREFIX",
    "AttachmentUnavailable",
    "StoredAttachment",
    "check_present",
    "chunks",
    "get_storage",
    "load",
    "references",
    "release",
    "store",
    "sweep_orphans",
]


class StoredAttachment:
    """Stands in for content written to ``MAILER_ATTACHMENT_STORAGE``.

    Data only: unpickling it runs no code of its own (no ``__setstate__``),
    and nothing is opened until :func:`load` is called.
    """

    def __init__(
        self,
        key: str,
        *,
        name: str | None,
        mimetype: str | None,
        size: int,
        sha256: str,
        text: bool,
    ) -> None:
        self.key = key  # the storage's name of the file
        self.name = name  # the attachment's file name, if any
        self.mimetype = mimetype
        self.size = size  # bytes in the storage
        self.sha256 = sha256
        self.text = text  # the content was a str (stored UTF-8 encoded)

    def __repr__(self) -> str:
        return f"<StoredAttachment {self.key} {self.name!r} {self.size} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredAttachment) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def bundle(self) -> str:
        return posixpath.dirname(self.key)


class AttachmentUnavailable(Exception):
    """A stored attachment can't be read back (missing, changed, storage down)."""


# --- queue time --------------------------------------------------------------------------


def _size_over(content: str | bytes, limit: int) -> bool:
    if isinstance(content, str):
        if len(content) > limit:
            return True
        if len(content) * 4 <= limit:
            return False
        return len(content.encode("utf-8")) > limit
    return len(content) > limit


def _parts(email: Any) -> Iterator[tuple[str, int, Any]]:
    """``(list name, index, item)`` for every attachment and alternative."""
    for field in ("attachments", "alternatives"):
        for index, item in enumerate(getattr(email, field, None) or []):
            yield field, index, item


def _content_of(field: str, item: Any) -> tuple[Any, str | None, str | None] | None:
    """``(content, name, mimetype)`` of an item that could be stored, else None."""
    if isinstance(item, email.message.Message):
        if item.is_multipart():
            return None
        return item._payload, item.get_filename(), item.get_content_type()  # type: ignore[attr-defined]
    if isinstance(item, (tuple, list)):
        if field == "attachments" and len(item) == 3:
            return item[1], item[0], item[2]
        if field == "alternatives" and len(item) == 2:
            return item[0], None, item[1]
    return None


def _with_content(field: str, item: Any, content: Any) -> Any:
    """``item`` (a copy) with its content replaced by ``content``."""
    if isinstance(item, email.message.Message):
        part = copy.copy(item)
        part._payload = content  # type: ignore[attr-defined]
        return part
    values = list(item)
    values[1 if field == "attachments" else 0] = content
    if hasattr(item, "_make"):
        return item._make(values)
    return type(item)(values)


class _Writer:
    """Writes the files of one bundle; removes them again if asked."""

    def __init__(self, storage: Storage, bundle: str | None = None) -> None:
        self.storage = storage
        if bundle is None:
            day = timezone.now().strftime("%Y/%m/%d")
            bundle = f"{PREFIX}/{day}/{uuid.uuid4().hex}"
        self.bundle = bundle
        self.written: list[str] = []
        self.count = 0

    def write(self, content: str | bytes, name: Any, mimetype: Any) -> StoredAttachment:
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        digest = hashlib.sha256(data).hexdigest()
        self.count += 1
        key = self.storage.save(f"{self.bundle}/{self.count}", ContentFile(data))
        self.written.append(key)
        return StoredAttachment(
            key,
            name=str(name) if name is not None else None,
            mimetype=str(mimetype) if mimetype is not None else None,
            size=len(data),
            sha256=digest,
            text=isinstance(content, str),
        )

    def copy_from(self, ref: StoredAttachment) -> StoredAttachment:
        """A file of another bundle, copied into this one."""
        with self.storage.open(ref.key, "rb") as handle:
            data = handle.read()
        new = self.write(data, ref.name, ref.mimetype)
        new.text = ref.text
        return new

    def discard(self) -> None:
        for key in self.written:
            try:
                self.storage.delete(key)
            except Exception:
                logger.warning("Could not delete stored attachment %s", key, exc_info=True)
        self.written.clear()


class Stored:
    """What :func:`store` did to a batch of messages: their bundles."""

    def __init__(self) -> None:
        self.writers: list[_Writer] = []

    def discard(self) -> None:
        """Delete the files written (the rows won't exist after all)."""
        for writer in self.writers:
            writer.discard()


def store(email: Any, stored: Stored | None = None) -> tuple[Any, str | None]:
    """``(form to pickle, bundle or None)`` for a message about to be queued.

    Content over ``MAILER_ATTACHMENT_INLINE_MAX`` is written to the storage
    and replaced, in a shallow copy of ``email``, by a
    :class:`StoredAttachment` (the caller's message is not changed). A
    message that already holds references (requeued from the log) keeps
    them. Without ``MAILER_ATTACHMENT_STORAGE``: ``(email, None)``. If a
    write fails, what this call wrote is deleted and the error propagates:
    nothing is queued half-way.
    """
    alias = storage_alias()
    refs = references(email)
    if alias is None and not refs:
        return email, None
    limit = conf.ATTACHMENT_INLINE_MAX
    bundle = refs[0].bundle if refs else None
    writer: _Writer | None = None
    changes: dict[str, list[Any]] = {}
    try:
        for field, index, item in _parts(email):
            found = _content_of(field, item)
            if found is None:
                continue
            content, name, mimetype = found
            if isinstance(content, StoredAttachment):
                if content.bundle == bundle:
                    continue  # already stored, in this message's bundle
            elif not (
                alias is not None
                and isinstance(content, (str, bytes, bytearray))
                and _size_over(content, limit)
            ):
                continue  # stays inline
            if writer is None:
                writer = _Writer(get_storage(alias), bundle)
                bundle = writer.bundle
                if stored is not None:
                    stored.writers.append(writer)
            if isinstance(content, StoredAttachment):
                new = writer.copy_from(content)
            else:
                new = writer.write(content, name, mimetype)
            items = changes.setdefault(field, list(getattr(email, field)))
            items[index] = _with_content(field, item, new)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if not changes:
        return email, bundle
    result = copy.copy(email)
    result.__dict__.update(changes)
    return result, bundle


def ref_in(item: Any) -> StoredAttachment | None:
    if isinstance(item, email.message.Message):
        payload = getattr(item, "_payload", None)
        return payload if isinstance(payload, StoredAttachment) else None
    if isinstance(item, (tuple, list)):
        for value in item:
            if isinstance(value, StoredAttachment):
                return value
    return None


def references(email: Any) -> list[StoredAttachment]:
    """The stored attachments a decoded message refers to, in order."""
    found = []
    for _, _, item in _parts(email):
        ref = ref_in(item)
        if ref is not None:
            found.append(ref)
    return found


# --- send time ---------------------------------------------------------------------------


def _storage_for(ref: StoredAttachment, storage: Storage | None) -> tuple[Storage, str | None]:
    alias = storage_alias()
    if storage is None:
        if alias is None:
            raise AttachmentUnavailable(
                f"the message has a stored attachment ({ref.name or ref.key}) but "
                "MAILER_ATTACHMENT_STORAGE is not set: set it to the storage it was "
                "written to."
            )
        storage = get_storage(alias)
    return storage, alias


def _unreadable(ref: StoredAttachment, alias: str | None, err: Exception) -> AttachmentUnavailable:
    if isinstance(err, FileNotFoundError):
        return AttachmentUnavailable(
            f"stored attachment {ref.name or '(no name)'} is missing from "
            f"MAILER_ATTACHMENT_STORAGE {alias!r} ({ref.key}); the message is not sent "
            "without it."
        )
    return AttachmentUnavailable(
        f"stored attachment {ref.name or '(no name)'} ({ref.key}) can't be read from "
        f"MAILER_ATTACHMENT_STORAGE {alias!r}: {type(err).__name__}: {err}"
    )


def _changed(ref: StoredAttachment, size: int) -> AttachmentUnavailable:
    return AttachmentUnavailable(
        f"stored attachment {ref.name or '(no name)'} ({ref.key}) is not what was "
        f"stored: {size} bytes read, {ref.size} expected, or its sha256 differs."
    )


#: Bytes read at a time when a stored attachment is streamed.
READ_CHUNK = 57 * 16384


def chunks(ref: StoredAttachment, storage: Storage | None = None) -> Iterator[bytes]:
    """The content ``ref`` stands for, in pieces of :data:`READ_CHUNK` bytes
    (the last may be shorter), checked against its size and sha256 as it is
    read: :class:`AttachmentUnavailable` when it can't be read or, after the
    last piece, when it is not what was stored. Holds one piece at a time."""
    storage, alias = _storage_for(ref, storage)
    digest = hashlib.sha256()
    size = 0
    pending = b""
    try:
        with storage.open(ref.key, "rb") as handle:
            while True:
                # A storage may return less than asked before the end: the
                # pieces are kept whole so that they encode line by line.
                piece = handle.read(READ_CHUNK - len(pending))
                if not piece:
                    break
                digest.update(piece)
                size += len(piece)
                pending = pending + piece if pending else piece
                if len(pending) == READ_CHUNK:
                    yield pending
                    pending = b""
    except AttachmentUnavailable:
        raise
    except Exception as err:
        raise _unreadable(ref, alias, err) from err
    if size != ref.size or digest.hexdigest() != ref.sha256:
        raise _changed(ref, size)
    if pending:
        yield pending


def check_present(ref: StoredAttachment, storage: Storage | None = None) -> None:
    """Check that ``ref``'s file is there with the size stored, without
    reading it (:class:`AttachmentUnavailable` if not). Its content is
    checked as it is streamed (:func:`chunks`)."""
    storage, alias = _storage_for(ref, storage)
    try:
        size = storage.size(ref.key)
    except Exception as err:
        raise _unreadable(ref, alias, err) from err
    if size != ref.size:
        raise _changed(ref, size)


def read(ref: StoredAttachment, storage: Storage | None = None) -> str | bytes:
    """The content ``ref`` stands for, checked against its size and sha256."""
    storage, alias = _storage_for(ref, storage)
    try:
        with storage.open(ref.key, "rb") as handle:
            data = handle.read()
    except Exception as err:
        raise _unreadable(ref, alias, err) from err
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise _changed(ref, len(data))
    return data.decode("utf-8") if ref.text else data


#: Sent form -> {id(content read): reference}, so the log keeps references.
_loaded: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def load(email: Any, keep: Callable[[str, Any], bool] | None = None) -> Any:
    """``email`` with every stored attachment read back (a shallow copy).

    ``email`` itself when it has none. Raises :class:`AttachmentUnavailable`
    when one can't be read, or is not what was stored. :func:`for_log` turns
    the result back into the stored form. Items for which ``keep(field,
    item)`` is true stay references, their files checked for presence and
    size (:func:`check_present`) but not read: they are sent straight from
    the storage (:mod:`mailer.smtpstream`), which checks their sha256 as
    they stream.
    """
    changes: dict[str, list[Any]] = {}
    # id(item sent) -> item as stored; those of an earlier load carry over.
    originals: dict[int, Any] = dict(_loaded_from(email))
    storage = None
    for field, index, item in _parts(email):
        ref = ref_in(item)
        if ref is None:
            continue
        if storage is None and storage_alias() is not None:
            storage = get_storage()
        if keep is not None and keep(field, item):
            check_present(ref, storage)
            continue
        content = read(ref, storage)
        loaded = _prerendered(email, field, item, content)
        if loaded is None:
            loaded = _with_content(field, item, content)
        del content
        originals[id(loaded)] = item
        items = changes.setdefault(field, list(getattr(email, field)))
        items[index] = loaded
    if not changes:
        return email
    result = copy.copy(email)
    result.__dict__.update(changes)
    try:
        _loaded[result] = originals
    except TypeError:  # an unhashable subclass: the log keeps the content
        pass
    return result


#: Bytes of content per base64 line, as ``email.encoders`` writes them.
_BASE64_LINE = 57
#: Content checked against Django's own rendering before the fast path is used.
_SAMPLE = 3 * _BASE64_LINE + 11


def _base64_lines(data: bytes) -> str:
    """``base64.encodebytes(data)`` as text, without its per-line pieces.

    The standard library builds a list of one object per 76-character line
    (for 20 MB, 370,000 objects, about 100 MB at peak); this holds the
    encoded text twice at most.
    """
    encoded = binascii.b2a_base64(data, newline=False)
    width = _BASE64_LINE // 3 * 4
    lines = -(-len(encoded) // width)
    out = bytearray(len(encoded) + lines)
    view = memoryview(encoded)
    for line in range(lines):
        chunk = view[line * width : (line + 1) * width]
        start = line * (width + 1)
        out[start : start + len(chunk)] = chunk
        out[start + len(chunk)] = 0x0A
    del view, encoded
    return out.decode("ascii")


def _prerendered(email: Any, field: str, item: Any, content: str | bytes) -> Any:
    """A binary attachment as the MIME part Django would make of it, or None.

    Django base64-encodes a binary attachment through ``email.encoders``,
    which costs about five times its size at peak. Here Django makes the part
    itself (so its headers are Django's own) from the start of the content,
    the encoding of that start is checked against ours, and the part is given
    ours of the whole content: the same bytes go out, with a fraction of the
    memory. Django versions without ``_create_attachment`` (6.1 builds parts
    differently), text and ``message/*`` attachments keep the normal path.
    """
    create = getattr(email, "_create_attachment", None)
    if (
        field != "attachments"
        or not isinstance(item, tuple)
        or len(item) != 3
        or not isinstance(content, bytes)
        or len(content) <= _SAMPLE
        or not isinstance(item[2], str)
        or item[2].split("/", 1)[0] in ("text", "message")
        or create is None
    ):
        return None
    try:
        part = create(item[0], content[:_SAMPLE], item[2])
        if not isinstance(part, email_mime_base.MIMEBase) or part.get_payload() != _base64_lines(
            content[:_SAMPLE]
        ):
            return None
    except Exception:
        return None
    part.set_payload(_base64_lines(content))
    return part


def _loaded_from(email: Any) -> dict[int, Any]:
    try:
        return _loaded.get(email) or {}
    except TypeError:
        return {}


def for_log(email: Any) -> Any:
    """The form of a sent message to keep in the log: references, not content."""
    originals = _loaded_from(email)
    if not originals:
        return email
    changes: dict[str, list[Any]] = {}
    for field, index, item in _parts(email):
        if id(item) in originals:
            items = changes.setdefault(field, list(getattr(email, field)))
            items[index] = originals[id(item)]
    if not changes:
        return email
    result = copy.copy(email)
    result.__dict__.update(changes)
    return result
