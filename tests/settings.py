"""Settings for the test suite (and for subprocess workers started by it).

The database comes from the environment:

* ``MAILER_TEST_DB``: ``sqlite`` (default), ``postgres`` or ``mysql``
  (MariaDB or MySQL; ``mariadb`` is the same).
* ``MAILER_TEST_PG_HOST``/``PORT``/``USER``/``PASSWORD`` (default
  127.0.0.1:5432, user postgres, trust auth).
* ``MAILER_TEST_MYSQL_HOST``/``PORT``/``USER``/``PASSWORD`` (default
  127.0.0.1:3306, user root, no password). The test database is created by
  the test run itself, in utf8mb4, with the options a site should use
  (docs/installation.rst); ``MAILER_TEST_MYSQL_ISOLATION`` overrides the
  isolation level (default "read committed").
* ``MAILER_TEST_PG_PREPARED=1``: PostgreSQL with psycopg 3's server-side
  binding and prepared statements (``server_side_binding``,
  ``prepare_threshold`` in ``OPTIONS``).
* ``MAILER_TEST_DB_NAME``: set for subprocesses so they use the database of
  the test run that started them.
"""

import os
import tempfile
from importlib.util import find_spec as _find_spec

import django as _django

DB = os.environ.get("MAILER_TEST_DB", "sqlite")
if DB == "mariadb":
    DB = "mysql"
NAME_OVERRIDE = os.environ.get("MAILER_TEST_DB_NAME")

if DB == "postgres":
    default = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": NAME_OVERRIDE or "postgres",
        "HOST": os.environ.get("MAILER_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("MAILER_TEST_PG_PORT", "5432"),
        "USER": os.environ.get("MAILER_TEST_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("MAILER_TEST_PG_PASSWORD", ""),
        "TEST": {"NAME": f"test_mailer_{os.getpid()}" if not NAME_OVERRIDE else NAME_OVERRIDE},
    }
    if os.environ.get("MAILER_TEST_PG_PREPARED") == "1":
        # psycopg 3's server-side binding and prepared statements, as
        # docs/performance.rst suggests for sites that can use them.
        default["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 1}
elif DB == "mysql":
    default = {
        "ENGINE": "django.db.backends.mysql",
        # Before the test database exists: the server's own schema, always
        # there (as "postgres" above). Tests run in TEST["NAME"].
        "NAME": NAME_OVERRIDE or "mysql",
        "HOST": os.environ.get("MAILER_TEST_MYSQL_HOST", "127.0.0.1"),
        "PORT": os.environ.get("MAILER_TEST_MYSQL_PORT", "3306"),
        "USER": os.environ.get("MAILER_TEST_MYSQL_USER", "root"),
        "PASSWORD": os.environ.get("MAILER_TEST_MYSQL_PASSWORD", ""),
        # What docs/installation.rst asks of a site (Django 4.2's default
        # charset is still utf8mb3; read committed is Django's default).
        "OPTIONS": {
            "charset": "utf8mb4",
            "isolation_level": os.environ.get("MAILER_TEST_MYSQL_ISOLATION", "read committed"),
        },
        "TEST": {
            "NAME": f"test_mailer_{os.getpid()}" if not NAME_OVERRIDE else NAME_OVERRIDE,
            "CHARSET": "utf8mb4",
            "COLLATION": "utf8mb4_unicode_ci",
        },
    }
else:
    # A file, not :memory:, so that subprocess workers can share it.
    path = NAME_OVERRIDE or os.path.join(
        tempfile.gettempdir(), f"mailer-test-{os.getpid()}.sqlite3"
    )
    default = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        "TEST": {"NAME": path},
        "OPTIONS": {"timeout": 20},
    }

DATABASES = {"default": default}

SECRET_KEY = "tests-only-not-secret"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",  # the admin's CSS for the browser tests (live_server)
    "mailer",
]
# Django's tasks framework (mailer.tasks, tests/test_tasks.py): core from
# Django 6.0, the django-tasks backport before; django-tasks-db's database
# backend and its db_worker when installed (tox.ini installs them).
HAS_TASKS_FRAMEWORK = _django.VERSION >= (6, 0) or _find_spec("django_tasks") is not None
HAS_TASKS_DB = HAS_TASKS_FRAMEWORK and _find_spec("django_tasks_db") is not None
# django-tasks-db 0.12 (the last for Django 4.2) can't migrate on MariaDB
# ("Key 'django_task_new_ordering_idx' doesn't exist"): its tests need
# Django 5.2+ there. The issue asks for SQLite and PostgreSQL.
TASKS_DB_UNSUPPORTED = (
    "django-tasks-db 0.12 (Django 4.2) can't migrate on MariaDB"
    if HAS_TASKS_DB and DB == "mysql" and _django.VERSION < (5, 2)
    else None
)
if TASKS_DB_UNSUPPORTED:
    HAS_TASKS_DB = False
if HAS_TASKS_DB:
    if _django.VERSION < (6, 0):
        INSTALLED_APPS.append("django_tasks")
    INSTALLED_APPS.append("django_tasks_db")
_TASKS_PREFIX = "django.tasks" if _django.VERSION >= (6, 0) else "django_tasks"
if HAS_TASKS_FRAMEWORK:
    TASKS = {
        "default": {"BACKEND": f"{_TASKS_PREFIX}.backends.dummy.DummyBackend"},
    }
    if HAS_TASKS_DB:
        TASKS["mail"] = {"BACKEND": "django_tasks_db.DatabaseBackend"}
# Subprocess workers (db_worker) enqueue successors on the database backend.
if os.environ.get("MAILER_TEST_TASK_BACKEND"):
    MAILER_TASK_BACKEND = os.environ["MAILER_TEST_TASK_BACKEND"]
STATIC_URL = "/static/"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ADMINS = [("Ada Admin", "ada@example.com")]
MANAGERS = ["manager@example.com"]
SERVER_EMAIL = "server@example.com"
DEFAULT_FROM_EMAIL = "from@example.com"
# Bounded SMTP waits (mailer.W002 warns without one); subprocess workers
# take theirs from MAILER_TEST_EMAIL_TIMEOUT. Django 6.1 deprecates EMAIL_*
# settings: there the timeout goes in a MAILERS entry's OPTIONS.
_EMAIL_TIMEOUT = float(os.environ.get("MAILER_TEST_EMAIL_TIMEOUT") or 10)
if _django.VERSION < (6, 1):
    EMAIL_TIMEOUT = _EMAIL_TIMEOUT


def smtp_mailers(port, timeout=10):
    """Django 6.1 MAILERS: queue by default, deliver through "smtp"."""
    return {
        "default": {"BACKEND": "mailer.backend.DbBackend"},
        "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": port, "timeout": timeout},
        },
    }


# Subprocess workers deliver to the test SMTP server named in the environment.
if os.environ.get("MAILER_TEST_SMTP_PORT"):
    import django

    if django.VERSION >= (6, 1):
        MAILERS = smtp_mailers(int(os.environ["MAILER_TEST_SMTP_PORT"]), _EMAIL_TIMEOUT)
        MAILER_USING = "smtp"
    else:
        MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        EMAIL_HOST = "127.0.0.1"
        EMAIL_PORT = int(os.environ["MAILER_TEST_SMTP_PORT"])
# Subprocess workers whose unrouted mail has a quota (mailer.quotas).
if os.environ.get("MAILER_TEST_RATE"):
    import django

    _rated = "smtp" if django.VERSION >= (6, 1) else "default"
    MAILER_ROUTES = {_rated: {"RATE": os.environ["MAILER_TEST_RATE"].split(",")}}
if os.environ.get("MAILER_TEST_LOCK_PATH"):
    MAILER_LOCK_PATH = os.environ["MAILER_TEST_LOCK_PATH"]
for _name in ("EMPTY_QUEUE_SLEEP", "EMAIL_THROTTLE", "RETRY_DELAY"):
    if os.environ.get(f"MAILER_TEST_{_name}"):
        globals()[f"MAILER_{_name}"] = float(os.environ[f"MAILER_TEST_{_name}"])
if os.environ.get("MAILER_TEST_AUTO_RETRY"):
    MAILER_AUTO_RETRY = True
if os.environ.get("MAILER_TEST_NO_FILE_LOCK"):
    MAILER_USE_FILE_LOCK = False
# Subprocess workers with persistent connections ("none": for ever, or seconds).
if os.environ.get("MAILER_TEST_CONN_MAX_AGE"):
    _age = os.environ["MAILER_TEST_CONN_MAX_AGE"]
    DATABASES["default"]["CONN_MAX_AGE"] = None if _age == "none" else float(_age)

# MAILER_TEST_NO_LOGGING=1: no LOGGING at all, as in a new project (the
# commands must then show their work on stderr by themselves).
if not os.environ.get("MAILER_TEST_NO_LOGGING"):
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {
            "mailer": {"handlers": ["console"], "level": "INFO"},
            # Not Django's default mail_admins handler: rendering a technical
            # 500 report of a test's frames takes minutes on Django 6.1.
            "django": {"handlers": ["console"], "level": "INFO"},
        },
    }

# MAILER_TEST_READ_PICKLE=0: pickle reading off (a site after mailer_convert).
if os.environ.get("MAILER_TEST_READ_PICKLE") == "0":
    MAILER_READ_PICKLE = False
