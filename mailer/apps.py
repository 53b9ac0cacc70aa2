"""The app's configuration: its name, its verbose name, and the system checks once ready."""

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MailerConfig(AppConfig):
    name = "mailer"
    verbose_name = _("Mailer")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from mailer import checks  # noqa: F401  (registers the system checks)
