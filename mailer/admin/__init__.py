"""The admin of the queue, the log and the don't-send list: registration, and 2.3.2's names.

Where things are:

* :mod:`mailer.admin.message`, :mod:`mailer.admin.messagelog`,
  :mod:`mailer.admin.dontsend`: the three ``ModelAdmin`` classes and their
  actions (send, retry, requeue);
* :mod:`mailer.admin.display`: how a stored message is shown (list columns,
  the decoded email's fields, the sandboxed HTML preview), and 2.3.2's
  ``show_to``, ``show_subject`` and ``MessageAdminMixin``;
* :mod:`mailer.admin.download`: the download view of stored attachments;
* :mod:`mailer.admin.changelist`: lists of tables that may be huge (capped
  count, rows fetched without their stored data);
* :mod:`mailer.admin.filters`: the list filters;
* :mod:`mailer.admin.overview`: the counts and chart at the top of the queue.

A project's own admin may import 2.3.2's names from here: ``show_to``,
``show_subject``, ``MessageAdminMixin``, ``MessageAdmin`` (its action
``send_messages``), ``MessageLogAdmin`` and ``DontSendEntryAdmin``.
"""

from __future__ import annotations

from django.contrib import admin

from mailer.admin.display import HTML_PREVIEW_CSP, MessageAdminMixin, show_subject, show_to
from mailer.admin.dontsend import DontSendEntryAdmin
from mailer.admin.message import MessageAdmin
from mailer.admin.messagelog import MessageLogAdmin
from mailer.models import DontSendEntry, Message, MessageLog

__all__ = [
    "HTML_PREVIEW_CSP",
    "DontSendEntryAdmin",
    "MessageAdmin",
    "MessageAdminMixin",
    "MessageLogAdmin",
    "show_subject",
    "show_to",
]

admin.site.register(Message, MessageAdmin)
admin.site.register(DontSendEntry, DontSendEntryAdmin)
admin.site.register(MessageLog, MessageLogAdmin)
