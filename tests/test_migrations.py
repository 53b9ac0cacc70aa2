"""A database created by django-mailer 2.3.2 keeps working after the swap.

The fixtures (SQLite, PostgreSQL, MariaDB) were made once with django-mailer
2.3.2 from PyPI (see tests/fixtures/dm232/README.rst) and are committed as
data.
"""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from django.db import connection

FIXTURES = Path(__file__).parent / "fixtures" / "dm232"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())

pytestmark = pytest.mark.slow


@pytest.fixture
def old_database(manage, tmp_path):
    """A copy of the 2.3.2 database; ``manage`` runs commands against it."""
    vendor = connection.vendor
    if vendor == "sqlite":
        path = tmp_path / "mailer232.sqlite3"
        shutil.copy(FIXTURES / "mailer232.sqlite3", path)
        manage.env["MAILER_TEST_DB_NAME"] = str(path)
        yield manage
    elif vendor == "postgresql":
        name = f"dm232_{uuid.uuid4().hex[:8]}"
        params = connection.settings_dict
        psql = ["psql", "-h", params["HOST"], "-p", str(params["PORT"]), "-U", params["USER"]]
        env = {**os.environ, "PGPASSWORD": params["PASSWORD"] or ""}
        subprocess.run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'], check=True,
                       env=env, capture_output=True)
        try:
            subprocess.run(
                [*psql, "-d", name, "-v", "ON_ERROR_STOP=1", "-q", "-f",
                 str(FIXTURES / "mailer232_postgres.sql")],
                check=True, env=env, capture_output=True,
            )
            manage.env["MAILER_TEST_DB_NAME"] = name
            yield manage
        finally:
            subprocess.run([*psql, "-d", "postgres", "-c", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                           env=env, capture_output=True)
    elif vendor == "mysql":
        name = f"dm232_{uuid.uuid4().hex[:8]}"
        params = connection.settings_dict
        client = shutil.which("mariadb") or shutil.which("mysql")
        assert client, "the mariadb (or mysql) client loads the 2.3.2 dump: install it"
        command = [client, "-h", params["HOST"] or "127.0.0.1", "-P", str(params["PORT"] or 3306),
                   "-u", params["USER"], "--default-character-set=utf8mb4", name]
        env = {**os.environ, "MYSQL_PWD": params["PASSWORD"] or ""}
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        try:
            with open(FIXTURES / "mailer232_mysql.sql", "rb") as dump:
                subprocess.run(command, stdin=dump, check=True, env=env, capture_output=True)
            manage.env["MAILER_TEST_DB_NAME"] = name
            yield manage
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    else:  # pragma: no cover
        pytest.skip(f"no 2.3.2 fixture for {vendor}")


def test_only_our_additive_migrations_are_pending(old_database):
    plan = old_database.run("showmigrations", "mailer").stdout
    applied = [line.strip()[4:] for line in plan.splitlines() if line.strip().startswith("[X]")]
    pending = [line.strip()[4:] for line in plan.splitlines() if line.strip().startswith("[ ]")]
    assert applied == [
        "0001_initial",
        "0002_auto_20150720_1433",
        "0003_messagelog_message_id",
        "0004_auto_20190920_1512",
        "0005_id_bigautofield",
        "0006_message_retry_count",
        "0007_alter_messagelog_message_data",
    ]
    assert pending == [
        "0008_search_fields_and_sending_index",
        "0009_attachment_bundle",
        "0010_message_not_before",
        "0011_message_id_and_outcome_indexes",
        "0012_route",
        "0013_routequota",
    ]


def test_migrate_keeps_rows_and_fills_search_fields(old_database):
    old_database.run("migrate", "-v", "0")
    old_database.run("makemigrations", "--check", "--dry-run", "mailer")
    out = old_database.python(
        "import json\n"
        "from mailer.models import Message, MessageLog, DontSendEntry\n"
        "rows = [dict(id=m.pk, priority=m.priority, retry_count=m.retry_count, subject=m.subject,\n"
        "             to=m.to_addresses, recipients=m.recipients, subject_text=m.subject_text,\n"
        "             message_id=m.message_id, body=m.email.body, route=m.route,\n"
        "             alternatives=[list(a) for a in getattr(m.email, 'alternatives', [])],\n"
        "             attachments=[a[0] for a in m.email.attachments])\n"
        "        for m in Message.objects.order_by('id')]\n"
        "logs = [dict(id=l.pk, result=l.result, message_id=l.message_id, has_data=l.message_data is not None)\n"
        "        for l in MessageLog.objects.order_by('id')]\n"
        "print(json.dumps(dict(rows=rows, logs=logs, dont_send=DontSendEntry.objects.count())))\n"
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    expected = {m["id"]: m for m in EXPECTED["messages"]}
    assert [r["id"] for r in data["rows"]] == sorted(expected)
    for row in data["rows"]:
        want = expected[row["id"]]
        assert row["priority"] == want["priority"]
        assert row["retry_count"] == want["retry_count"]
        assert row["subject"] == want["subject"] == row["subject_text"]
        assert row["to"] == want["to"]
        assert row["body"] == want["body"]
        assert row["attachments"] == want["attachment_names"]
        assert [a[0] for a in row["alternatives"]] == [a["content"] for a in want["alternatives"]]
        assert set(want["to"]) <= set(row["recipients"].splitlines())
        assert row["message_id"] == want["message_id"]
        assert row["route"] is None  # 2.3.2's rows: delivered as before
    want_logs = EXPECTED["message_logs"]
    assert [(lg["id"], lg["result"], lg["message_id"], lg["has_data"]) for lg in data["logs"]] == [
        (w["id"], w["result"], w["message_id"], not w["message_data_is_null"]) for w in want_logs
    ]
    assert data["dont_send"] == len(EXPECTED["dont_send_entries"])


PICKLES = Path(__file__).parent / "fixtures" / "pickles" / "django42"
DBBACKEND = json.loads((PICKLES / "manifest.json").read_text())["files"]["dbbackend"]


@pytest.mark.parametrize("convert", [False, True], ids=["as-stored", "after-mailer_convert"])
def test_old_queue_is_delivered(old_database, smtp_server, convert):
    old_database.run("migrate", "-v", "0")
    # 2.3.2's stored form of EmailMessage.send() through DbBackend (the backend in the
    # pickle), with alternatives and attachments: the fixture database has none.
    old_database.python(
        "from pathlib import Path\n"
        "from mailer.models import Message\n"
        f"data = Path({str(PICKLES / DBBACKEND['file'])!r}).read_text()\n"
        "Message.objects.bulk_create([Message(message_data=data, priority=2)])\n"
    )
    if convert:
        out = old_database.run("mailer_convert").stdout
        assert "no pickled rows left" in out
        old_database.env["MAILER_TEST_READ_PICKLE"] = "0"
    queued = [m for m in EXPECTED["messages"] if m["priority"] != 4] + [
        {**DBBACKEND, "priority": 2, "has_html": True}
    ]
    out = old_database.run("send_mail").stdout
    assert f"sent {len(queued)}" in out
    arrived = smtp_server.wait_for(len(queued))
    assert sorted(m["message"]["Subject"] for m in arrived) == sorted(m["subject"] for m in queued)
    # Sending order: high, then medium, then low (oldest first within one).
    subjects = [m["message"]["Subject"] for m in arrived]
    assert subjects[0] == next(m["subject"] for m in queued if m["priority"] == 1)
    assert subjects[-1] == next(m["subject"] for m in queued if m["priority"] == 3)
    by_subject = {m["message"]["Subject"]: m["message"] for m in arrived}
    for want in queued:
        got = by_subject[want["subject"]]
        if want["message_id"]:
            assert got["Message-ID"] == want["message_id"]
        else:
            assert got["Message-ID"]  # derived from the row
        if want["has_html"]:
            html = want["alternatives"][0]
            html = html["content"] if isinstance(html, dict) else html[0]
            assert got.get_body(("html",)).get_content().strip() == html.strip()
        if want is queued[-1]:
            names = [a["filename"] for a in want["attachments"]]
            assert [p.get_filename() for p in got.iter_attachments()] == names
    # The deferred one comes back with retry_deferred.
    old_database.run("retry_deferred")
    old_database.run("send_mail")
    smtp_server.wait_for(len(queued) + 1)
