"""System checks (mailer/checks.py)."""

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from mailer.compat import HAS_MAILERS
from mailer.engine import send_all


def mailer_errors():
    return [e.id for e in checks.run_checks(tags=["mailer"])]


def test_clean_by_default():
    assert mailer_errors() == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAILER_EMAIL_MAX_BATCH", "10"),
        ("MAILER_EMAIL_MAX_DEFERRED", -1),
        ("MAILER_EMAIL_THROTTLE", "fast"),
        ("MAILER_EMPTY_QUEUE_SLEEP", None),
        ("MAILER_LOCK_WAIT_TIMEOUT", "5"),
        ("MAILER_MESSAGES_BATCH_SIZE", 0),
        ("MAILER_EMAIL_MAX_RETRIES", True),
        ("MAILER_PURGE_BATCH_SIZE", 0),
        ("MAILER_RETRY_DELAY", "60"),
        ("MAILER_RETRY_DELAY", -1),
        ("MAILER_RETRY_DELAY_MAX", None),
        ("MAILER_RETRY_GIVE_UP_AFTER", "5 days"),
        ("MAILER_RETRY_GIVE_UP_AFTER", -1),
    ],
)
def test_bad_numbers(settings, name, value):
    setattr(settings, name, value)
    errors = checks.run_checks(tags=["mailer"])
    assert [e.id for e in errors] == ["mailer.E001"]
    assert name in errors[0].msg


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAILER_PAUSE_SEND", "no"),
        ("MAILER_USE_FILE_LOCK", "False"),
        ("MAILER_EMAIL_LOG_MESSAGE_DATA", 0),
        ("MAILER_PAUSE_SEND", None),
        ("MAILER_AUTO_RETRY", "yes"),
    ],
)
def test_booleans_accept_only_booleans(settings, name, value):
    setattr(settings, name, value)
    errors = checks.run_checks(tags=["mailer"])
    assert [e.id for e in errors] == ["mailer.E006"]
    assert name in errors[0].msg and repr(value) in errors[0].msg


def test_retry_delay_cap_below_the_first_delay(settings):
    settings.MAILER_RETRY_DELAY = 600
    settings.MAILER_RETRY_DELAY_MAX = 60
    errors = checks.run_checks(tags=["mailer"])
    assert [e.id for e in errors] == ["mailer.E011"]
    assert "MAILER_RETRY_DELAY_MAX (60)" in errors[0].msg
    settings.MAILER_RETRY_DELAY_MAX = 600
    settings.MAILER_RETRY_GIVE_UP_AFTER = None
    assert mailer_errors() == []


def test_wrong_boolean_is_refused_at_use_time_too(settings):
    """A "no" must never mean "pause" (or a "False" mean "lock") behind the check's back."""
    from mailer.engine import send_all

    settings.MAILER_PAUSE_SEND = "no"
    with pytest.raises(ImproperlyConfigured, match="MAILER_PAUSE_SEND must be True or False"):
        call_command("send_mail")
    settings.MAILER_PAUSE_SEND = False
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = "False"
    with pytest.raises(ImproperlyConfigured, match="MAILER_EMAIL_LOG_MESSAGE_DATA"):
        send_all()


def test_real_booleans_pass(settings):
    settings.MAILER_PAUSE_SEND = True
    settings.MAILER_USE_FILE_LOCK = False
    settings.MAILER_EMAIL_LOG_MESSAGE_DATA = False
    assert mailer_errors() == []


def test_none_allowed_where_documented(settings):
    settings.MAILER_EMAIL_MAX_BATCH = None
    settings.MAILER_EMAIL_MAX_RETRIES = 0
    assert mailer_errors() == []


def test_error_handler_must_import(settings):
    settings.MAILER_ERROR_HANDLER = "nowhere.handler"
    assert mailer_errors() == ["mailer.E002"]
    settings.MAILER_ERROR_HANDLER = "mailer.conf.DB_BACKEND"  # a string, not callable
    assert mailer_errors() == ["mailer.E002"]


def test_backend_loop(settings):
    settings.MAILER_EMAIL_BACKEND = "mailer.backend.DbBackend"
    if HAS_MAILERS:
        settings.MAILER_USING = None
    errors = checks.run_checks(tags=["mailer"])
    assert [e.id for e in errors] == ["mailer.E003"]


def test_sending_backend_must_import(settings):
    settings.MAILER_EMAIL_BACKEND = "no.such.Backend"
    assert mailer_errors() == ["mailer.E005"]


@pytest.mark.skipif(not HAS_MAILERS, reason="MAILERS is Django 6.1+")
class TestMailers:
    DB = {"BACKEND": "mailer.backend.DbBackend"}
    SMTP = {"BACKEND": "django.core.mail.backends.smtp.EmailBackend"}
    CONSOLE = {"BACKEND": "django.core.mail.backends.console.EmailBackend"}

    def test_a_new_projects_default_mailer_needs_nothing_else(self, settings):
        """Django 6.1's startproject: MAILERS = {"default": console}; add "mailer", done."""
        from mailer.compat import sending_backend_path

        settings.MAILERS = {"default": self.CONSOLE}
        assert mailer_errors() == []
        assert sending_backend_path() == self.CONSOLE["BACKEND"]

    def test_default_is_not_the_queue_delivers_through_it(self, settings):
        settings.MAILERS = {"default": self.SMTP, "bulk": self.DB}
        assert mailer_errors() == []

    def test_queue_by_default_and_one_real_mailer_needs_no_using(self, settings):
        from mailer.compat import delivery_alias

        settings.MAILERS = {"default": self.DB, "smtp": self.SMTP}
        assert mailer_errors() == []
        assert delivery_alias() == "smtp"

    def test_several_real_mailers_are_ambiguous(self, settings):
        settings.MAILERS = {"default": self.DB, "smtp": self.SMTP, "console": self.CONSOLE}
        (error,) = checks.run_checks(tags=["mailer"])
        assert error.id == "mailer.W004"
        assert "several MAILERS entries really send (console, smtp)" in error.msg
        assert "MAILER_USING = 'console'" in error.hint
        with pytest.raises(CommandError, match="(?s)mailer.E004: .*MAILER_USING = 'console'"):
            call_command("send_mail")
        with pytest.raises(ImproperlyConfigured, match="MAILER_USING"):
            send_all()  # from code too

    def test_nothing_that_really_sends(self, settings):
        settings.MAILERS = {"default": self.DB}
        (error,) = checks.run_checks(tags=["mailer"])
        assert error.id == "mailer.W004"
        assert "every MAILERS entry is a DbBackend" in error.msg
        assert "MAILERS['smtp']" in error.hint

    def test_unknown_alias(self, settings):
        settings.MAILERS = {"default": self.DB}
        settings.MAILER_USING = "smtp"
        (error,) = checks.run_checks(tags=["mailer"])
        assert error.id == "mailer.W004"
        assert "not in MAILERS" in error.msg
        assert "MAILERS['smtp']" in error.hint

    @pytest.mark.django_db
    def test_a_host_that_only_queues_can_deploy(self, settings, capsys):
        """MAILERS holding only the queue backend (a web host) must not stop
        ``migrate`` and the other commands; the delivering ones refuse."""
        settings.MAILERS = {"default": self.DB}
        call_command("check")  # raised SystemCheckError with mailer.E004
        assert "mailer.W004" in capsys.readouterr().err
        call_command("migrate", "--check", skip_checks=False, verbosity=0)
        for command in ("send_mail", "runmailer"):
            with pytest.raises(CommandError, match="mailer.E004: .*every MAILERS entry"):
                call_command(command)

    def test_using_the_queue_itself_is_a_loop(self, settings):
        settings.MAILERS = {"default": self.DB, "smtp": self.SMTP}
        settings.MAILER_USING = "default"
        assert mailer_errors() == ["mailer.E003"]

    def test_explicit_using_wins(self, settings):
        from mailer.compat import delivery_alias

        settings.MAILERS = {"default": self.CONSOLE, "smtp": self.SMTP}
        settings.MAILER_USING = "smtp"
        assert mailer_errors() == []
        assert delivery_alias() == "smtp"


def test_zero_idle_sleep_warns(settings):
    settings.MAILER_EMPTY_QUEUE_SLEEP = 0
    assert mailer_errors() == ["mailer.W001"]


def test_lock_path_in_a_missing_directory(settings, tmp_path):
    settings.MAILER_LOCK_PATH = str(tmp_path / "missing" / "send_mail")
    (error,) = checks.run_checks(tags=["mailer"])
    assert error.id == "mailer.E007"
    assert "MAILER_LOCK_PATH" in error.msg and "does not exist" in error.msg
    assert "writable" in error.hint


def test_lock_path_under_a_file(settings, tmp_path):
    (tmp_path / "f").write_text("")
    settings.MAILER_LOCK_PATH = str(tmp_path / "f" / "send_mail")
    assert mailer_errors() == ["mailer.E007"]
    settings.MAILER_USE_FILE_LOCK = False  # no lock, nothing to check
    assert mailer_errors() == []


@pytest.mark.parametrize("value", [3, ["/run/mailer/send_mail"]])
def test_lock_path_must_be_a_path(settings, value):
    settings.MAILER_LOCK_PATH = value
    assert mailer_errors() == ["mailer.E007"]


def test_lock_path_accepts_path_objects(settings, tmp_path):
    settings.MAILER_LOCK_PATH = tmp_path / "send_mail"
    assert mailer_errors() == []


def test_default_lock_path_is_not_checked(settings, tmp_path, monkeypatch):
    """The working directory of ``check`` is not the one cron will use."""
    settings.MAILER_LOCK_PATH = None
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert mailer_errors() == []
@pytest.mark.parametrize(
    "value", ["os.system", ["os.system", 3], ["no-dots"], ["bad name.X"], ["pkg.*.x"]]
)
def test_pickle_allowlist_must_be_dotted_names(settings, value):
    settings.MAILER_PICKLE_ALLOWLIST = value
    if value == "os.system":  # a string, not a list
        assert mailer_errors() == ["mailer.E008"]
        return
    errors = checks.run_checks(tags=["mailer"])
    assert [e.id for e in errors] == ["mailer.E008"]
    assert "MAILER_PICKLE_ALLOWLIST" in errors[0].msg


def test_pickle_allowlist_accepts_classes_and_modules(settings):
    settings.MAILER_PICKLE_ALLOWLIST = ["myapp.emails.Fancy", "myapp.mail.*"]
    assert mailer_errors() == []


@pytest.mark.parametrize(
    "name,value",
    [
        ("MAILER_MESSAGE_FORMAT", "yaml"),
        ("MAILER_MESSAGE_CLASSES", ["os.system"]),
        ("MAILER_MESSAGE_CLASSES", ["no.such.Module"]),
        ("MAILER_MESSAGE_CLASSES", "tests.mailsurface.ProjectMessage"),
        ("MAILER_READ_PICKLE", "no"),
    ],
)
def test_stored_form_settings(settings, name, value):
    setattr(settings, name, value)
    wanted = "mailer.E006" if name == "MAILER_READ_PICKLE" else "mailer.E012"
    assert mailer_errors() == [wanted]


def test_stored_form_settings_accept_message_classes(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"
    settings.MAILER_MESSAGE_CLASSES = ["tests.mailsurface.ProjectMessage"]
    assert mailer_errors() == []


def test_unbounded_smtp_timeout_warns_and_the_worker_bounds_it(settings):
    from django.core.mail.backends.smtp import EmailBackend

    from mailer.compat import get_sending_backend
    from mailer.conf import DEFAULT_SMTP_TIMEOUT

    if HAS_MAILERS:
        settings.MAILERS = {
            "default": {"BACKEND": "mailer.backend.DbBackend"},
            "smtp": {"BACKEND": "django.core.mail.backends.smtp.EmailBackend",
                     "OPTIONS": {"host": "127.0.0.1", "port": 25}},
        }
        settings.MAILER_USING = "smtp"
    else:
        settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_TIMEOUT = None
    # A deployment check: `manage.py check --deploy` shows it, a new
    # project's plain `check` stays quiet.
    assert mailer_errors() == []
    errors = checks.run_checks(tags=["mailer"], include_deployment_checks=True)
    assert [e.id for e in errors] == ["mailer.W002"]
    assert "for ever" in errors[0].msg
    backend = get_sending_backend()
    assert isinstance(backend, EmailBackend)
    assert backend.timeout == DEFAULT_SMTP_TIMEOUT
    # The project's own timeout wins and silences the warning.
    if HAS_MAILERS:
        settings.MAILERS = {**settings.MAILERS, "smtp": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": 25, "timeout": 5}}}
    else:
        settings.EMAIL_TIMEOUT = 5
    assert checks.run_checks(tags=["mailer"], include_deployment_checks=True) == []
    assert get_sending_backend().timeout == 5


@pytest.mark.parametrize("value", ["nope", 3, ["mailer"]])
def test_attachment_storage_must_be_a_storages_key(settings, value):
    settings.MAILER_ATTACHMENT_STORAGE = value
    (error,) = checks.run_checks(tags=["mailer"])
    assert error.id == "mailer.E010"
    assert "MAILER_ATTACHMENT_STORAGE" in error.msg and "'default'" in error.msg


def test_attachment_storage_and_threshold_accepted(settings):
    settings.MAILER_ATTACHMENT_STORAGE = "default"
    settings.MAILER_ATTACHMENT_INLINE_MAX = 0
    assert checks.run_checks(tags=["mailer"]) == []
    settings.MAILER_ATTACHMENT_INLINE_MAX = -1
    (error,) = checks.run_checks(tags=["mailer"])
    assert error.id == "mailer.E001" and "MAILER_ATTACHMENT_INLINE_MAX" in error.msg
