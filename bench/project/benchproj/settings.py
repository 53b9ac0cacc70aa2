"""Settings of the benchmark's minimal Django project.

Everything that varies between scenario runs comes from environment
variables set by bench/worker.py (and inherited by the ``manage.py``
subprocesses it starts):

BENCH_DB                  "sqlite" (default) or "postgres"
BENCH_SQLITE_PATH         SQLite database file (sqlite)
BENCH_SQLITE_WAL          "1": SQLite in WAL mode (default: Django's default,
                          rollback journal)
BENCH_PG_NAME             database name (postgres; default mailer_bench)
BENCH_PG_HOST/PORT/USER   PostgreSQL server (default 127.0.0.1:5432, postgres,
                          trust auth, BENCH_PG_PASSWORD if needed)
BENCH_SMTP_PORT           port of the SMTP sink on 127.0.0.1
BENCH_MAILER_BACKEND      "smtp" (default) or "dummy"
BENCH_USE_FILE_LOCK       "1" (default) or "0"  -> MAILER_USE_FILE_LOCK
BENCH_LOCK_PATH           -> MAILER_LOCK_PATH
BENCH_EMPTY_QUEUE_SLEEP   -> MAILER_EMPTY_QUEUE_SLEEP (seconds, default 30)
BENCH_ATTACHMENT_DIR      a directory: MAILER_ATTACHMENT_STORAGE = a
                          FileSystemStorage there (attachments scenario)
BENCH_APP                 "mailer" (default) or "post_office": the provider
                          scenario also runs django-post_office, in its own
                          venv, with this same project
BENCH_PO_THREADS          post_office: THREADS_PER_PROCESS (default 10)
BENCH_PO_BATCH            post_office: BATCH_SIZE (default 100, its default)
BENCH_SMTP_PIPELINING     "0": MAILER_SMTP_PIPELINING = False (latency scenario)
BENCH_ROUTES              JSON {route: SMTP sink port}: MAILER_ROUTES, each
                          route Django's SMTP backend to its sink (routes)
BENCH_ROUTE_RATES         JSON {route: RATE}: that route's "RATE" in
                          MAILER_ROUTES, e.g. "20/s" (quota)
"""

import os

SECRET_KEY = "bench-not-secret"
DEBUG = False  # DEBUG=True would make Django keep every query in memory
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
_app = os.environ.get("BENCH_APP", "mailer")
INSTALLED_APPS = [_app]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_db = os.environ.get("BENCH_DB", "sqlite")
if _db == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("BENCH_PG_NAME", "mailer_bench"),
            "HOST": os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("BENCH_PG_PORT", "5432"),
            "USER": os.environ.get("BENCH_PG_USER", "postgres"),
            "PASSWORD": os.environ.get("BENCH_PG_PASSWORD", ""),
        }
    }
elif _db == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("BENCH_SQLITE_PATH", "/tmp/mailer_bench.sqlite3"),
            "OPTIONS": {"timeout": 60},
        }
    }
    if os.environ.get("BENCH_SQLITE_WAL") == "1":
        # As docs/deployment.rst recommends (Django 5.1+: init_command).
        DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL;"
else:
    raise RuntimeError("BENCH_DB must be sqlite or postgres, not %r" % _db)

# Application code enqueues through django.core.mail -> DbBackend.
EMAIL_BACKEND = "mailer.backend.DbBackend"
if _app == "post_office":
    # Its queue backend; send_queued_mail delivers through POST_OFFICE's
    # BACKENDS, Django's SMTP backend to the sink (EMAIL_HOST/PORT below).
    EMAIL_BACKEND = "post_office.EmailBackend"
    # post_office renders every subject and body as a template.
    TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
    POST_OFFICE = {
        "BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"},
        "THREADS_PER_PROCESS": int(os.environ.get("BENCH_PO_THREADS", "10")),
        "BATCH_SIZE": int(os.environ.get("BENCH_PO_BATCH", "100")),
        "LOG_LEVEL": 2,  # its default: a log row per message sent
        "MESSAGE_ID_ENABLED": False,  # keep the bench's preset Message-ID header
    }

_backend = os.environ.get("BENCH_MAILER_BACKEND", "smtp")
MAILER_EMAIL_BACKEND = {
    "smtp": "django.core.mail.backends.smtp.EmailBackend",
    "dummy": "django.core.mail.backends.dummy.EmailBackend",
}[_backend]

EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))
EMAIL_USE_TLS = False
EMAIL_USE_SSL = False
EMAIL_TIMEOUT = 60

MAILER_USE_FILE_LOCK = os.environ.get("BENCH_USE_FILE_LOCK", "1") == "1"
if os.environ.get("BENCH_LOCK_PATH"):
    MAILER_LOCK_PATH = os.environ["BENCH_LOCK_PATH"]
MAILER_EMPTY_QUEUE_SLEEP = float(os.environ.get("BENCH_EMPTY_QUEUE_SLEEP", "30"))
if os.environ.get("BENCH_SMTP_PIPELINING") == "0":
    MAILER_SMTP_PIPELINING = False

if os.environ.get("BENCH_ATTACHMENT_DIR"):
    STORAGES = {
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        "mailer": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": os.environ["BENCH_ATTACHMENT_DIR"]},
        },
    }
    MAILER_ATTACHMENT_STORAGE = "mailer"

if os.environ.get("BENCH_ROUTES"):
    import json as _json

    MAILER_ROUTES = {
        name: {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": port, "timeout": 60},
        }
        for name, port in _json.loads(os.environ["BENCH_ROUTES"]).items()
    }
    for _name, _rate in _json.loads(os.environ.get("BENCH_ROUTE_RATES") or "{}").items():
        MAILER_ROUTES[_name]["RATE"] = _rate

# bench/tasks.py: Django's tasks framework with django-tasks-db's database
# backend ("mail"); BENCH_TASK_BACKEND -> MAILER_TASK_BACKEND (the db_worker
# subprocesses enqueue their successors there).
if os.environ.get("BENCH_TASKS") == "1":
    import django as _django

    if _django.VERSION < (6, 0):
        INSTALLED_APPS.append("django_tasks")
    INSTALLED_APPS.append("django_tasks_db")
    TASKS = {"mail": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
    if os.environ.get("BENCH_TASK_BACKEND"):
        MAILER_TASK_BACKEND = os.environ["BENCH_TASK_BACKEND"]
