"""Shared fixtures: a real SMTP server, database helpers, a subprocess runner."""

from __future__ import annotations

import email
import email.policy
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from django.db import connection

from mailer.compat import HAS_MAILERS
from mailer.models import PRIORITY_LOW
from tests.settings import smtp_mailers

ROOT = Path(__file__).resolve().parent.parent


# Servers that must answer when they were asked for: vendor -> (name, MAILER_TEST_DB).
SERVERS = {"postgresql": ("PostgreSQL", "postgres"), "mysql": ("MariaDB/MySQL", "mysql")}

# Markers for tests that need a kind of database: marker -> (vendors, reason to skip).
NEEDS = {
    "postgres": ({"postgresql"}, "needs MAILER_TEST_DB=postgres"),
    "mysql": ({"mysql"}, "needs MAILER_TEST_DB=mysql (MariaDB or MySQL)"),
    "rowlocks": (
        {"postgresql", "mysql"},
        "needs a database with row locks (MAILER_TEST_DB=postgres or mysql)",
    ),
}


@pytest.fixture(scope="session", autouse=True)
def _require_database(django_db_blocker):
    """With MAILER_TEST_DB=postgres or mysql, an unreachable server is an error, not a skip."""
    if connection.vendor in SERVERS:
        name, value = SERVERS[connection.vendor]
        with django_db_blocker.unblock():
            try:
                connection.ensure_connection()
            except Exception as err:  # pragma: no cover - environment problem
                pytest.exit(f"{name} requested (MAILER_TEST_DB={value}) but unreachable: {err}", 3)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, (vendors, reason) in NEEDS.items():
            if marker in item.keywords and connection.vendor not in vendors:
                item.add_marker(pytest.mark.skip(reason=reason))


# --- SMTP ---------------------------------------------------------------------------


class Received(dict):
    """A message the server accepted: "from", "to", "raw", "mail_options",
    and "message", parsed when first asked for (parsing a 27 MB message in
    the server's thread under load outlasted the client's timeout)."""

    def __missing__(self, key):
        if key != "message":
            raise KeyError(key)
        self[key] = email.message_from_bytes(self["raw"], policy=email.policy.default)
        return self[key]


@dataclass
class SMTPServer:
    """An aiosmtpd server on loopback that records what it receives.

    ``fail_with``: an SMTP reply (e.g. "451 4.3.0 Temporary failure") to give to DATA;
    ``fail_first``: answer DATA with ``fail_first_reply`` (451) that many
    times, then accept (a provider busy for a while; ``attempts`` counts
    every DATA, with the time it came in ``attempt_times``);
    ``delay``: seconds to wait in DATA (a slow provider); ``drop``: close
    the connection instead of answering.
    """

    host: str = "127.0.0.1"
    port: int = 0
    messages: list = field(default_factory=list)
    fail_with: str | None = None
    fail_rcpt: str | None = None
    refuse: dict = field(default_factory=dict)  # address -> reply, others accepted
    fail_first: int = 0
    fail_first_reply: str = "451 4.3.0 Try again later"
    attempts: int = 0
    attempt_times: list = field(default_factory=list)
    delay: float = 0.0
    drop: bool = False
    drop_matching: str | None = None  # drop only messages containing this text
    active: int = 0  # messages in DATA right now, and the most at once
    max_active: int = 0
    connections: int = 0
    transports: list = field(default_factory=list)  # one per connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.fail_rcpt:
            return self.fail_rcpt
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        import asyncio

        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            with self.lock:
                self.active -= 1
        if self.drop_matching and self.drop_matching.encode() in envelope.content:
            session.transport.close()
            return "421 closing"
        if self.drop:
            session.transport.close()
            return "421 closing"
        if self.fail_with:
            return self.fail_with
        with self.lock:
            self.attempts += 1
            self.attempt_times.append(time.time())
            if self.attempts <= self.fail_first:
                return self.fail_first_reply
        with self.lock:
            self.messages.append(
                Received(
                    {
                        "from": envelope.mail_from,
                        "to": list(envelope.rcpt_tos),
                        "raw": envelope.content,
                        "mail_options": list(envelope.mail_options),
                    }
                )
            )
        return "250 Message accepted"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.connections += 1
            self.transports.append(server.transport)
        session.host_name = hostname
        return responses

    def close_connections(self) -> None:
        """Close every client connection from the server's side (an idle
        timeout at a provider)."""
        with self.lock:
            transports = list(self.transports)
        for transport in transports:
            transport._loop.call_soon_threadsafe(transport.close)
        deadline = time.monotonic() + 5
        while not all(t.is_closing() for t in transports) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the FIN reaches the client

    def message_ids(self) -> list[str]:
        with self.lock:
            return [m["message"]["Message-ID"] for m in self.messages]

    def subjects(self) -> list[str]:
        with self.lock:
            return [m["message"]["Subject"] for m in self.messages]

    def wait_for(self, count: int, timeout: float = 15) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} messages, got {len(self.messages)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server():
    """A real SMTP server on a free loopback port, stopped after the test."""
    server = SMTPServer(port=free_port())
    controller = Controller(server, hostname=server.host, port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def second_smtp_server():
    """Another real SMTP server (a second provider, for routes)."""
    server = SMTPServer(port=free_port())
    controller = Controller(server, hostname=server.host, port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


class SilentServer:
    """Accepts TCP connections and never says a word (a hung provider)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


class ScriptedServer:
    """A line-based SMTP server of our own on loopback (a thread per
    connection) that records, for every command line, the group it came in:
    how many replies the server had sent on that connection when the line
    arrived. Commands a client pipelines share a group; commands sent one
    after the other's reply don't.

    ``pipelining``: EHLO offers PIPELINING. ``refuse``: address -> RCPT
    reply. ``script``: ``(command, n)`` -> the reply to the n-th such
    command on the server (1-based; commands ``MAIL``, ``RCPT``, ``DATA``,
    ``.`` for the end of the data, ``RSET``), or ``"CLOSE"`` to close the
    connection instead of answering; a 421 closes it after answering.
    ``endless_greeting``: ``220-`` lines every half second, never the last.
    ``end_delay``: seconds of work before answering the end of the data.
    """

    def __init__(self, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.refuse: dict[str, str] = {}
        self.script: dict[tuple[str, int], str] = {}
        self.endless_greeting = False
        self.end_delay = 0.0
        self.lines: list[tuple[int, int, str]] = []  # (connection, group, line)
        self.messages: list[dict] = []
        self.connections = 0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host, self.port = "127.0.0.1", self.sock.getsockname()[1]
        self.open: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
                self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def commands(self, connection: int | None = None) -> list[tuple[int, str]]:
        """``(group, line)`` of the commands (not the data's lines)."""
        with self.lock:
            return [(g, line) for c, g, line in self.lines if connection in (None, c)]

    def groups(self, connection: int = 1) -> list[list[str]]:
        """The command lines of a connection, grouped as they arrived, each
        shortened to its verb (``MAIL``, ``RCPT``, ``DATA``, ``.``)."""
        out: dict[int, list[str]] = {}
        for group, line in self.commands(connection):
            out.setdefault(group, []).append(line.split(" ", 1)[0].split(":", 1)[0].upper())
        return [out[g] for g in sorted(out)]

    def _serve(self, conn: socket.socket, number: int) -> None:
        replies = 0
        pending: list[tuple[int, bytes]] = []
        buffer = b""

        eof = False

        def take(data: bytes) -> None:
            nonlocal buffer
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            pending.extend((replies, line + b"\n") for line in complete)

        def reply(text: str) -> None:
            # First take in what has arrived: it came before this reply.
            nonlocal replies, eof
            conn.setblocking(False)
            try:
                while not eof:
                    data = conn.recv(65536)
                    eof = not data
                    take(data)
            except BlockingIOError:
                pass
            finally:
                conn.setblocking(True)
            conn.sendall(text.encode() + b"\r\n")
            replies += 1

        def next_line() -> tuple[int, bytes] | None:
            while not pending:
                data = b"" if eof else conn.recv(65536)
                if not data:
                    return None
                take(data)
            return pending.pop(0)

        def scripted(command: str, default: str) -> str:
            with self.lock:
                self.counts[command] = self.counts.get(command, 0) + 1
                return self.script.get((command, self.counts[command]), default)

        try:
            if self.endless_greeting:
                while not self.stopped.is_set():
                    conn.sendall(b"220-still greeting\r\n")
                    time.sleep(0.5)
                return
            reply("220 scripted ESMTP")
            mail_from, rcpts = None, []
            while True:
                item = next_line()
                if item is None:
                    return
                group, raw = item
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                with self.lock:
                    self.lines.append((number, group, line))
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    mail_from, rcpts = None, []
                    extensions = ["SIZE 100000000", "8BITMIME"]
                    if self.pipelining:
                        extensions.append("PIPELINING")
                    if verb == "EHLO":
                        for ext in ["scripted", *extensions[:-1]]:
                            conn.sendall(f"250-{ext}\r\n".encode())
                        reply(f"250 {extensions[-1]}")
                    else:
                        reply("250 scripted")
                    continue
                if verb == "QUIT":
                    reply("221 bye")
                    return
                if verb == "NOOP":
                    reply("250 OK")
                    continue
                if verb == "RSET":
                    mail_from, rcpts = None, []
                    answer = scripted("RSET", "250 OK")
                elif verb == "MAIL":
                    answer = scripted("MAIL", "250 OK")
                    if answer.startswith("250"):
                        mail_from = line.split(":", 1)[1].split(">", 1)[0].strip(" <")
                elif verb == "RCPT":
                    address = line.split(":", 1)[1].split(">", 1)[0].strip(" <")
                    default = self.refuse.get(address, "250 OK")
                    if mail_from is None:
                        default = "503 5.5.1 need MAIL"
                    answer = scripted("RCPT", default)
                    if answer.startswith("250"):
                        rcpts.append(address)
                elif verb == "DATA":
                    default = "354 go ahead" if rcpts else "554 5.5.1 no valid recipients"
                    if mail_from is None:
                        default = "503 5.5.1 need MAIL"
                    answer = scripted("DATA", default)
                    if answer.startswith("354"):
                        reply(answer)
                        content = []
                        while True:
                            item = next_line()
                            if item is None:
                                return
                            group, raw = item
                            if raw in (b".\r\n", b".\n"):
                                break
                            content.append(raw[1:] if raw.startswith(b".") else raw)
                        with self.lock:
                            self.lines.append((number, group, "."))
                        if self.end_delay:
                            time.sleep(self.end_delay)
                        answer = scripted(".", "250 2.0.0 queued")
                        if answer.startswith("250") and rcpts:
                            with self.lock:
                                self.messages.append(
                                    {"from": mail_from, "to": rcpts, "data": b"".join(content)}
                                )
                        mail_from, rcpts = None, []
                else:
                    answer = "500 5.5.2 unknown command"
                if answer == "CLOSE":
                    return
                reply(answer)
                if answer.startswith("421"):
                    return
        except OSError:
            return
        finally:
            conn.close()

    def message_ids(self) -> list[str]:
        with self.lock:
            found = [email.message_from_bytes(m["data"])["Message-ID"] for m in self.messages]
        return found

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        with self.lock:
            for conn in self.open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


@pytest.fixture
def scripted_server():
    """A :class:`ScriptedServer` that offers PIPELINING."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def scripted_settings(settings, scripted_server):
    """Deliver with Django's SMTP backend to ``scripted_server`` (timeout 5 s)."""
    if HAS_MAILERS:
        settings.MAILERS = smtp_mailers(scripted_server.port, timeout=5)
        settings.MAILER_USING = "smtp"
    else:
        settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST = scripted_server.host
        settings.EMAIL_PORT = scripted_server.port
        settings.EMAIL_TIMEOUT = 5
    return settings


@pytest.fixture
def smtp_settings(settings, smtp_server):
    """Make the worker deliver to ``smtp_server`` with Django's SMTP backend.

    On Django 6.1+ through ``MAILERS`` + ``MAILER_USING`` (no deprecated
    settings involved); before, through ``MAILER_EMAIL_BACKEND`` + ``EMAIL_*``.
    """
    if HAS_MAILERS:
        settings.MAILERS = smtp_mailers(smtp_server.port)
        settings.MAILER_USING = "smtp"
    else:
        settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST = smtp_server.host
        settings.EMAIL_PORT = smtp_server.port
        settings.EMAIL_TIMEOUT = 10
    return settings


@pytest.fixture
def smtp_down(smtp_settings):
    """As ``smtp_settings``, but the mail server is down: nothing listens on
    the port the worker connects to (every connection is refused).
    Returns the port."""
    port = free_port()
    if HAS_MAILERS:
        smtp_settings.MAILERS = smtp_mailers(port)
    else:
        smtp_settings.EMAIL_PORT = port
    return port


@pytest.fixture(autouse=True)
def _lock_in_tmp(settings, tmp_path):
    """Every test gets its own lock file (never the working directory's)."""
    settings.MAILER_LOCK_PATH = str(tmp_path / "send_mail")


# --- subprocesses -------------------------------------------------------------------


@dataclass
class Manage:
    """Run ``manage.py``-style commands in a subprocess on the test database."""

    env: dict

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "django", *args, "--settings=tests.settings"]

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.command(*args), cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        script = "import django; django.setup()\n" + code
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env={**self.env,
            "DJANGO_SETTINGS_MODULE": "tests.settings"}, capture_output=True, text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture
def manage(transactional_db, tmp_path, smtp_server):
    """A subprocess runner sharing this test's database, lock dir and SMTP server."""
    env = dict(os.environ)
    env.update(
        MAILER_TEST_DB_NAME=str(connection.settings_dict["NAME"]),
        MAILER_TEST_SMTP_PORT=str(smtp_server.port),
        MAILER_TEST_LOCK_PATH=str(tmp_path / "send_mail"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return Manage(env=env)


# --- routes: several providers ----------------------------------------------------------

SMTP = "django.core.mail.backends.smtp.EmailBackend"


def _smtp(server, timeout=10):
    return {"BACKEND": SMTP, "OPTIONS": {"host": "127.0.0.1", "port": server.port, "timeout": timeout}}


def configure(settings, smtp_server, ses_server, *, ses_timeout=10, routes=None):
    """Two providers (tests/test_routes.py, tests/test_quotas.py): unrouted and "smtp" mail to ``smtp_server``, "ses"
    (and the "bulk" queue alias on 6.1) to ``ses_server``."""
    if HAS_MAILERS:
        settings.MAILERS = {
            "default": {"BACKEND": "mailer.backend.DbBackend", "OPTIONS": {"using": "smtp"}},
            "bulk": {
                "BACKEND": "mailer.backend.DbBackend",
                "OPTIONS": {"using": "ses", "priority": PRIORITY_LOW},
            },
            "smtp": _smtp(smtp_server),
            "ses": _smtp(ses_server, ses_timeout),
        }
        settings.MAILER_ROUTES = routes or {}
    else:
        settings.MAILER_EMAIL_BACKEND = SMTP
        settings.EMAIL_HOST = "127.0.0.1"
        settings.EMAIL_PORT = smtp_server.port
        settings.EMAIL_TIMEOUT = 10
        settings.MAILER_ROUTES = {"smtp": _smtp(smtp_server), "ses": _smtp(ses_server, ses_timeout)}
        for name, extra in (routes or {}).items():
            settings.MAILER_ROUTES[name] = {**settings.MAILER_ROUTES[name], **extra}


@pytest.fixture
def two_providers(settings, smtp_server, second_smtp_server):
    configure(settings, smtp_server, second_smtp_server)
    return smtp_server, second_smtp_server



# --- stored attachments ----------------------------------------------------------------


@pytest.fixture
def attachment_storage(settings, tmp_path):
    """MAILER_ATTACHMENT_STORAGE: a real FileSystemStorage in a temporary
    directory, threshold 1 KiB. Returns the storage."""
    from django.core.files.storage import storages

    settings.STORAGES = {
        **settings.STORAGES,
        "mailer": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "attachments")},
        },
    }
    settings.MAILER_ATTACHMENT_STORAGE = "mailer"
    settings.MAILER_ATTACHMENT_INLINE_MAX = 1024
    return storages["mailer"]
