"""What queue time refuses (mailer/validation.py), on every path that queues.

Each case: the error type, a message that names the field, and nothing
stored (neither a queue row nor a log entry) for the whole batch.
"""

import os
import re
import threading

import django
import pytest
from django.core import mail
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils import translation
from django.utils.translation import gettext_lazy

import mailer
from mailer.backend import DbBackend
from mailer.compat import HAS_MAILERS, BadHeaderError  # Django's (deprecated in 6.1)
from mailer.models import Message, MessageLog, make_message
from mailer.validation import find_unpicklable

pytestmark = pytest.mark.django_db

GOOD = {
    "subject": "S",
    "body": "b",
    "from_email": "f@example.com",
    "to": ["t@example.com"],
}


def _email(**fields):
    fields = {**GOOD, **fields}
    attachments = fields.pop("attachments", None)
    custom = fields.pop("custom", None)
    email = EmailMultiAlternatives(**fields)
    for attachment in attachments or []:
        email.attach(*attachment)
    if custom is not None:
        email.custom_attr = custom
    return email


# Every way of queueing, fed the same fields. A path that can't express a
# field (send_mail has no headers) is left out of that case.


def via_send_mail(**f):
    f = {**GOOD, **f}
    return mailer.send_mail(f["subject"], f["body"], f["from_email"], f["to"])


def via_send_html_mail(**f):
    f = {**GOOD, **f}
    return mailer.send_html_mail(
        f["subject"], f["body"], "<p>b</p>", f["from_email"], f["to"], headers=f.get("headers")
    )


def via_send_mass_mail(**f):
    f = {**GOOD, **f}
    good = ("fine", "b", "f@example.com", ["ok@example.com"])
    # The bad message comes second: the first must not be stored either.
    return mailer.send_mass_mail([good, (f["subject"], f["body"], f["from_email"], f["to"])])


def via_mail_admins(settings, **f):
    f = {**GOOD, **f}
    settings.ADMINS = f["to"]
    settings.SERVER_EMAIL = f["from_email"]
    return mailer.mail_admins(f["subject"], f["body"])


def via_mail_managers(settings, **f):
    f = {**GOOD, **f}
    settings.MANAGERS = f["to"]
    settings.SERVER_EMAIL = f["from_email"]
    return mailer.mail_managers(f["subject"], f["body"])


def via_db_backend(**f):
    good = _email(to=["ok@example.com"])
    return DbBackend().send_messages([good, _email(**f)])


def via_make_message(**f):
    f = {**GOOD, **f}
    custom = f.pop("custom", None)
    message = make_message(
        f["subject"], f["body"], f["from_email"], f["to"],
        attachments=f.get("attachments"), headers=f.get("headers"),
    )
    if custom is not None:
        email = message.email
        email.custom_attr = custom
        message.email = email
    message.save()
    return 1


ADDRESS_PATHS = [via_send_mail, via_send_html_mail, via_send_mass_mail, via_db_backend,
                 via_make_message]
SETTINGS_PATHS = [via_mail_admins, via_mail_managers]
HEADER_PATHS = [via_send_html_mail, via_db_backend, via_make_message]
ATTACHMENT_PATHS = [via_db_backend, via_make_message]


def run(path, settings, **fields):
    if path in SETTINGS_PATHS:
        return path(settings, **fields)
    return path(**fields)


def assert_refused(path, settings, error, match, **fields):
    with pytest.raises(error, match=match):
        run(path, settings, **fields)
    assert not Message.objects.exists()
    assert not MessageLog.objects.exists()


@pytest.mark.parametrize("path", ATTACHMENT_PATHS)
def test_newline_in_an_attachment_filename(path, settings):
    assert_refused(path, settings, BadHeaderError, r"attachments\[0\] filename can't contain newlines",
                   attachments=[("report\n.txt", "data", "text/plain")])


@pytest.mark.parametrize("path", ATTACHMENT_PATHS)
def test_newline_in_an_attachment_mimetype(path, settings):
    assert_refused(path, settings, BadHeaderError, r"attachments\[0\] mimetype",
                   attachments=[("r.txt", "data", "text/plain\nBcc: x@example.com")])


@pytest.mark.parametrize("path", ADDRESS_PATHS + SETTINGS_PATHS)
@pytest.mark.parametrize("address", ["<>", "Someone <>"])
def test_address_without_addr_spec(path, settings, address):
    """Was a TypeError from deep inside Django."""
    assert_refused(path, settings, ValueError, r"^Invalid address .*\(to\[0\]; django-mailer",
                   to=[address])


@pytest.mark.parametrize("path", ADDRESS_PATHS + SETTINGS_PATHS)
@pytest.mark.parametrize("address", ["", "  ", None])
def test_empty_address(path, settings, address):
    """Was silently dropped: send_mail returned 1 and stored nothing."""
    assert_refused(path, settings, ValueError, r"^Invalid address .*: it is empty \(to\[1\];",
                   to=["ok@example.com", address])


@pytest.mark.parametrize("path", ADDRESS_PATHS + SETTINGS_PATHS)
@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x1c", "\u2028", "\x7f"])
def test_control_character_in_the_subject(path, settings, char):
    assert_refused(path, settings, BadHeaderError,
                   rf"subject can't contain the control character U\+{ord(char):04X}",
                   subject=f"Hello{char}Bcc: victim@example.com")


@pytest.mark.parametrize("path", HEADER_PATHS)
@pytest.mark.parametrize("char", ["\x00", "\x0b", "\n"])
def test_control_character_in_an_extra_header(path, settings, char):
    assert_refused(path, settings, BadHeaderError, r"extra_headers\['X-Tag'\] can't contain",
                   headers={"X-Tag": f"a{char}Bcc: victim@example.com"})


@pytest.mark.parametrize("path", ADDRESS_PATHS + SETTINGS_PATHS)
def test_control_character_in_from(path, settings):
    assert_refused(path, settings, BadHeaderError, "from_email can't contain the control",
                   from_email="f\x00@example.com")


def test_control_character_in_reply_to(settings):
    assert_refused(via_db_backend, settings, BadHeaderError, r"reply_to\[0\] can't contain",
                   reply_to=["r@example.com\x0bBcc: victim@example.com"])


def test_cc_and_bcc_are_checked(settings):
    assert_refused(via_db_backend, settings, ValueError, r"Invalid address .*\(cc\[0\];", cc=["<>"])
    assert_refused(via_db_backend, settings, ValueError, r"it is empty \(bcc\[0\];", bcc=[""])


def test_tab_in_a_header_is_allowed():
    mailer.send_html_mail("S\tT", "b", "<p/>", "f@example.com", ["t@example.com"],
                          headers={"X-Tag": "a\tb"})
    assert Message.objects.get().email.extra_headers["X-Tag"] == "a\tb"


def test_an_empty_recipient_list_still_queues_nothing_without_error():
    assert mailer.send_mail("S", "b", "f@example.com", []) == 0
    assert not Message.objects.exists()


def test_badheadererror_is_a_valueerror():
    assert issubclass(BadHeaderError, ValueError)


# --- what can't be stored ---------------------------------------------------------


def test_unpicklable_custom_attribute_is_named(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    assert_refused(via_db_backend, settings, ValueError,
                   r"its attribute custom_attr can't be stored \(TypeError", custom=threading.Lock())


@pytest.mark.parametrize("path", HEADER_PATHS)
def test_unpicklable_header_value_is_named(path, settings):
    assert_refused(path, settings, ValueError, r"extra_headers\['X-Foo'\] can't be stored",
                   headers={"X-Foo": threading.Lock()})


def test_unpicklable_attachment_content_is_named(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    email = _email()
    email.attachments.append(("a.bin", threading.Lock(), "application/octet-stream"))
    with pytest.raises(ValueError, match=r"attachments\[0\]\S* can't be stored") as info:
        DbBackend().send_messages([email])
    assert isinstance(info.value.__cause__, TypeError)  # raised from pickle's error
    assert not Message.objects.exists()


def test_make_message_with_an_unpicklable_attribute(settings):
    with pytest.raises(ValueError, match="custom_attr can't be stored"):
        via_make_message(custom=threading.Lock())
    assert not Message.objects.exists()


def test_find_unpicklable_paths():
    lock = threading.Lock()
    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"],
                         headers={"X-Ok": "1", "X-Foo": lock})
    assert find_unpicklable(email) == "extra_headers['X-Foo']"
    assert find_unpicklable({"a": [1, {"b": lock}]}) == "['a'][1]['b']"
    assert find_unpicklable(EmailMessage("S")) is None
    assert find_unpicklable(lock) == ""


def test_the_connection_is_not_blamed(settings):
    email = _email()
    email.__dict__["connection"] = threading.Lock()  # never stored
    email.custom_attr = threading.Lock()
    with pytest.raises(ValueError, match="custom_attr") as info:
        DbBackend().send_messages([email])
    assert "connection" not in str(info.value)


# --- lazy strings are forced in the caller's language ------------------------------


def lazy_fields():
    return {
        "subject": gettext_lazy("Password"),
        "body": gettext_lazy("Save"),
        "headers": {"X-Label": gettext_lazy("Email address")},
    }


@pytest.mark.parametrize("path", HEADER_PATHS)
def test_lazy_strings_are_forced_under_the_active_language(path, settings):
    with translation.override("ru"):
        assert str(gettext_lazy("Password")) == "Пароль"  # the catalogue is there
        run(path, settings, **lazy_fields())
    rows = [row for row in Message.objects.all() if row.email.to != ["ok@example.com"]]
    assert len(rows) == 1
    for row in rows:
        email = row.email
        assert type(email.subject) is str and email.subject == "Пароль"
        assert type(email.body) is str and email.body == "Сохранить"
        assert type(email.extra_headers["X-Label"]) is str
        assert email.extra_headers["X-Label"] == "Адрес электронной почты"
        assert row.subject_text == "Пароль"


def test_lazy_alternative_and_attachment_are_forced():
    email = _email(subject=gettext_lazy("Password"))
    email.attach_alternative(gettext_lazy("Save"), "text/html")
    email.attach(gettext_lazy("Password"), gettext_lazy("Save"), "text/plain")
    with translation.override("ru"):
        DbBackend().send_messages([email])
    stored = Message.objects.get().email
    assert stored.alternatives[0][0] == "Сохранить" and type(stored.alternatives[0][0]) is str
    assert tuple(stored.attachments[0]) == ("Пароль", "Сохранить", "text/plain")
    # The caller's object keeps its lazy strings; it only gained a Message-ID.
    assert email.subject is not stored.subject
    assert str(email.subject) == "Password"
    assert email.extra_headers["Message-ID"] == stored.extra_headers["Message-ID"]


def test_django_send_mail_through_the_queue_backend(settings):
    if HAS_MAILERS:
        settings.MAILERS = {"default": {"BACKEND": "mailer.backend.DbBackend"}}
    else:
        settings.EMAIL_BACKEND = "mailer.backend.DbBackend"
    with pytest.raises(ValueError, match=r"^Invalid address .*\(to\[0\];"):
        mail.send_mail("S", "b", "f@example.com", ["<>"])
    assert not Message.objects.exists()


def test_non_string_address_is_refused_naming_the_field(settings):
    assert_refused(via_db_backend, settings, ValueError,
                   r"^Invalid address 5: it must be a string, not int \(to\[0\];",
                   to=[5])


# --- what the worker would refuse to read back (MAILER_PICKLE_ALLOWLIST) -----------


class Custom:
    """A project's own class: pickles fine, but is not on the allow-list."""

    def __init__(self, value):
        self.value = value


class ProjectEmail(EmailMultiAlternatives):
    pass


def test_a_class_the_worker_would_refuse_is_refused_at_queue_time(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    assert_refused(via_db_backend, settings, ValueError,
                   r"its attribute custom_attr would not be read back by the worker: "
                   r"tests\.test_validation\.Custom is not allowed.*MAILER_PICKLE_ALLOWLIST",
                   custom=Custom(1))


def test_refused_class_deep_inside_is_named(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    email = _email()
    email.extra_headers["X-Meta"] = "ok"
    email.attachments.append(("a.txt", "x", "text/plain"))
    email.tracking = {"ids": [1, Custom(2)]}
    with pytest.raises(ValueError, match=r"its attribute tracking\['ids'\]\[1\] would not"):
        DbBackend().send_messages([email])
    with pytest.raises(ValueError, match="would not be read back"):
        via_make_message(custom=Custom(3))
    assert not Message.objects.exists()


def test_an_email_subclass_the_worker_would_refuse(settings):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    email = ProjectEmail(**GOOD)
    with pytest.raises(ValueError, match=r"\bit would not be read back.*ProjectEmail"):
        DbBackend().send_messages([email])
    assert not Message.objects.exists()


def test_allow_listed_classes_are_queued_and_sent(settings, smtp_settings, smtp_server):
    settings.MAILER_MESSAGE_FORMAT = "pickle"  # what the pickle path refuses
    settings.MAILER_PICKLE_ALLOWLIST = ["tests.test_validation.*"]
    email = ProjectEmail(**GOOD)
    email.custom_attr = Custom(1)
    assert DbBackend().send_messages([email]) == 1
    from mailer.engine import send_all

    assert send_all().sent == 1
    assert len(smtp_server.wait_for(1)) == 1


def test_json_refuses_what_is_not_data_naming_it(settings):
    assert_refused(via_db_backend, settings, ValueError,
                   r"its attribute custom_attr can't be stored: tests\.test_validation\.Custom "
                   r"is not plain data", custom=Custom(1))
    email = _email()
    email.tracking = {"ids": [1, Custom(2)]}
    with pytest.raises(ValueError, match=r"its attribute tracking\['ids'\]\[1\] can't be stored"):
        DbBackend().send_messages([email])
    email = _email()
    email.attachments.append(("a.bin", threading.Lock(), "application/octet-stream"))
    with pytest.raises(ValueError, match=r"its attribute attachments\[0\]\[1\] can't be stored"):
        DbBackend().send_messages([email])
    assert not Message.objects.exists()


def test_json_refuses_an_unlisted_message_class(settings):
    with pytest.raises(ValueError, match=r"\bit can't be stored: tests\.test_validation\."
                                         r"ProjectEmail is not a message class.*MAILER_MESSAGE_CLASSES"):
        DbBackend().send_messages([ProjectEmail(**GOOD)])
    assert not Message.objects.exists()


def test_json_listed_classes_with_plain_attributes_are_queued_and_sent(
    settings, smtp_settings, smtp_server
):
    settings.MAILER_MESSAGE_CLASSES = ["tests.test_validation.ProjectEmail"]
    email = ProjectEmail(**GOOD)
    email.custom_attr = {"plain": ["data", 1, None, True]}
    assert DbBackend().send_messages([email]) == 1
    stored = Message.objects.get()
    assert stored.message_data.startswith("{")
    assert type(stored.email) is ProjectEmail
    assert stored.email.custom_attr == {"plain": ["data", 1, None, True]}
    from mailer.engine import send_all

    assert send_all().sent == 1
    assert len(smtp_server.wait_for(1)) == 1


def test_rich_but_allowed_messages_are_queued():
    """Safe strings, MIME parts, lazy strings in custom attributes, dates:
    all on the decoder's list, so all accepted (and read back)."""
    import datetime
    from email.message import MIMEPart
    from email.mime.text import MIMEText

    from django.utils.safestring import mark_safe

    email = _email(subject=mark_safe("Safe <b>subject</b>"))
    if django.VERSION >= (6, 1):  # MIMEBase parts are deprecated there
        part = MIMEPart()
        part.set_content("part")
        email.attach(part)
    else:
        email.attach(MIMEText("part", "plain"))
    email.note = gettext_lazy("Password")
    email.when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert DbBackend().send_messages([email]) == 1
    stored = Message.objects.get().email
    assert stored.subject == "Safe <b>subject</b>"
    assert str(stored.note) == "Password" and stored.when.year == 2026


# --- the cheap path for plain messages -----------------------------------------------


def test_what_send_mail_makes_is_a_simple_message():
    from mailer.validation import simple_message

    email = EmailMessage("S", "b", "f@example.com", ["t@example.com"], headers={"X-A": "1"})
    email.connection = DbBackend()  # send_mass_mail sets one; never stored
    assert simple_message(email)
    assert simple_message(EmailMultiAlternatives("S", "b", "f@example.com", ["t@example.com"]))
    assert not simple_message(EmailMessage(gettext_lazy("Password"), "b", "f@example.com"))
    assert not simple_message(EmailMessage("S", "b", "f@example.com", [gettext_lazy("t@x.org")]))
    with_file = EmailMessage("S", "b", "f@example.com", ["t@example.com"])
    with_file.attach("a.txt", "x", "text/plain")
    assert not simple_message(with_file)

    class Custom(EmailMessage):
        pass

    assert not simple_message(Custom("S", "b", "f@example.com", ["t@example.com"]))


def _plain(**fields):
    kwargs = {"subject": "S", "body": "b", "from_email": "f@example.com", "to": ["t@example.com"]}
    kwargs.update(fields)
    return EmailMessage(**kwargs)


def test_quick_check_verdicts():
    """True: the cheap path, nothing more to check; False: simple, but
    validate_email() decides; None: the full path (lazy strings, other
    kinds or names of attributes, attachments)."""
    from mailer.validation import quick_check

    email = _plain(headers={"X-A": "1"}, cc=["c@example.com"], bcc=["b@example.com"], reply_to=["r@example.com"])
    email.connection = DbBackend()  # send_mass_mail sets one; never stored
    assert quick_check(email) is True
    assert quick_check(EmailMultiAlternatives("S", "b", "f@example.com", ["t@example.com"])) is True
    # In doubt: validate_email() decides (and accepts these).
    assert quick_check(_plain(to=['"Doe, J" <j@example.com>'])) is False
    assert quick_check(_plain(subject="a\tb")) is False
    assert quick_check(_plain(subject="a\nb")) is False
    assert quick_check(_plain(headers={"X-A": "\u2028"})) is False
    team = "Team <f@example.com>"
    for _ in range(2):  # the same sender object again is checked again
        assert quick_check(_plain(from_email=team)) is False
    assert quick_check(_plain()) is True
    # Not such a message: the full path.
    assert quick_check(_plain(subject=gettext_lazy("Password"))) is None
    assert quick_check(_plain(to=[gettext_lazy("t@x.org")])) is None
    assert quick_check(_plain(headers={"X-A": gettext_lazy("x")})) is None
    with_file = _plain()
    with_file.attach("a.txt", "x", "text/plain")
    assert quick_check(with_file) is None
    with_html = EmailMultiAlternatives("S", "b", "f@example.com", ["t@example.com"])
    with_html.attach_alternative("<p>b</p>", "text/html")
    assert quick_check(with_html) is None
    extra = _plain()
    extra.note = "x"  # an attribute Django doesn't set: pickled, so checked in full
    assert quick_check(extra) is None
    as_tuple = _plain()
    as_tuple.to = ("t@example.com",)
    assert quick_check(as_tuple) is None

    class Custom(EmailMessage):
        pass

    assert quick_check(Custom("S", "b", "f@example.com", ["t@example.com"])) is None


@pytest.mark.parametrize("field", ["subject", "to", "from_email", "headers"])
@pytest.mark.django_db
def test_str_subclasses_take_the_full_path(field):
    """A str subclass pickles as its class: the decoder's check must run."""
    from django.utils.safestring import mark_safe

    from mailer.validation import quick_check

    value = {"subject": mark_safe("S"), "to": [mark_safe("t@example.com")], "from_email": mark_safe("f@example.com")}
    value["headers"] = {"X-A": mark_safe("1")}
    email = _plain(**{field: value[field]})
    assert quick_check(email) is None
    assert mailer.models.queue_emails([email]) == 1


def test_message_ids_look_like_the_standard_librarys():
    from email.utils import make_msgid

    from mailer.models import message_ids

    new_id = message_ids("host.example.com")
    ours = [new_id() for _ in range(1000)]
    assert len(set(ours)) == 1000
    numbers = [int(i.split(".")[2].split("@")[0]) for i in ours]
    assert numbers == [(numbers[0] + k) % 2**64 for k in range(1000)]  # in order: one index run
    other = message_ids("host.example.com")()
    assert other not in ours  # another call starts at another random number
    pattern = re.compile(r"<\d+\.\d+\.\d+@host\.example\.com>\Z")
    assert all(pattern.match(i) for i in ours)
    assert pattern.match(make_msgid(domain="host.example.com"))
    assert ours[0].split(".")[1] == str(os.getpid())


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"subject": "a\rb"}, "subject"),
        ({"to": ["ok@example.com", "b\x0bad@example.com"]}, "to[1]"),
        ({"cc": [""]}, "cc[0]"),
        ({"bcc": ["<>"]}, "bcc[0]"),
        ({"reply_to": ["x@example.com\n"]}, "reply_to[0]"),
        ({"from_email": "f@example.com\u2028"}, "from_email"),
        ({"headers": {"X-Tag": "v\x00"}}, "extra_headers['X-Tag']"),
    ],
)
@pytest.mark.django_db
def test_simple_messages_are_refused_naming_the_field(fields, named):
    """Plain messages take the cheap checks; what fails them is named as the
    full checks name it."""
    from mailer.validation import simple_message

    kwargs = {"subject": "S", "body": "b", "from_email": "f@example.com", "to": ["t@example.com"]}
    kwargs.update(fields)
    email = EmailMessage(**kwargs)
    assert simple_message(email)
    with pytest.raises(ValueError, match=re.escape(named)):
        mailer.models.queue_emails([email])
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_simple_messages_with_display_names_are_accepted():
    email = EmailMessage("S", "b", "Team <f@example.com>", ['"Doe, J" <j@example.com>'])
    assert mailer.models.queue_emails([email]) == 1


# --- accepted at queue time, failing later (issue #30) --------------------------------


def test_a_two_item_attachment_is_refused(settings):
    """Was queued, then dropped to the log by the worker."""
    email = _email()
    email.attachments.append(("report.txt", "data"))
    with pytest.raises(ValueError, match=r"attachments\[0\] must be a \(filename, content, "
                                         r"mimetype\) triple or a MIME part .*2-item tuple"):
        DbBackend().send_messages([email])
    assert not Message.objects.exists()


def test_an_attachment_of_another_kind_is_refused(settings):
    email = _email()
    email.attachments.append("report.txt")
    with pytest.raises(ValueError, match=r"attachments\[0\] must be .* not a str"):
        DbBackend().send_messages([email])
    assert not Message.objects.exists()


@pytest.mark.parametrize("content", [42, 4.2, None, ["a", "b"], {"a": 1}])
def test_attachment_content_that_is_not_text_or_bytes_is_refused(settings, content):
    """An int was an "Unexpected error" deferral on every pass."""
    named = rf"attachments\[0\] content must be str or bytes .* not {type(content).__name__}"
    email = _email()
    email.attachments.append(("n.bin", content, "application/octet-stream"))
    with pytest.raises(ValueError, match=named):
        DbBackend().send_messages([email])
    if content is not None:  # make_message() attaches through Django, which refuses None
        with pytest.raises(ValueError, match=named):
            make_message("S", "b", "f@example.com", ["t@example.com"],
                         attachments=[("n.bin", content, "application/octet-stream")]).save()
    assert not Message.objects.exists()


def test_text_attachment_content_django_would_not_encode(settings):
    email = _email()
    email.attachments.append(("a.txt", bytearray(b"x"), "text/plain"))
    with pytest.raises(ValueError, match=r"attachments\[0\] content must be str \("):
        DbBackend().send_messages([email])
    email = _email()
    email.attachments.append(("a.txt", b"x", "text/plain"))  # not through attach()
    if django.VERSION >= (6, 1):  # decoded when sent
        assert DbBackend().send_messages([email]) == 1
    else:
        with pytest.raises(ValueError, match=r"content must be str \(.* not bytes"):
            DbBackend().send_messages([email])


def test_attachment_filename_and_mimetype_must_be_strings(settings):
    for attachment, named in [((5, "x", "text/plain"), "filename"),
                              (("a.txt", "x", 5), "mimetype"),
                              (("a.txt", "x", None), "mimetype"),
                              (("a.txt", "x", "text"), "mimetype")]:
        email = _email()
        email.attachments.append(attachment)
        with pytest.raises(ValueError, match=rf"attachments\[0\] {named} must be a string"):
            DbBackend().send_messages([email])
    assert not Message.objects.exists()


def test_the_attachments_django_takes_are_queued_and_sent(settings, smtp_settings, smtp_server):
    from email.mime.text import MIMEText

    email = _email()
    email.attach("a.txt", "text", "text/plain")
    email.attach("b.bin", b"\x00\x01", "application/octet-stream")
    email.attach("c.bin", bytearray(b"bytes"), "application/octet-stream")
    email.attach("d.txt", b"utf-8 bytes", "text/plain")  # decoded by attach()
    email.attach("fwd.eml", EmailMessage("inner", "b", "f@example.com", ["t@example.com"]),
                 "message/rfc822")
    email.attachments.append(("e.txt", "put there directly", "text/plain"))
    if django.VERSION < (6, 1):
        email.attach(MIMEText("part", "plain"))
    assert DbBackend().send_messages([email]) == 1
    from mailer.engine import send_all

    assert send_all().sent == 1
    assert len(smtp_server.wait_for(1)) == 1


@pytest.mark.parametrize("name", ["X A", "X-A:", "X:A", "", "X-Ä", "X\tA"])
@pytest.mark.parametrize("path", HEADER_PATHS)
def test_a_header_name_that_is_not_a_field_name_is_refused(path, settings, name):
    """"X A" was sent as "X A: b: v"."""
    assert_refused(path, settings, ValueError,
                   rf"the name of extra_headers\[{re.escape(repr(name))}\] "
                   r"(must be printable ASCII without spaces or colons|can't contain)",
                   headers={name: "v"})


def test_quick_check_leaves_odd_header_names_to_the_full_checks():
    from mailer.validation import quick_check

    assert quick_check(_plain(headers={"X A": "v"})) is False
    assert quick_check(_plain(headers={"X-A:": "v"})) is False
    assert quick_check(_plain(headers={"X-A": "v", "List-Unsubscribe": "<x>"})) is True


# --- addresses: Django's words, and what the delivery backend takes ----------------------


@pytest.mark.parametrize("address", ["a@", "<>", "a@b.com, c@d.com", "x@exa mple.com"])
def test_an_invalid_address_is_refused_in_djangos_words(settings, address):
    """Sites' code and tests match on Django's "Invalid address ..."."""
    with pytest.raises(ValueError) as info:
        mailer.send_mail("S", "b", "f@example.com", [address])
    text = str(info.value)
    assert text.startswith("Invalid address"), text
    assert address in text and "(to[0]; django-mailer refused to queue this message)" in text
    assert not Message.objects.exists()


NON_ASCII_LOCAL = "jörg@example.com"


def test_non_ascii_local_part_follows_the_delivery_backend(settings):
    """Django 6.1's SMTP backend refuses it (no SMTPUTF8): so does queue time;
    a backend that takes it (locmem here, an ESP's API) gets it queued and sent."""
    from django.core import mail as django_mail

    from mailer.engine import send_all

    if HAS_MAILERS:
        settings.MAILERS = {
            "default": {"BACKEND": "mailer.backend.DbBackend"},
            "out": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
        }
        settings.MAILER_USING = "out"
    else:
        settings.MAILER_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert mailer.send_mail("S", "b", "f@example.com", [NON_ASCII_LOCAL]) == 1
    assert mailer.send_mail("S", "b", "f@example.com", [f"Jörg <{NON_ASCII_LOCAL}>"]) == 1
    assert send_all().sent == 2
    assert [m.to for m in django_mail.outbox] == [[NON_ASCII_LOCAL], [f"Jörg <{NON_ASCII_LOCAL}>"]]


def test_non_ascii_local_part_with_djangos_smtp_backend(settings, smtp_settings):
    from django.core.mail.backends.smtp import EmailBackend

    from mailer.compat import accepts_utf8_local_parts

    assert not accepts_utf8_local_parts()
    if django.VERSION >= (6, 0):
        with pytest.raises(ValueError, match=r"^Invalid address 'jörg@example.com'.*non-ASCII"):
            mailer.send_mail("S", "b", "f@example.com", [NON_ASCII_LOCAL])
        assert not Message.objects.exists()
    else:  # Django < 6 encodes the local part (RFC 2047) and sends it
        assert mailer.send_mail("S", "b", "f@example.com", [NON_ASCII_LOCAL]) == 1
    # The same backend told to speak SMTPUTF8 takes it.
    path = f"{__name__}.Utf8SMTPBackend"
    if HAS_MAILERS:
        settings.MAILERS = {**settings.MAILERS, "smtp": {**settings.MAILERS["smtp"],
                                                         "BACKEND": path}}
    else:
        settings.MAILER_EMAIL_BACKEND = path
    assert issubclass(Utf8SMTPBackend, EmailBackend)
    assert accepts_utf8_local_parts()
    assert mailer.send_mail("S", "b", "f@example.com", [NON_ASCII_LOCAL]) == 1


from django.core.mail.backends.smtp import EmailBackend as _SMTPBackend  # noqa: E402


class Utf8SMTPBackend(_SMTPBackend):
    use_smtputf8 = True
