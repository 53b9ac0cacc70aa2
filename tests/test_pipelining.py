"""RFC 2920 pipelining (mailer.pipelining) and the deadline on every reply
(mailer.smtpdeadline), against a server of our own that records which
commands arrived before it answered."""

from __future__ import annotations

import smtplib
import threading
import time
import warnings

import pytest

from mailer import pipelining
from mailer.smtpdeadline import DeadlineSMTP

MSG = b"Subject: hi\r\nMessage-ID: <m1@example.com>\r\n\r\nbody\r\n.starts with a period\r\n"


def connect(server, timeout: float = 5) -> DeadlineSMTP:
    return DeadlineSMTP(server.host, server.port, timeout=timeout)


def test_one_group_for_the_envelope_and_data(scripted_server):
    smtp = connect(scripted_server)
    refused = pipelining.sendmail(smtp, "from@example.com", ["a@example.com", "b@example.com"], MSG)
    smtp.quit()
    assert refused == {}
    assert scripted_server.groups() == [["EHLO"], ["MAIL", "RCPT", "RCPT", "DATA"], ["."], ["QUIT"]]
    [message] = scripted_server.messages
    assert message["to"] == ["a@example.com", "b@example.com"]
    assert message["data"] == MSG  # periods unescaped by the server: as sent
    mail = next(line for _, line in scripted_server.commands() if line.startswith("mail"))
    assert mail == f"mail FROM:<from@example.com> size={len(MSG)}"


def test_not_offered_is_smtplib_command_by_command():
    from tests.conftest import ScriptedServer

    server = ScriptedServer(pipelining=False)
    try:
        smtp = connect(server)
        assert not pipelining.offered(smtp)
        assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com", "b@example.com"], MSG) == {}
        smtp.quit()
        assert server.groups() == [["EHLO"], ["MAIL"], ["RCPT"], ["RCPT"], ["DATA"], ["."], ["QUIT"]]
        assert len(server.messages) == 1
    finally:
        server.close()


def test_some_recipients_refused_inside_the_group(scripted_server):
    scripted_server.refuse["b@example.com"] = "550 5.1.1 no such user"
    smtp = connect(scripted_server)
    refused = pipelining.sendmail(
        smtp, "f@example.com", ["a@example.com", "b@example.com", "c@example.com"], MSG
    )
    assert refused == {"b@example.com": (550, b"5.1.1 no such user")}
    assert scripted_server.messages[0]["to"] == ["a@example.com", "c@example.com"]
    # The connection is in step: the next message's replies are its own.
    assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG) == {}
    assert len(scripted_server.messages) == 2


def test_every_recipient_refused(scripted_server):
    scripted_server.refuse["a@example.com"] = "550 nope"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG)
    assert info.value.recipients == {"a@example.com": (550, b"nope")}
    assert pipelining.sendmail(smtp, "f@example.com", ["ok@example.com"], MSG) == {}
    verbs = [v for group in scripted_server.groups() for v in group]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "."]


def test_every_recipient_refused_and_data_accepted_anyway(scripted_server):
    # A server that answers 354 with no valid recipient: the client ends the
    # DATA at once with no content (RFC 2920 3.1), then RSET.
    scripted_server.refuse["a@example.com"] = "550 nope"
    scripted_server.script[("DATA", 1)] = "354 go on then"
    scripted_server.script[(".", 1)] = "554 no valid recipients"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG)
    assert pipelining.sendmail(smtp, "f@example.com", ["ok@example.com"], MSG) == {}
    assert [m["to"] for m in scripted_server.messages] == [["ok@example.com"]]


def test_data_refused_with_5xx(scripted_server):
    scripted_server.script[("DATA", 1)] = "554 5.7.1 not today"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPDataError) as info:
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG)
    assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.7.1 not today")
    assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG) == {}
    assert scripted_server.groups()[2] == ["RSET"]
    assert len(scripted_server.messages) == 1


def test_sender_refused_reads_the_rest_of_the_group(scripted_server):
    scripted_server.script[("MAIL", 1)] = "553 5.7.1 sender not allowed"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com", "b@example.com"], MSG)
    assert info.value.smtp_code == 553
    assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG) == {}
    assert len(scripted_server.messages) == 1


def test_421_mid_group_closes(scripted_server):
    scripted_server.script[("RCPT", 2)] = "421 4.3.2 shutting down"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        pipelining.sendmail(
            smtp, "f@example.com", ["a@example.com", "b@example.com", "c@example.com"], MSG
        )
    assert info.value.recipients == {"b@example.com": (421, b"4.3.2 shutting down")}
    assert smtp.sock is None  # closed, as smtplib does on a 421
    assert scripted_server.messages == []


def test_end_of_data_refused(scripted_server):
    scripted_server.script[(".", 1)] = "451 4.3.0 try later"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPDataError) as info:
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG)
    assert info.value.smtp_code == 451
    assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG) == {}
    assert len(scripted_server.messages) == 1


def test_connection_closed_after_the_last_group(scripted_server):
    scripted_server.script[(".", 1)] = "CLOSE"
    smtp = connect(scripted_server)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG)
    assert scripted_server.messages == []


def test_a_reply_that_never_ends_is_bounded(scripted_server):
    # 220- lines every half second: each read is quick, the reply never ends.
    # smtplib's timeout bounds each read only; the deadline bounds the reply.
    scripted_server.endless_greeting = True
    start = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        connect(scripted_server, timeout=1.5)
    assert time.monotonic() - start < 4
    assert isinstance(info.value.__context__, TimeoutError)


def test_plain_smtplib_would_wait_for_ever(scripted_server):
    # What the deadline fixes (the server is stopped after 4 s).
    scripted_server.endless_greeting = True
    outcome: list = []

    def run() -> None:
        try:
            smtplib.SMTP(scripted_server.host, scripted_server.port, timeout=1.5)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(4)
    assert thread.is_alive()
    scripted_server.close()
    thread.join(5)


def test_deadline_per_reply_not_per_connection(scripted_server):
    # A connection used longer than its timeout is fine: each reply has its own.
    smtp = connect(scripted_server, timeout=0.5)
    for _ in range(3):
        time.sleep(0.3)
        assert pipelining.sendmail(smtp, "f@example.com", ["a@example.com"], MSG) == {}
    assert len(scripted_server.messages) == 3


# --- several messages in flight on one connection (Pipeline) -------------------------


def message(n: int) -> bytes:
    return f"Subject: {n}\r\nMessage-ID: <m{n}@example.com>\r\n\r\nbody {n}\r\n".encode()


def pipeline_send(pipe: pipelining.Pipeline, n: int, to: list[str] | None = None):
    msg = message(n)
    return pipe.send(
        "f@example.com",
        to or [f"r{n}@example.com"],
        size=len(msg),
        write_body=lambda: pipe.smtp.send(pipelining.quoted_body(msg)),
    )


def overlapped(server, first_to=None, second_to=None):
    """M1 sent and pending; M2's envelope written behind it (from a second
    thread, as a lane's second thread does); then M1 finished. Returns
    (M1's outcome, M2's outcome): a refused dict or the exception."""
    smtp = connect(server)
    assert pipelining.offered(smtp)
    pipe = pipelining.Pipeline.of(smtp)
    outcomes: dict[str, object] = {}
    first = pipeline_send(pipe, 1, first_to)

    def second() -> None:
        try:
            outcomes["M2"] = pipeline_send(pipe, 2, second_to).finish()
        except Exception as exc:
            outcomes["M2"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 5
    while pipe.issued < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pipe.issued == 2  # M2's envelope is written before M1's reply is read
    try:
        outcomes["M1"] = first.finish()
    except Exception as exc:
        outcomes["M1"] = exc
    thread.join(10)
    return outcomes["M1"], outcomes["M2"], smtp


def test_the_end_of_one_message_and_the_next_envelope_in_one_group(scripted_server):
    scripted_server.end_delay = 0.2  # the provider's work on the end of the data
    first, second, smtp = overlapped(scripted_server)
    assert first == {} and second == {}
    assert scripted_server.groups() == [
        ["EHLO"],
        ["MAIL", "RCPT", "DATA"],
        [".", "MAIL", "RCPT", "DATA"],
        ["."],
    ]
    assert scripted_server.message_ids() == ["<m1@example.com>", "<m2@example.com>"]
    assert pipelining.Pipeline.of(smtp).idle


def test_a_refused_end_of_data_does_not_touch_the_next_message(scripted_server):
    scripted_server.end_delay = 0.1
    scripted_server.script[(".", 1)] = "554 5.7.1 rejected"
    first, second, _ = overlapped(scripted_server)
    assert isinstance(first, smtplib.SMTPDataError) and first.smtp_code == 554
    assert second == {}
    # No RSET between them: it would have reset the next message's envelope.
    assert "RSET" not in [v for g in scripted_server.groups() for v in g]
    assert scripted_server.message_ids() == ["<m2@example.com>"]


def test_partial_refusal_of_the_message_behind(scripted_server):
    scripted_server.end_delay = 0.1
    scripted_server.refuse["bad@example.com"] = "550 5.1.1 unknown"
    first, second, _ = overlapped(scripted_server, second_to=["ok@example.com", "bad@example.com"])
    assert first == {}
    assert second == {"bad@example.com": (550, b"5.1.1 unknown")}
    assert [m["to"] for m in scripted_server.messages] == [["r1@example.com"], ["ok@example.com"]]


def test_421_to_the_end_of_data_leaves_the_next_message_unsent(scripted_server):
    scripted_server.end_delay = 0.1
    scripted_server.script[(".", 1)] = "421 4.3.2 going down"
    first, second, smtp = overlapped(scripted_server)
    assert isinstance(first, smtplib.SMTPDataError) and first.smtp_code == 421
    assert isinstance(second, pipelining.NotSent)
    assert smtp.sock is None
    assert scripted_server.messages == []


def test_connection_closed_after_the_last_group_while_two_are_in_flight(scripted_server):
    scripted_server.end_delay = 0.1
    scripted_server.script[(".", 1)] = "CLOSE"
    first, second, _ = overlapped(scripted_server)
    # M1's data was sent and its reply never came: its fate is unknown (it
    # is retried with its Message-ID). M2 never got past its envelope.
    assert isinstance(first, smtplib.SMTPServerDisconnected)
    assert not isinstance(first, pipelining.NotSent)
    assert isinstance(second, pipelining.NotSent)


def test_refused_envelope_behind_a_pending_message(scripted_server):
    scripted_server.end_delay = 0.1
    scripted_server.script[("DATA", 2)] = "554 5.7.1 no"
    first, second, smtp = overlapped(scripted_server)
    assert first == {}
    assert isinstance(second, smtplib.SMTPDataError) and second.smtp_code == 554
    # The connection stays in step: RSET after the refused DATA, then more mail.
    pipe = pipelining.Pipeline.of(smtp)
    assert pipeline_send(pipe, 3).finish() == {}
    assert scripted_server.message_ids() == ["<m1@example.com>", "<m3@example.com>"]


# --- the opener over TLS (STARTTLS + login, and implicit TLS) --------------------------


@pytest.fixture
def tls_files(tmp_path):
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("needs the openssl command")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_the_opener_does_what_djangos_open_does_over_tls(tls_files, mode):
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    from django.core.mail import EmailMessage
    from django.core.mail.backends.smtp import EmailBackend

    from mailer.smtpdeadline import DeadlineSMTP_SSL, open_backend
    from tests.conftest import free_port

    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append((session.authenticated, envelope.content))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"user", b"secret"))

    port = free_port()
    tls = {"tls_context": server_context, "require_starttls": True} if mode == "starttls" else {
        # aiosmtpd does not count implicit TLS as TLS for AUTH.
        "ssl_context": server_context, "auth_require_tls": False}
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            **tls)
    controller.start()
    try:
        with warnings.catch_warnings():  # Django 6.1 prefers mail.mailers; fine in a test
            warnings.simplefilter("ignore")
            backend = EmailBackend(host="127.0.0.1", port=port, username="user", password="secret",
                                   use_tls=mode == "starttls", use_ssl=mode == "ssl", timeout=5)
        backend.ssl_context = ssl.create_default_context(cafile=cert)
        assert open_backend(backend) is True
        expected = DeadlineSMTP_SSL if mode == "ssl" else DeadlineSMTP
        assert type(backend.connection) is expected
        message = EmailMessage("S", "B", "from@example.com", ["to@example.com"])
        assert backend.send_messages([message]) == 1
        backend.close()
    finally:
        controller.stop()
    assert len(received) == 1 and received[0][0]  # authenticated, over TLS
