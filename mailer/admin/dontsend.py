"""The admin of the don't-send list (``DontSendEntry``)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.utils.translation import gettext_lazy as _

from mailer.models import DontSendEntry


class DontSendEntryForm(forms.ModelForm):
    class Meta:
        model = DontSendEntry
        fields = ["to_address", "when_added"]
        labels = {"to_address": _("Address"), "when_added": _("When added")}


class DontSendEntryAdmin(admin.ModelAdmin):
    form = DontSendEntryForm
    list_display = ["address_display", "when_added_display"]
    search_fields = ["to_address"]
    search_help_text = _("Search by address.")
    ordering = ["-when_added", "-id"]

    @admin.display(description=_("address"), ordering="to_address")
    def address_display(self, obj: DontSendEntry) -> str:
        return obj.to_address

    @admin.display(description=_("when added"), ordering="when_added")
    def when_added_display(self, obj: DontSendEntry) -> Any:
        return obj.when_added
