"""Messages pickled under older Django still send (mailer/compat.py).

The pickles were made under Django 4.2 and 5.2 (tests/fixtures/pickles/
make_pickles.py) in django-mailer's stored form and are committed as data.
"""

import json
from pathlib import Path

import pytest

from mailer.compat import DJANGO_VERSION
from mailer.engine import send_all
from mailer.models import Message, MessageLog, db_to_email

PICKLES = Path(__file__).parent / "fixtures" / "pickles"
CASES = [
    pytest.param(
        version, name, spec,
        marks=pytest.mark.skipif(
            version == "django52" and DJANGO_VERSION < (5, 2),
            reason="a message pickled by a newer Django can't be read by an older one",
        ),
        id=f"{version}-{name}",
    )
    for version in ("django42", "django52")
    for name, spec in json.loads((PICKLES / version / "manifest.json").read_text())["files"].items()
]


def load(version, spec):
    return (PICKLES / version / spec["file"]).read_text()


@pytest.mark.parametrize("version, name, spec", CASES)
def test_old_pickle_decodes_and_renders(version, name, spec):
    email = db_to_email(load(version, spec))
    assert email is not None
    assert email.subject == spec["subject"]
    assert email.body == spec["body"]
    assert email.recipients() == spec["recipients"]
    rendered = email.message()
    assert rendered["Message-ID"] == spec["message_id"]
    for alternative in getattr(email, "alternatives", []):
        assert alternative.mimetype if hasattr(alternative, "mimetype") else alternative[1]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("version, name, spec", CASES)
def test_old_pickle_is_delivered(version, name, spec, smtp_settings, smtp_server):
    Message.objects.create(message_data=load(version, spec))
    result = send_all()
    assert (result.sent, result.deferred, result.failed) == (1, 0, 0)
    (arrived,) = smtp_server.wait_for(1)
    msg = arrived["message"]
    assert msg["Subject"] == spec["subject"]
    assert msg["Message-ID"] == spec["message_id"]
    assert sorted(arrived["to"]) == sorted(
        a.split("<")[-1].rstrip(">") for a in spec["recipients"]
    )
    html = [a for a in spec["alternatives"] if a[1] == "text/html"]
    if html:
        assert msg.get_body(("html",)).get_content().strip() == html[0][0].strip()
    names = [a["filename"] for a in spec["attachments"]]
    assert [p.get_filename() for p in msg.iter_attachments()] == names
    assert MessageLog.objects.get().message_id == spec["message_id"]
