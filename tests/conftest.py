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

    ``fail_with``: an SMTP reply (e.g. "451 try later") to give to DATA;
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
