"""mailer/storage.py: the stored form, and decoding that runs no code."""

from __future__ import annotations

import base64
import os
import pickle
import pickletools

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils.translation import gettext_lazy

from mailer.storage import (
    RefusedClass,
    StoredConnection,
    db_to_email,
    decode,
    decode_error,
    email_to_db,
    safe_loads,
)


class Evil:
    """Unpickling this runs a shell command (``__reduce__`` -> os.system)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ProjectMessage(EmailMessage):
    """A project's own message class, stored as itself."""


def evil_data(marker) -> str:
    return base64.encodebytes(pickle.dumps(Evil(str(marker)))).decode("ascii")


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    obj, reason = decode(evil_data(marker))
    assert obj is None
    assert "os.system" in reason or "posix.system" in reason
    assert "MAILER_PICKLE_ALLOWLIST" in reason
    assert not marker.exists()
    # The same payload in the oldest raw form is refused too.
    raw = pickle.dumps(Evil(str(marker)), protocol=0).decode("latin-1")
    assert db_to_email(raw) is None
    assert not marker.exists()
    # Sanity: plain pickle would have run it (so the test can fail).
    pickle.loads(pickle.dumps(Evil(str(marker))))
    assert marker.exists()


def test_reaching_through_an_allowed_module_is_refused():
    # Protocol 4 resolves dotted names: email.utils has os imported.
    payload = (
        b"\x80\x04\x8c\x0bemail.utils\x8c\tos.system\x93\x8c\x04true\x85R."
    )
    pickletools.dis(payload, out=open(os.devnull, "w"))  # a well-formed pickle
    with pytest.raises(RefusedClass):
        safe_loads(payload, ())
    # A name imported into an allowed module from elsewhere is not allowed with it.
    imported = b"\x80\x04\x8c\remail.charset\x8c\x07partial\x93."
    with pytest.raises(RefusedClass, match="functools.partial"):
        safe_loads(imported, ())


def test_messages_round_trip():
    email = EmailMultiAlternatives("S", "b", "f@example.com", ["t@example.com"])
    email.attach_alternative("<p>x</p>", "text/html")
    email.attach("a.bin", b"\x00\x01", "application/octet-stream")
    back = db_to_email(email_to_db(email))
    assert back.subject == "S"
    assert back.alternatives[0][0] == "<p>x</p>"
    assert decode_error(email_to_db(email)) is None


@pytest.mark.parametrize("value", ["plain text", ["a", 1, (2.5, None)], {"k": b"v"}])
def test_other_allowed_objects_round_trip(value):
    assert db_to_email(email_to_db(value)) == value


def test_lazy_strings_decode():
    email = EmailMessage(gettext_lazy("Password"), "b", "f@example.com", ["t@example.com"])
    assert str(db_to_email(email_to_db(email)).subject) == "Password"


def test_project_classes_need_the_allowlist(settings):
    data = email_to_db(ProjectMessage("S", "b", "f@example.com", ["t@example.com"]))
    obj, reason = decode(data)
    assert obj is None
    assert f"{__name__}.ProjectMessage" in reason
    settings.MAILER_PICKLE_ALLOWLIST = [f"{__name__}.ProjectMessage"]
    assert decode(data)[0].subject == "S"
    settings.MAILER_PICKLE_ALLOWLIST = [f"{__name__}.*"]
    assert decode(data)[0].subject == "S"
    # A module pattern does not reach into submodules' imports of others.
    settings.MAILER_PICKLE_ALLOWLIST = ["tests.*"]
    assert decode(evil_data("/nonexistent/x"))[0] is None


def test_a_stored_connection_becomes_inert():
    from django.core.mail.backends.locmem import EmailBackend

    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.__dict__["connection"] = EmailBackend()
    raw = pickle.dumps(email)  # what Django < 6.1 with a connection stored
    assert b"locmem" in raw
    stored = safe_loads(raw, ())
    conn = stored.__dict__.get("connection") or stored.__dict__.get("_connection")
    assert conn is None or isinstance(conn, StoredConnection)


@pytest.mark.parametrize(
    "data,reason",
    [
        ("", "empty"),
        ("!!! not base64", "not base64"),
        (base64.encodebytes(b"not a pickle").decode(), "unpickling failed"),
    ],
)
def test_garbage_gives_a_reason(data, reason):
    obj, why = decode(data)
    assert obj is None
    assert reason in why


@pytest.mark.parametrize("value", ["", 0, [], (), "ünïcode", [["nested"], {"k": 1}]])
def test_any_allowed_object_round_trips_through_the_old_import_path(value):
    """2.3.2's mailer.models.email_to_db/db_to_email, for non-messages too."""
    from mailer.models import db_to_email as old_db_to_email
    from mailer.models import email_to_db as old_email_to_db

    data = old_email_to_db(value)
    assert data and data.isascii()
    back = old_db_to_email(data)
    assert back == value and type(back) is type(value)


def test_a_live_connection_is_left_out_and_left_in_place(smtp_server):
    from django.core.mail.backends.smtp import EmailBackend

    connection = EmailBackend(host=smtp_server.host, port=smtp_server.port, timeout=5)
    connection.open()  # holds a socket, which can't be pickled
    try:
        email = EmailMessage("S", "b", "f@example.com", ["t@example.com"], connection=connection)
        back = db_to_email(email_to_db(email))

        def held(obj):  # Django < 6.1 keeps it in "connection", 6.1 in "_connection"
            return obj.__dict__.get("connection") or obj.__dict__.get("_connection")

        assert back.subject == "S"
        assert held(back) is None
        assert held(email) is connection  # the caller's object is unchanged
    finally:
        connection.close()
