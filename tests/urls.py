from django.contrib import admin
from django.urls import path

from mailer.admin import MessageAdmin, MessageAdminMixin, MessageLogAdmin, show_subject, show_to
from mailer.models import Message, MessageLog

# A project's own admin built on 2.3.2's public names (tests/test_admin.py).
project_site = admin.AdminSite(name="project_admin")


class ProjectMessageAdmin(MessageAdmin):
    list_display = ["id", show_to, show_subject, "when_added", "priority"]
    actions = ["send_messages"]


class ProjectMessageLogAdmin(MessageAdminMixin, admin.ModelAdmin):
    list_display = ["id", show_to, show_subject, "when_attempted", "result"]
    readonly_fields = ["plain_text_body"]
    fields = ["result", "plain_text_body"]


project_site.register(Message, ProjectMessageAdmin)
project_site.register(MessageLog, ProjectMessageLogAdmin)
assert MessageLogAdmin  # importable under its 2.3.2 name

urlpatterns = [
    path("admin/", admin.site.urls),
    path("project-admin/", project_site.urls),
]
