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
from tests.crafted import assemble, b64, glob, u


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
    with pytest.raises(RefusedClass, match="email.charset.partial"):
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
    settings.MAILER_MESSAGE_FORMAT = "pickle"
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


# --- crafted rows (issue #27) ----------------------------------------------------------


_u, _global, _assemble, _b64 = u, glob, assemble, b64


@pytest.fixture
def email_package_restored():
    import email
    import sys

    path = list(email.__path__)
    before = set(sys.modules)
    subtype = EmailMessage.content_subtype
    yield
    email.__path__[:] = path
    email.__dict__["__path__"] = email.__path__
    for name in set(sys.modules) - before:
        if name.startswith("email."):
            del sys.modules[name]
    EmailMessage.content_subtype = subtype


def test_a_module_reached_through_an_allowed_module_runs_nothing(tmp_path, email_package_restored):
    """The first row of issue #27: the email package reached as an attribute
    of email.mime.base, its __path__ rewritten by BUILD to a directory the
    attacker controls, then email.<anything> imported from there."""
    import email

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sdpwn.py").write_text(f"open({str(marker)!r}, 'w').close()\nrun = print\n")
    raw = _assemble(
        _global("email.mime.base", "email"),
        pickle.EMPTY_DICT,
        _u("__path__"),
        pickle.EMPTY_LIST,
        _u(str(evil)),
        pickle.APPEND,
        pickle.SETITEM,
        pickle.BUILD,
        pickle.POP,
        _global("email.sdpwn", "run"),
    )
    obj, reason = decode(_b64(raw))
    assert obj is None and reason
    assert not marker.exists()
    assert str(evil) not in list(email.__path__)


def test_a_class_attribute_write_does_not_stick(email_package_restored):
    """The second row of issue #27: BUILD on an allowed class (slot state
    content_subtype = "html") changes every later message of the process,
    though the decode itself reports a failure."""
    raw = _assemble(
        _global("django.core.mail.message", "EmailMessage"),
        pickle.NONE,
        pickle.EMPTY_DICT,
        _u("content_subtype"),
        _u("html"),
        pickle.SETITEM,
        pickle.TUPLE2,
        pickle.BUILD,
        pickle.POP,
        _global("os", "system"),
    )
    obj, reason = decode(_b64(raw))
    assert obj is None and reason
    assert EmailMessage.content_subtype == "plain"
    assert EmailMessage("S", "b", "f@example.com", ["t@example.com"]).content_subtype == "plain"


def test_a_232_dbbackend_row_decodes_with_an_inert_connection():
    """2.3.2 stored EmailMessage.send() through DbBackend with the backend in
    the pickle (EmailMessage.send() sets .connection before sending)."""
    from mailer.backend import DbBackend

    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.__dict__["connection"] = DbBackend()
    raw = pickle.dumps(email, protocol=4)
    assert b"mailer.backend" in raw and b"DbBackend" in raw
    obj, reason = decode(_b64(raw))
    assert reason is None
    assert obj.subject == "S"
    assert obj.__dict__.get("connection") is None and obj.__dict__.get("_connection") is None


class ProjectBackend:
    """A project's own email backend, stored as a message's connection."""

    def __init__(self) -> None:
        self.host = "smtp.example.com"


def test_any_backend_class_as_the_connection_is_inert():
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.__dict__["connection"] = ProjectBackend()
    obj, reason = decode(_b64(pickle.dumps(email)))
    assert reason is None and obj.subject == "S"


def test_an_unlisted_class_elsewhere_is_refused_naming_it():
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    email.extra_headers = {"X-Obj": ProjectBackend()}
    obj, reason = decode(_b64(pickle.dumps(email)))
    assert obj is None
    assert f"{__name__}.ProjectBackend" in reason


@pytest.mark.parametrize(
    "raw",
    [
        # a module object handed out directly
        pytest.param(lambda: _assemble(_global("email.mime.base", "email")), id="module"),
        pytest.param(lambda: _assemble(_global("email", "mime")), id="submodule"),
        # a dotted name reaching through attributes
        pytest.param(lambda: _assemble(_global("email.utils", "os.system")), id="dotted"),
        # __dict__ of an allowed class via BUILD dict state
        pytest.param(
            lambda: _assemble(
                _global("email.message", "Message"),
                pickle.EMPTY_DICT,
                _u("policy"),
                pickle.NONE,
                pickle.SETITEM,
                pickle.BUILD,
            ),
            id="build-class-dict",
        ),
        # BUILD on a function (its __defaults__ via slot state)
        pytest.param(
            lambda: _assemble(
                _global("django.utils.translation", "gettext"),
                pickle.NONE,
                pickle.EMPTY_DICT,
                _u("__defaults__"),
                pickle.EMPTY_TUPLE,
                pickle.SETITEM,
                pickle.TUPLE2,
                pickle.BUILD,
            ),
            id="build-function",
        ),
        # SETITEM into an allowed class
        pytest.param(
            lambda: _assemble(_global("builtins", "dict"), _u("k"), _u("v"), pickle.SETITEM),
            id="setitem-class",
        ),
        # a copyreg extension code
        pytest.param(lambda: _assemble(pickle.EXT1 + b"\x01"), id="ext-code"),
        # a persistent id
        pytest.param(lambda: _assemble(_u("x"), pickle.BINPERSID), id="persistent-id"),
        # getattr beyond ZoneInfo._unpickle
        pytest.param(
            lambda: _assemble(
                _global("builtins", "getattr"),
                _global("builtins", "object"),
                _u("__subclasses__"),
                pickle.TUPLE2,
                pickle.REDUCE,
            ),
            id="getattr",
        ),
        # a codec named by the data (its lookup imports a module)
        pytest.param(
            lambda: _assemble(
                _global("_codecs", "encode"), _u("x"), _u("rot13"), pickle.TUPLE2, pickle.REDUCE
            ),
            id="codec",
        ),
        # a lazy string of another function
        pytest.param(
            lambda: _assemble(
                _global("django.utils.functional", "_lazy_proxy_unpickle"),
                _global("builtins", "dict"),
                pickle.EMPTY_TUPLE,
                pickle.EMPTY_DICT,
                pickle.TUPLE3,
                pickle.REDUCE,
            ),
            id="lazy-other",
        ),
        # a lazy format string reading attributes into the subject
        pytest.param(
            lambda: _assemble(
                _global("django.utils.text", "_format_lazy"),
                _u("{0.__globals__}"),
                _global("django.utils.translation", "gettext"),
                pickle.TUPLE2,
                pickle.REDUCE,
            ),
            id="format-attribute",
        ),
        # a time zone key naming a module path
        pytest.param(
            lambda: _assemble(
                _global("zoneinfo", "ZoneInfo._unpickle"),
                _u("../../etc/passwd"),
                pickle.NEWTRUE,
                pickle.TUPLE2,
                pickle.REDUCE,
            ),
            id="zone-key",
        ),
        # the placeholder of an unlisted class, called
        pytest.param(
            lambda: _assemble(_global("os", "system"), _u("true"), pickle.TUPLE1, pickle.REDUCE),
            id="unlisted-called",
        ),
        # REDUCE on something find_class did not hand out (a str)
        pytest.param(
            lambda: _assemble(_u("x"), pickle.EMPTY_TUPLE, pickle.REDUCE), id="reduce-object"
        ),
    ],
)
def test_crafted_rows_are_refused(raw, email_package_restored):
    import email
    import sys

    path = list(email.__path__)
    modules = set(sys.modules)
    obj, reason = decode(_b64(raw()))
    assert obj is None and reason
    assert list(email.__path__) == path
    assert set(sys.modules) == modules
    assert EmailMessage.content_subtype == "plain"


def test_read_pickle_off_refuses_without_reading(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"
    data = email_to_db(EmailMessage("S", "b", "f@example.com", ["t@example.com"]))
    assert decode(data)[0] is not None
    settings.MAILER_READ_PICKLE = False
    obj, reason = decode(data)
    assert obj is None
    assert "MAILER_READ_PICKLE" in reason and "mailer_convert" in reason


def test_a_wildcard_imports_nothing(settings):
    import sys

    settings.MAILER_PICKLE_ALLOWLIST = ["tests.*"]
    sys.modules.pop("tests.never_imported", None)
    raw = _assemble(_global("tests.never_imported", "Thing"))
    obj, reason = decode(_b64(raw))
    assert obj is None and "tests.never_imported.Thing" in reason
    assert "tests.never_imported" not in sys.modules
