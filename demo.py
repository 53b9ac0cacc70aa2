#!/usr/bin/env python3
"""A self-contained tour of django-mailer, and a smoke test of this checkout.

    python3 demo.py

Stage 1 (any Python >= 3.11, standard library only): create
``.venv-demo-3.X`` (one per Python version) next to this file if needed and install this checkout (editable) plus
aiosmtpd into it, then run this same file again with the venv's Python.

Stage 2 (inside the venv): configure Django in-process with a SQLite file in a
temporary directory, start a throw-away SMTP server on a free loopback port,
queue a few messages in different ways (one of them in a transaction that is
rolled back), run the ``send_mail`` management command, and show what the SMTP
server received and what the message log says.

The demo checks itself: it exits with status 1 if what arrived differs from
what was queued, so it doubles as an end-to-end test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
# One per Python version: the newest Django that version gets decides the path
# shown (Django 6.1's MAILERS needs Python 3.12+; 3.11 gets Django 5.2).
VENV_DIR = os.path.join(HERE, f".venv-demo-{sys.version_info[0]}.{sys.version_info[1]}")
VENV_NAME = os.path.basename(VENV_DIR)
STAGE_FLAG = "MAILER_DEMO_IN_VENV"


# --- stage 1: the virtual environment -------------------------------------------------


def venv_python() -> str:
    if os.name == "nt":
        return os.path.join(VENV_DIR, "Scripts", "python.exe")
    return os.path.join(VENV_DIR, "bin", "python")


# Prints the directory the installed ``mailer`` package comes from; fails if
# Django, aiosmtpd or mailer are missing.
PROBE = "import aiosmtpd, django, mailer, os; print(os.path.dirname(os.path.dirname(os.path.abspath(mailer.__file__))))"


def venv_is_ready(python: str) -> bool:
    if not os.path.exists(python):
        return False
    # -I: ignore the working directory and PYTHONPATH, see only what is installed.
    probe = subprocess.run([python, "-I", "-c", PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        return False
    # An editable install of another checkout (e.g. a copied venv) is not ours.
    return os.path.realpath(probe.stdout.strip()) == os.path.realpath(HERE)


def prepare_venv() -> str:
    python = venv_python()
    if venv_is_ready(python):
        return python
    if not os.path.exists(python):
        print(f"Creating {VENV_DIR} (first run only) ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV_DIR)
    print(
        f"Installing this checkout (pip install -e .) and aiosmtpd into {VENV_NAME} ...",
        flush=True,
    )
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "-e", HERE, "aiosmtpd"], check=True)
    if not venv_is_ready(python):
        sys.exit(f"demo: {VENV_NAME} was set up but can't import django, aiosmtpd and mailer.")
    return python


def stage_one() -> int:
    if sys.version_info < (3, 11):  # run by whatever python3 is on PATH
        sys.exit("demo: needs Python 3.11 or newer.")
    try:
        python = prepare_venv()
    except subprocess.CalledProcessError as err:
        print(f"demo: installing into {VENV_NAME} failed ({err}).", file=sys.stderr)
        return 1
    env = dict(os.environ, **{STAGE_FLAG: "1"})
    return subprocess.run([python, os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode


# --- stage 2: the demo ----------------------------------------------------------------

SENDER = "Demo Shop <shop@example.com>"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Inbox:
    """An aiosmtpd handler that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list = []

    # aiosmtpd calls this hook by this exact name.
    async def handle_DATA(self, server, session, envelope):
        import email
        import email.policy

        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 OK: queued by the demo inbox"


def configure_django(tmpdir: str, port: int) -> None:
    import django
    from django.conf import settings

    options: dict = {}
    if django.VERSION >= (6, 1):
        # Django 6.1: MAILERS. "default" queues, the worker delivers through
        # the alias named by MAILER_USING.
        options["MAILERS"] = {
            "default": {"BACKEND": "mailer.backend.DbBackend"},
            "smtp": {
                "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
                "OPTIONS": {"host": "127.0.0.1", "port": port, "timeout": 10},
            },
        }
        options["MAILER_USING"] = "smtp"
    else:
        # Django < 6.1: EMAIL_BACKEND queues, MAILER_EMAIL_BACKEND delivers.
        options["EMAIL_BACKEND"] = "mailer.backend.DbBackend"
        options["MAILER_EMAIL_BACKEND"] = "django.core.mail.backends.smtp.EmailBackend"
        options["EMAIL_HOST"] = "127.0.0.1"
        options["EMAIL_PORT"] = port
        options["EMAIL_TIMEOUT"] = 10
    settings.configure(
        DEBUG=False,
        SECRET_KEY="demo-only",
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.path.join(tmpdir, "demo.sqlite3"),
            }
        },
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "mailer"],
        DEFAULT_FROM_EMAIL=SENDER,
        # Keep the send_mail lock file out of the working directory.
        MAILER_LOCK_PATH=os.path.join(tmpdir, "send_mail"),
        LOGGING={"version": 1, "disable_existing_loggers": False},
        **options,
    )
    django.setup()


def heading(text: str) -> None:
    print()
    print(text)
    print("-" * len(text))


def queue_messages() -> dict[str, dict]:
    """Queue the demo's messages; return what should arrive, by subject."""
    from django.core import mail as django_mail
    from django.db import transaction

    import mailer
    from mailer.models import PRIORITY_HIGH, PRIORITY_LOW, DontSendEntry

    expected: dict[str, dict] = {}

    mailer.send_mail(
        "Your order #1001",
        "Thanks for your order. It ships tomorrow.",
        SENDER,
        ["alice@example.com"],
    )
    expected["Your order #1001"] = {"to": ["alice@example.com"], "html": False}
    print('mailer.send_mail(...)                    -> "Your order #1001" to alice')

    mailer.send_html_mail(
        "Spring newsletter",
        "New arrivals are in.",
        "<h1>New arrivals are in</h1><p>Come and see.</p>",
        SENDER,
        ["bob@example.com"],
        priority=PRIORITY_LOW,
    )
    expected["Spring newsletter"] = {"to": ["bob@example.com"], "html": True}
    print('mailer.send_html_mail(..., priority=LOW) -> "Spring newsletter" to bob')

    # Django's own API: the DbBackend (EMAIL_BACKEND, or MAILERS["default"]
    # on Django 6.1) queues instead of sending.
    django_mail.send_mail(
        "Reset your password",
        "Follow the link to choose a new password.",
        SENDER,
        ["carol@example.com"],
    )
    expected["Reset your password"] = {"to": ["carol@example.com"], "html": False}
    print('django.core.mail.send_mail(...)          -> "Reset your password" to carol')

    message = django_mail.EmailMessage(
        subject="Security alert",
        body="A new device signed in to your account.",
        from_email=SENDER,
        to=["carol@example.com"],
    )
    message.send()
    queued_id = message.extra_headers.get("Message-ID")
    expected["Security alert"] = {"to": ["carol@example.com"], "html": False, "id": queued_id}
    print('EmailMessage(...).send()                 -> "Security alert" to carol')
    print(f"    the caller's EmailMessage got its Message-ID at queue time: {queued_id}")

    mailer.send_mail(
        "Server on fire",
        "Disk full on web-1.",
        SENDER,
        ["ops@example.com"],
        priority=PRIORITY_HIGH,
    )
    expected["Server on fire"] = {"to": ["ops@example.com"], "html": False}
    print('mailer.send_mail(..., priority=HIGH)     -> "Server on fire" to ops')

    class Rollback(Exception):
        pass

    try:
        with transaction.atomic():
            mailer.send_mail(
                "Order confirmed (never sent)",
                "This order was not saved.",
                SENDER,
                ["dave@example.com"],
            )
            raise Rollback("the order could not be saved")
    except Rollback:
        pass
    print("mailer.send_mail(...) in a transaction that rolls back -> nothing queued")

    DontSendEntry.objects.create(to_address="eve@example.com")
    mailer.send_mail("Weekly digest", "Here is your digest.", SENDER, ["EVE@example.com"])
    print(
        "mailer.send_mail(...) to eve, who is on the don't-send list -> queued; "
        'logged "don\'t send" when its turn comes'
    )
    return expected


def show_queue() -> dict[str, str]:
    """Print the queue in sending order; return Message-IDs by subject."""
    from mailer.engine import prioritize
    from mailer.models import PRIORITIES

    labels = dict(PRIORITIES)
    ids: dict[str, str] = {}
    heading("The queue (mailer_message), in sending order")
    for row in prioritize():
        email = row.email
        ids[email.subject] = row.message_id
        print(
            f"  #{row.id}  {labels[row.priority]:<6}  {', '.join(email.to):<20}  "
            f"{email.subject!r:<24}  {row.message_id}"
        )
    return ids


def run_demo() -> int:
    import tempfile

    from aiosmtpd.controller import Controller

    problems: list[str] = []
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with tempfile.TemporaryDirectory(prefix="mailer-demo-") as tmpdir:
            configure_django(tmpdir, port)
            import django
            from django.core.management import call_command

            import mailer

            print(
                f"django-mailer {mailer.__version__} on Django {django.get_version()}, "
                f"Python {sys.version.split()[0]}"
            )
            print(f"SQLite database in {tmpdir}; SMTP server on 127.0.0.1:{port}")
            if django.VERSION >= (6, 1):
                print('Delivery through MAILERS["smtp"] (MAILER_USING = "smtp")')
            else:
                print("Delivery through MAILER_EMAIL_BACKEND (Django's SMTP backend)")
            call_command("migrate", verbosity=0)

            heading("Queueing (nothing is sent yet)")
            expected = queue_messages()
            queued_ids = show_queue()
            if len(inbox.messages) != 0:
                problems.append("the SMTP server received mail before send_mail ran")

            heading("python manage.py send_mail")
            call_command("send_mail")

            problems += report(inbox, expected, queued_ids)
    finally:
        controller.stop()

    print()
    if problems:
        print("DEMO FAILED:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("OK: everything queued arrived once, in priority order, with the Message-ID")
    print("it was given at queue time; the rolled-back message was never sent.")
    import django

    if django.VERSION < (6, 1):
        print()
        print(
            f"This was the Django 4.2-6.0 path (Django {django.get_version()}, the newest "
            f"for Python {sys.version_info[0]}.{sys.version_info[1]})."
        )
        print("For Django 6.1's MAILERS path run it with Python 3.12 or newer: python3.13 demo.py")
    return 0


def report(inbox: Inbox, expected: dict[str, dict], queued_ids: dict[str, str]) -> list[str]:
    from mailer.models import RESULT_CODES, Message, MessageLog

    problems: list[str] = []
    heading("What arrived at the SMTP server")
    arrived: dict[str, tuple] = {}
    for rcpt_tos, msg in inbox.messages:
        has_html = any(part.get_content_type() == "text/html" for part in msg.walk())
        print(f"  From:       {msg['From']}")
        print(f"  To:         {msg['To']}   (envelope: {', '.join(rcpt_tos)})")
        print(f"  Subject:    {msg['Subject']}")
        print(f"  Message-ID: {msg['Message-ID']}")
        print(f"  HTML part:  {'yes' if has_html else 'no'}")
        print()
        subject = str(msg["Subject"])
        if subject in arrived:
            problems.append(f"{subject!r} arrived twice")
        arrived[subject] = (rcpt_tos, msg, has_html)

    labels = dict(RESULT_CODES)
    heading("The message log (mailer_messagelog)")
    for entry in MessageLog.objects.order_by("id"):
        note = f"  ({entry.log_message})" if entry.log_message else ""
        print(
            f"  #{entry.id}  {labels[entry.result]:<10}  {entry.subject or '':<24}  "
            f"{entry.message_id}{note}"
        )

    # --- the checks ---------------------------------------------------------------
    if set(arrived) != set(expected):
        missing = sorted(set(expected) - set(arrived))
        extra = sorted(set(arrived) - set(expected))
        if missing:
            problems.append(f"queued but not received: {missing}")
        if extra:
            problems.append(f"received but not expected: {extra}")
    for subject, want in expected.items():
        if subject not in arrived:
            continue
        rcpt_tos, msg, has_html = arrived[subject]
        if sorted(rcpt_tos) != sorted(want["to"]):
            problems.append(f"{subject!r} went to {rcpt_tos}, expected {want['to']}")
        if has_html != want["html"]:
            problems.append(f"{subject!r}: HTML part {'present' if has_html else 'missing'}")
        if str(msg["From"]) != SENDER:
            problems.append(f"{subject!r}: From is {msg['From']!r}")
        msg_id = str(msg["Message-ID"] or "")
        if not msg_id or msg_id != queued_ids.get(subject):
            problems.append(f"{subject!r}: Message-ID {msg_id!r} is not the queued one")
        if "id" in want and msg_id != want["id"]:
            problems.append(f"{subject!r}: Message-ID differs from the caller's EmailMessage")
    order = [str(msg["Subject"]) for _, msg in inbox.messages]
    if order and order[0] != "Server on fire":
        problems.append(f"the high-priority message was not sent first: {order}")
    if order and order[-1] != "Spring newsletter":
        problems.append(f"the low-priority message was not sent last: {order}")
    if Message.objects.exists():
        problems.append("messages are left on the queue")
    successes = MessageLog.objects.filter(result="1").count()
    if successes != len(expected):
        problems.append(f"{successes} success entries in the log, expected {len(expected)}")
    if not MessageLog.objects.filter(result="2", subject_text="Weekly digest").exists():
        problems.append("the don't-send message was not logged as \"don't send\"")
    if any("never sent" in str(msg["Subject"]) for _, msg in inbox.messages):
        problems.append("the rolled-back message was sent")
    return problems


def main() -> int:
    if os.environ.get(STAGE_FLAG) == "1":
        return run_demo()
    return stage_one()


if __name__ == "__main__":
    sys.exit(main())
