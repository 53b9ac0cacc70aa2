"""One message's SMTP transaction with its commands grouped as RFC 2920
(PIPELINING) allows, its replies read in order and mapped as ``smtplib``
maps them.

``smtplib.SMTP.sendmail`` waits for the reply to each command: MAIL, each
RCPT, DATA and the end of the data cost a round trip each. When the server
offers PIPELINING, :func:`sendmail` writes MAIL, every RCPT and DATA in one
go and then reads their replies in order (RFC 2920 section 3.1: DATA ends a
group, the data follows its 354): two round trips per message, whatever the
number of recipients.

What the caller sees is what ``smtplib.SMTP.sendmail`` gives: the same
return value (the refused recipients, when some were accepted) and the same
exceptions for the same replies, with the connection left as ``smtplib``
leaves it:

* MAIL refused: ``SMTPSenderRefused`` (421: the connection closed; else the
  replies to the RCPTs and DATA already sent are read, a DATA the server
  accepted anyway gets an empty message ended at once, and RSET);
* a RCPT refused with 421: ``SMTPRecipientsRefused`` with the refusals so
  far, the connection closed; every recipient refused: RSET (after ending
  an accepted DATA), ``SMTPRecipientsRefused``;
* DATA refused: ``SMTPDataError`` (421: the connection closed; else RSET);
* the end of the data refused: ``SMTPDataError``, as above;
* a connection lost or a reply late: ``SMTPServerDisconnected`` (and
  ``TimeoutError`` under it), the message not accepted.

The message counts as accepted only once its own end-of-data reply said 250.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "NotSent",
    "Pending",
    "Pipeline",
    "data_writer",
    "offered",
    "quoted_body",
    "sendmail",
    "transaction",
]

_CRLF = b"\r\n"
_PERIODS = re.compile(rb"(?m)^\.")


def offered(smtp: Any) -> bool:
    """Does the server on ``smtp`` offer PIPELINING? (Greets it first if needed.)"""
    smtp.ehlo_or_helo_if_needed()
    return bool(smtp.does_esmtp and smtp.has_extn("pipelining"))


def quoted_body(msg: bytes) -> bytes:
    """``msg`` as the DATA carries it: leading periods doubled, ended by
    CRLF ``.`` CRLF (what ``smtplib.SMTP.data`` sends)."""
    quoted = _PERIODS.sub(b"..", msg)
    if not quoted.endswith(_CRLF):
        quoted += _CRLF
    return quoted + b"." + _CRLF


def data_writer(smtp: Any, msg: bytes | str) -> tuple[int, Callable[[], None]]:
    """``(size, write)`` for ``msg`` as ``smtplib.SMTP.sendmail`` sends it."""
    body = smtplib._fix_eols(msg).encode("ascii") if isinstance(msg, str) else msg  # type: ignore[attr-defined]
    return len(body), lambda: smtp.send(quoted_body(body))


def _command(cmd: str, args: str) -> str:
    line = f"{cmd} {args}"
    if "\r" in line or "\n" in line:
        shown = line.replace("\n", "\\n").replace("\r", "\\r")
        raise ValueError(f"command and arguments contain prohibited newline characters: {shown}")
    return line + "\r\n"


def _mail_options(smtp: Any, options: list[str]) -> str:
    """``smtplib.SMTP.mail``'s option list (and its SMTPUTF8 switch)."""
    if not (options and smtp.does_esmtp):
        return ""
    if any(option.lower() == "smtputf8" for option in options):
        if not smtp.has_extn("smtputf8"):
            raise smtplib.SMTPNotSupportedError("SMTPUTF8 not supported by server")
        smtp.command_encoding = "utf-8"
    return " " + " ".join(options)


def sendmail(
    smtp: Any,
    from_addr: str,
    to_addrs: str | Sequence[str],
    msg: bytes | str,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> dict[str, tuple[int, bytes]]:
    """``smtp.sendmail(...)``, grouped when the server offers PIPELINING
    (else ``smtplib``'s own)."""
    if not offered(smtp):
        return smtplib.SMTP.sendmail(smtp, from_addr, to_addrs, msg, mail_options, rcpt_options)
    size, write_body = data_writer(smtp, msg)
    return transaction(
        smtp,
        from_addr,
        to_addrs,
        size=size,
        write_body=write_body,
        mail_options=mail_options,
        rcpt_options=rcpt_options,
        pipelined=True,
    )


def transaction(
    smtp: Any,
    from_addr: str,
    to_addrs: str | Iterable[str],
    *,
    size: int,
    write_body: Callable[[], None],
    mail_options: Iterable[str] = (),
    rcpt_options: Iterable[str] = (),
    pipelined: bool,
) -> dict[str, tuple[int, bytes]]:
    """One mail transaction: MAIL, RCPTs, DATA, then ``write_body()`` (the
    quoted data, ended by CRLF ``.`` CRLF), then its reply.

    ``pipelined``: MAIL, the RCPTs and DATA go as one group (the server
    offers PIPELINING); else each waits for its reply, as ``smtplib``.
    """
    recipients, mail, rcpts = _envelope(
        smtp, from_addr, to_addrs, size, mail_options, rcpt_options
    )
    if pipelined:
        smtp.send(mail + "".join(rcpts) + "data\r\n")
        return _end(smtp, write_body, _grouped_replies(smtp, from_addr, recipients))
    smtp.send(mail)
    code, resp = smtp.getreply()
    if code != 250:
        _close_or_reset(smtp, code)
        raise smtplib.SMTPSenderRefused(code, resp, from_addr)
    refused: dict[str, tuple[int, bytes]] = {}
    for recipient, command in zip(recipients, rcpts, strict=True):
        smtp.send(command)
        code, resp = smtp.getreply()
        if code not in (250, 251):
            refused[recipient] = (code, resp)
        if code == 421:
            smtp.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(recipients):
        smtp._rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    smtp.putcmd("data")
    code, resp = smtp.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, resp)
    return _end(smtp, write_body, refused)


def _envelope(
    smtp: Any,
    from_addr: str,
    to_addrs: str | Iterable[str],
    size: int,
    mail_options: Iterable[str],
    rcpt_options: Iterable[str],
) -> tuple[list[str], str, list[str]]:
    """``(recipients, MAIL command, RCPT commands)`` as ``smtplib`` writes them."""
    smtp.ehlo_or_helo_if_needed()
    options: list[str] = []
    if smtp.does_esmtp:
        if smtp.has_extn("size"):
            options.append(f"size={size}")
        options.extend(mail_options)
    recipients = [to_addrs] if isinstance(to_addrs, str) else list(to_addrs)
    rcpt_list = list(rcpt_options)
    rcpt_args = " " + " ".join(rcpt_list) if rcpt_list and smtp.does_esmtp else ""
    mail = _command("mail", f"FROM:{smtplib.quoteaddr(from_addr)}{_mail_options(smtp, options)}")
    rcpts = [_command("rcpt", f"TO:{smtplib.quoteaddr(r)}{rcpt_args}") for r in recipients]
    return recipients, mail, rcpts


def _close_or_reset(smtp: Any, code: int) -> None:
    if code == 421:
        smtp.close()
    else:
        smtp._rset()


def _end(
    smtp: Any, write_body: Callable[[], None], refused: dict[str, tuple[int, bytes]]
) -> dict[str, tuple[int, bytes]]:
    write_body()
    code, resp = smtp.getreply()
    if code != 250:
        _close_or_reset(smtp, code)
        raise smtplib.SMTPDataError(code, resp)
    return refused


def _grouped_replies(
    smtp: Any, from_addr: str, recipients: list[str]
) -> dict[str, tuple[int, bytes]]:
    """The replies to MAIL, each RCPT and DATA sent as one group, in order:
    the refused recipients once DATA got its 354; else the cleanup and the
    exception ``smtplib`` would give."""
    code, resp = smtp.getreply()
    if code != 250:
        if code == 421:
            smtp.close()
        else:
            _drain_group(smtp, len(recipients))
            smtp._rset()
        raise smtplib.SMTPSenderRefused(code, resp, from_addr)
    refused: dict[str, tuple[int, bytes]] = {}
    for recipient in recipients:
        code, resp = smtp.getreply()
        if code not in (250, 251):
            refused[recipient] = (code, resp)
        if code == 421:
            smtp.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    code, resp = smtp.getreply()
    if len(refused) == len(recipients):
        if code == 354:
            _end_empty(smtp)
        smtp._rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    if code != 354:
        _close_or_reset(smtp, code)
        raise smtplib.SMTPDataError(code, resp)
    return refused


def _drain_group(smtp: Any, rcpts: int) -> None:
    """After a refused MAIL: read the replies to the RCPTs and DATA already
    sent, so the next command's reply is its own."""
    code = 0
    try:
        for _ in range(rcpts + 1):
            code, _resp = smtp.getreply()
            if code == 421:
                smtp.close()
                return
    except smtplib.SMTPServerDisconnected:
        return  # closed by smtplib; the refusal is what the caller hears
    if code == 354:
        _end_empty(smtp)


def _end_empty(smtp: Any) -> None:
    """A DATA the server accepted with nobody to send to: end it at once
    (RFC 2920 section 3.1), with no content."""
    try:
        smtp.send(b"." + _CRLF)
        smtp.getreply()
    except smtplib.SMTPServerDisconnected:
        pass  # closed by smtplib; the refusal is what the caller hears


# --- one connection, several messages in flight ------------------------------------


class NotSent(smtplib.SMTPServerDisconnected):
    """The connection was lost before this message's data was sent: the
    server can't have accepted it, and it may go out on another connection."""


class Pending:
    """A message whose data was sent and whose end-of-data reply is unread."""

    def __init__(self, pipeline: Pipeline, ticket: int, refused: dict[str, tuple[int, bytes]]):
        self.pipeline = pipeline
        self.ticket = ticket
        self.refused = refused

    def finish(self) -> dict[str, tuple[int, bytes]]:
        """Read the end-of-data reply: the refused recipients, or the
        exception ``smtplib`` would raise (no RSET: the transaction is over
        either way, and the next message's commands may follow already)."""
        return self.pipeline._finish(self)


_MAKING = threading.Lock()


class Pipeline:
    """The messages in flight on one ``smtplib`` connection, overlapped as
    RFC 2920 allows: a message's envelope group (MAIL, RCPTs, DATA) may be
    written while the previous message's end-of-data reply is still on its
    way, so a connection that always has a next message ready costs about
    one round trip per message.

    Several threads may use one pipeline. Writes go in order (an envelope
    waits until the message before has written the end of its data, for
    the server reads that data first), and so do reads (each message reads
    its replies when the replies before them have been read). Waits are
    bounded by twice the connection's timeout (else 120 seconds).
    """

    def __init__(self, smtp: Any) -> None:
        self.smtp = smtp
        self.cond = threading.Condition()
        self.issued = 0  # envelopes written
        self.turn = 0  # the message whose replies are read next
        self.writing = False  # a message between its envelope and its end of data
        self.failure: BaseException | None = None  # what broke the connection
        self.retired = False  # being closed: no new message on it

    @classmethod
    def of(cls, smtp: Any) -> Pipeline:
        """The pipeline of connection ``smtp`` (made on first use)."""
        with _MAKING:
            pipeline = getattr(smtp, "_mailer_pipeline", None)
            if pipeline is None:
                pipeline = smtp._mailer_pipeline = cls(smtp)
            return pipeline

    @property
    def broken(self) -> bool:
        return self.smtp.sock is None

    @property
    def idle(self) -> bool:
        """Nothing in flight on the connection (it may be closed or reused)."""
        with self.cond:
            return self.broken or (not self.writing and self.turn == self.issued)

    def _bound(self) -> float:
        timeout = self.smtp.timeout
        return 2 * timeout if isinstance(timeout, (int, float)) and timeout > 0 else 120.0

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Wait (holding ``cond``) until ``ready()``; :class:`NotSent` if the
        connection breaks or the bound passes first."""
        deadline = time.monotonic() + self._bound()
        while True:
            if self.broken:
                raise NotSent(
                    f"the connection to the email server was lost before {what}"
                ) from self.failure
            if ready():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.smtp.close()
                self.cond.notify_all()
                raise NotSent(f"gave up waiting for the connection before {what}")
            self.cond.wait(remaining)

    def retire(self) -> None:
        """No new message on this connection; wait (bounded) until the
        messages in flight are done, so that it can be closed."""
        with self.cond:
            self.retired = True
            try:
                self._wait(lambda: not self.writing and self.turn == self.issued, "closing it")
            except NotSent:
                pass  # broken or late: closing it is all that is left

    def send(
        self,
        from_addr: str,
        to_addrs: str | Iterable[str],
        *,
        size: int,
        write_body: Callable[[], None],
        mail_options: Iterable[str] = (),
        rcpt_options: Iterable[str] = (),
    ) -> Pending:
        """Write the envelope group, read its replies in turn, write the
        data: the message is then :class:`Pending` until its ``finish()``.

        Refusals raise as ``smtplib`` would (see the module doc);
        :class:`NotSent` when the connection is lost before the data is sent.
        """
        with self.cond:
            self._wait(lambda: not self.writing, "the message's turn to be written")
            if self.retired:
                raise NotSent("the connection to the email server is being closed")
            self.writing = True
        ticket: list[int] = []  # set once the envelope is written
        try:
            return self._send(
                ticket, from_addr, to_addrs, size, write_body, mail_options, rcpt_options
            )
        except BaseException as exc:
            if self.broken and self.failure is None:
                self.failure = exc
            with self.cond:  # nothing more to read for this message
                if ticket and self.turn == ticket[0]:
                    self.turn = ticket[0] + 1
            raise
        finally:
            with self.cond:
                self.writing = False
                self.cond.notify_all()

    def _send(
        self,
        ticket: list[int],
        from_addr: str,
        to_addrs: str | Iterable[str],
        size: int,
        write_body: Callable[[], None],
        mail_options: Iterable[str],
        rcpt_options: Iterable[str],
    ) -> Pending:
        smtp = self.smtp
        recipients, mail, rcpts = _envelope(smtp, from_addr, to_addrs, size, mail_options, rcpt_options)
        with self.cond:
            ticket.append(self.issued)
            self.issued += 1
        try:
            smtp.send(mail + "".join(rcpts) + "data\r\n")
        except smtplib.SMTPServerDisconnected as exc:
            raise NotSent(str(exc)) from (self.failure or exc)
        with self.cond:
            self._wait(lambda: self.turn == ticket[0], "the message's replies")
        refused = _grouped_replies(smtp, from_addr, recipients)
        try:
            write_body()
        except BaseException:
            # Never end an incomplete message's data: close the connection
            # mid-message, and the server drops what it has.
            smtp.close()
            raise
        return Pending(self, ticket[0], refused)

    def _finish(self, pending: Pending) -> dict[str, tuple[int, bytes]]:
        smtp = self.smtp
        try:
            with self.cond:
                # Ours, unless the connection broke meanwhile.
                if self.turn != pending.ticket or self.broken:
                    raise smtplib.SMTPServerDisconnected(
                        "the connection to the email server was lost before the end of the data"
                    ) from self.failure
            code, resp = smtp.getreply()
            if code != 250:
                if code == 421:
                    smtp.close()
                raise smtplib.SMTPDataError(code, resp)
            return pending.refused
        except BaseException as exc:
            if self.broken and self.failure is None:
                self.failure = exc
            raise
        finally:
            with self.cond:
                if self.turn == pending.ticket:
                    self.turn = pending.ticket + 1
                self.cond.notify_all()
