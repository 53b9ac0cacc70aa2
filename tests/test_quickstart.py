"""README and docs/installation.rst followed literally, in a brand-new project.

``django-admin startproject`` of the Django under test (on 6.1 its settings
already have ``MAILERS = {"default": console}``), then only the steps the
docs give: add ``"mailer"``, ``migrate``, queue, run the worker. No
``LOGGING``, no setting the docs don't mention.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailer.compat import HAS_MAILERS
from tests.conftest import ROOT


class Project:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.settings = path / "proj" / "settings.py"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("DJANGO_SETTINGS_MODULE", None)

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def shell(self, code: str) -> subprocess.CompletedProcess:
        return self.manage("shell", "-c", code)

    def add_settings(self, text: str) -> None:
        with self.settings.open("a") as f:
            f.write("\n" + text + "\n")


def make_project(tmp_path: Path) -> Project:
    """``startproject``, and ``"mailer"`` in INSTALLED_APPS (README step 2)."""
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "proj", str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    project = Project(tmp_path)
    settings = project.settings.read_text()
    assert "LOGGING" not in settings
    project.settings.write_text(
        settings.replace("INSTALLED_APPS = [", 'INSTALLED_APPS = [\n    "mailer",', 1)
    )
    check = project.manage("check")
    assert "no issues" in check.stdout, check.stdout + check.stderr
    return project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A new project with django-mailer installed and migrated (SQLite)."""
    project = make_project(tmp_path)
    project.manage("migrate")
    return project


QUEUE_DIRECTLY = (
    "from mailer import send_mail; "
    "print(send_mail('Your order #1001', 'Thanks!', 'shop@example.com', ['alice@example.com']))"
)


@pytest.mark.skipif(not HAS_MAILERS, reason="startproject has MAILERS from Django 6.1")
def test_new_61_project_direct_functions_need_nothing_else(project):
    """The default mailer of a new 6.1 project (console) is what the worker uses."""
    assert "MAILERS" in project.settings.read_text()
    assert project.shell(QUEUE_DIRECTLY).stdout.splitlines()[-1] == "1"
    worker = project.manage("send_mail")
    assert "Subject: Your order #1001" in worker.stdout  # the console backend's output
    assert "send_mail: sent 1, deferred 0, failed 0" in worker.stdout


@pytest.mark.skipif(HAS_MAILERS, reason="Django 4.2-6.0 settings")
def test_new_project_direct_functions_deliver_over_smtp(project, smtp_server):
    project.add_settings(f'EMAIL_HOST = "127.0.0.1"\nEMAIL_PORT = {smtp_server.port}')
    assert project.shell(QUEUE_DIRECTLY).stdout.splitlines()[-1] == "1"
    project.manage("send_mail")
    assert smtp_server.subjects() == ["Your order #1001"]


def test_new_project_everything_through_the_queue(project, smtp_server):
    """README step 3, second route: Django's own send_mail goes to the queue."""
    if HAS_MAILERS:
        text = project.settings.read_text()
        start = text.index("MAILERS = {")
        end = text.index("\n}\n", start) + 3
        project.settings.write_text(
            text[:start]
            + f"""MAILERS = {{
    "default": {{"BACKEND": "mailer.backend.DbBackend"}},
    "smtp": {{
        "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "OPTIONS": {{"host": "127.0.0.1", "port": {smtp_server.port}}},
    }},
}}
"""
            + text[end:]
        )
    else:
        project.add_settings(
            'EMAIL_BACKEND = "mailer.backend.DbBackend"\n'
            f'EMAIL_HOST = "127.0.0.1"\nEMAIL_PORT = {smtp_server.port}'
        )
    assert "no issues" in project.manage("check").stdout
    project.shell(
        "from django.core.mail import send_mail; "
        "send_mail('Welcome', 'Hi', 'shop@example.com', ['bob@example.com'])"
    )
    assert smtp_server.subjects() == []  # queued, not sent
    project.manage("send_mail")
    assert smtp_server.subjects() == ["Welcome"]


@pytest.mark.postgres
def test_new_project_on_postgresql_with_runmailer_pg(tmp_path, smtp_server, django_db_blocker):
    """Installation on PostgreSQL as the docs give it, then the notify-driven worker.

    Its own database (created and dropped here), the driver the test run
    uses, no LOGGING: ``runmailer_pg`` must show what it does on stderr.
    """
    import signal
    import time
    import uuid

    from django.db import connection

    name = f"mailer_quickstart_{uuid.uuid4().hex[:8]}"
    params = connection.settings_dict
    with django_db_blocker.unblock(), connection._nodb_cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        project = make_project(tmp_path)
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "HOST": params["HOST"],
            "PORT": params["PORT"],
            "USER": params["USER"],
            "PASSWORD": params["PASSWORD"],
        }
        project.add_settings(f"DATABASES = {{'default': {database!r}}}")
        if HAS_MAILERS:
            project.add_settings(
                "MAILERS = {'default': {'BACKEND': 'django.core.mail.backends.smtp.EmailBackend',"
                f" 'OPTIONS': {{'host': '127.0.0.1', 'port': {smtp_server.port}}}}}}}"
            )
        else:
            project.add_settings(f'EMAIL_HOST = "127.0.0.1"\nEMAIL_PORT = {smtp_server.port}')
        assert "no issues" in project.manage("check").stdout
        project.manage("migrate")
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "runmailer_pg"],
            cwd=project.path,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = worker.stderr.readline()
                lines.append(line)
                if "Listening on channel" in line or not line:
                    break
            assert any("INFO mailer.postgres: Listening on channel" in ln for ln in lines), lines
            project.shell(QUEUE_DIRECTLY)
            smtp_server.wait_for(1)
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=30)
        finally:
            worker.kill()
        assert worker.returncode == 0, err
        assert "INFO mailer.engine: Pass done: sent 1" in err
        assert "runmailer_pg: stopped after" in out
        assert smtp_server.subjects() == ["Your order #1001"]
    finally:
        with django_db_blocker.unblock(), connection._nodb_cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
