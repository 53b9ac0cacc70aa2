"""SMTP sink for the benchmark.

Runs an aiosmtpd SMTP server and a tiny line-based control server, both on
loopback, both on ports chosen by the OS, in one asyncio loop (no threads).

For every message received (one DATA command) it records a tuple
``(arrival time.time(), Subject, Message-ID, arrival time.monotonic())``
(both clocks read at the end of DATA, when the message is accepted; the
monotonic one is what the ``quota`` scenario's sliding windows use).  Parsing is deliberately
minimal: only the header block is scanned with one regular expression.
It also counts the SMTP connections it accepted.

Latency options make it answer like a provider some distance away (all in
milliseconds, default 0: answer at once)::

    --connect-delay MS   before the 220 greeting (the cost of a new connection)
    --reply-delay MS     before every other reply (one network round trip)
    --data-delay MS      more at the end of DATA (the provider accepting the message)

With 100 / 20 / 50, a message on an open connection costs MAIL + RCPT +
DATA + end of data = 20 + 20 + 20 + (50 + 20) = 130 ms: one connection
carries at most 7.7 msgs/s, whatever the client does.

A latency line instead (the ``latency`` scenario)::

    --latency MS         a TCP relay in front of the server holds every
                         byte MS ms in each direction (a round trip of
                         2 x MS); the port printed is the relay's
    --pipelining         EHLO offers PIPELINING (RFC 2920)

Pushback (the ``quota`` scenario's second run)::

    --reject-every N     answer "421 4.7.0 Try again later, closing
                         connection" to every Nth end of DATA (counting every
                         end of DATA, refused ones too: N-1 accepted, then one
                         refused) and close the connection; the refused
                         message is not recorded as received
    --reject-stage S     "data" (default) or "mail": refuse the Nth MAIL FROM
                         instead (the message never reaches DATA)

With ``--latency 10 --data-delay 50`` the network, not the server, decides
what pipelining is worth: smtplib pays four round trips per message (130
ms), a client that groups its commands and sends the end of one message
with the next one's envelope about one (70 ms).

On start-up it prints one line to stdout::

    READY <smtp_port> <control_port>

Control protocol (one command per line, one reply line each):

    COUNT                -> "<n>"                 messages received so far
    WAIT <n> <timeout>   -> "<count>"             replies once count >= n or
                                                  after <timeout> seconds
    DUMP <path>          -> "<n>"                 writes "ts\\tsubject\\tmsgid\\tmono"
                                                  lines to <path>
    REJECTS <path>       -> "<n>"                 writes "mono\\tstage\\tmsgid" lines
                                                  to <path>, one per 421 given
                                                  (msgid empty at MAIL FROM)
    MAILS <path>         -> "<n>"                 writes the time.monotonic() of
                                                  every MAIL FROM accepted, one a
                                                  line (transactions begun)
    STATS                -> "<messages> <connections> <max open> <first connect ts>"
                                                  connections accepted, the most
                                                  open at once, time.time() of the
                                                  first one (0 if none)
    RESET                -> "OK"                  forget everything
    QUIT                 -> "OK"                  stop the process

Needs aiosmtpd; run it with a benchmark virtualenv's python.
"""

import argparse
import asyncio
import re
import socket
import sys
import time

from aiosmtpd.smtp import SMTP

_HEADER_RE = re.compile(rb"^(subject|message-id):[ \t]*([^\r\n]*)", re.I | re.M)


REJECT_REPLY = "421 4.7.0 Try again later, closing connection"


class Recorder:
    def __init__(self, data_delay=0.0, reject_every=0, reject_stage="data"):
        self.data_delay = data_delay
        self.reject_every = reject_every
        self.reject_stage = reject_stage
        self.reset()
        self.waiters = []  # list of (threshold, future)

    def reset(self):
        self.records = []
        self.rejects = []  # (monotonic, stage, msgid) per 421 given
        self.mails = []  # time.monotonic() of every MAIL FROM accepted
        self.counted = 0  # ends of DATA (or MAIL FROMs) seen, for --reject-every
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.first_connect = 0.0

    def _refuse(self, stage):
        """Whether this end of DATA / MAIL FROM is the Nth one, to refuse."""
        if not self.reject_every or stage != self.reject_stage:
            return False
        self.counted += 1
        return self.counted % self.reject_every == 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self._refuse("mail"):
            self.rejects.append((time.monotonic(), "mail", b""))
            return REJECT_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.mails.append(time.monotonic())
        return "250 OK"

    def connected(self):
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        if not self.first_connect:
            self.first_connect = time.time()

    def disconnected(self):
        self.open -= 1

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        now, mono = time.time(), time.monotonic()
        content = envelope.original_content or envelope.content or b""
        end = content.find(b"\r\n\r\n")
        if end < 0:
            end = content.find(b"\n\n")
        head = content if end < 0 else content[:end]
        subject = b""
        msgid = b""
        for name, value in _HEADER_RE.findall(head):
            if name[0] in b"sS":
                if not subject:
                    subject = value
            elif not msgid:
                msgid = value
        if self._refuse("data"):
            self.rejects.append((mono, "data", msgid))
            return REJECT_REPLY
        self.records.append((now, subject, msgid, mono))
        if self.waiters:
            self._wake()
        return "250 OK"

    def _wake(self):
        n = len(self.records)
        still = []
        for threshold, fut in self.waiters:
            if fut.done():
                continue
            if n >= threshold:
                fut.set_result(n)
            else:
                still.append((threshold, fut))
        self.waiters = still

    async def wait_for(self, threshold, timeout):
        if len(self.records) >= threshold:
            return len(self.records)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((threshold, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return len(self.records)

    def dump(self, path):
        recs = self.records
        with open(path, "w", encoding="utf-8", errors="replace") as fh:
            for ts, subject, msgid, mono in recs:
                fh.write(
                    "%.6f\t%s\t%s\t%.6f\n"
                    % (
                        ts,
                        subject.decode("utf-8", "replace").replace("\t", " "),
                        msgid.decode("utf-8", "replace").replace("\t", " "),
                        mono,
                    )
                )
        return len(recs)

    def dump_rejects(self, path):
        rejects = self.rejects
        with open(path, "w", encoding="utf-8", errors="replace") as fh:
            for mono, stage, msgid in rejects:
                fh.write("%.6f\t%s\t%s\n" % (mono, stage, msgid.decode("utf-8", "replace").replace("\t", " ")))
        return len(rejects)

    def dump_mails(self, path):
        mails = self.mails
        with open(path, "w") as fh:
            fh.writelines("%.6f\n" % t for t in mails)
        return len(mails)


class PipeliningRecorder(Recorder):
    """The recorder, and EHLO offers PIPELINING (aiosmtpd reads pipelined
    commands in order; it just doesn't say so)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]


async def _pump(reader, writer, delay):
    """Copy reader to writer, each chunk delivered ``delay`` s after it came
    (in order: one queue, one writer per direction)."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
        try:
            writer.close()
        except Exception:
            pass

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            queue.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((loop.time() + delay, None))
        await task


async def start_relay(port, delay):
    """A latency line: a relay on loopback to ``port``, ``delay`` s each way."""

    async def handle(client_reader, client_writer):
        for sock in (client_writer.get_extra_info("socket"),):
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_writer.close()
            return
        sock = server_writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            _pump(client_reader, server_writer, delay), _pump(server_reader, client_writer, delay)
        )

    return await asyncio.start_server(handle, host="127.0.0.1", port=0)


class DistantSMTP(SMTP):
    """aiosmtpd's SMTP server, answering after the configured delays."""

    def __init__(self, recorder, *, connect_delay=0.0, reply_delay=0.0, **kwargs):
        super().__init__(recorder, **kwargs)
        self.recorder = recorder
        self.connect_delay = connect_delay
        self.reply_delay = reply_delay
        self.greeted = False

    def connection_made(self, transport):
        self.recorder.connected()
        super().connection_made(transport)

    def connection_lost(self, error):
        self.recorder.disconnected()
        super().connection_lost(error)

    async def push(self, status):
        # The first reply of a connection is the 220 greeting.
        delay = self.reply_delay if self.greeted else self.connect_delay
        self.greeted = True
        if delay:
            await asyncio.sleep(delay)
        await super().push(status)
        if status == REJECT_REPLY:
            # As a provider pushing back does: the reply, then hang up.
            self.transport.close()


async def main(opts):
    recorder = (PipeliningRecorder if opts.pipelining else Recorder)(
        data_delay=opts.data_delay / 1000.0, reject_every=opts.reject_every, reject_stage=opts.reject_stage
    )
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def smtp_factory():
        # A fixed hostname avoids a getfqdn() call per connection.
        # No size limit: the attachments scenario sends 100 MB attachments.
        return DistantSMTP(
            recorder,
            connect_delay=opts.connect_delay / 1000.0,
            reply_delay=opts.reply_delay / 1000.0,
            hostname="bench-sink",
            ident="bench-sink",
            data_size_limit=None,
            loop=loop,
        )

    smtp_server = await loop.create_server(smtp_factory, host="127.0.0.1", port=0)

    async def control(reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                parts = line.decode().strip().split(" ", 1)
                cmd = parts[0].upper()
                arg = parts[1] if len(parts) > 1 else ""
                if cmd == "COUNT":
                    reply = str(len(recorder.records))
                elif cmd == "WAIT":
                    n, timeout = arg.split()
                    reply = str(await recorder.wait_for(int(n), float(timeout)))
                elif cmd == "DUMP":
                    reply = str(recorder.dump(arg))
                elif cmd == "REJECTS":
                    reply = str(recorder.dump_rejects(arg))
                elif cmd == "MAILS":
                    reply = str(recorder.dump_mails(arg))
                elif cmd == "STATS":
                    reply = "%d %d %d %.6f" % (
                        len(recorder.records),
                        recorder.connections,
                        recorder.max_open,
                        recorder.first_connect,
                    )
                elif cmd == "RESET":
                    recorder.reset()
                    reply = "OK"
                elif cmd == "QUIT":
                    writer.write(b"OK\n")
                    await writer.drain()
                    if not stop.done():
                        stop.set_result(None)
                    break
                else:
                    reply = "ERR unknown command"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    ctl_server = await asyncio.start_server(control, host="127.0.0.1", port=0)
    smtp_port = smtp_server.sockets[0].getsockname()[1]
    if opts.latency:
        relay = await start_relay(smtp_port, opts.latency / 1000.0)
        smtp_port = relay.sockets[0].getsockname()[1]
    ctl_port = ctl_server.sockets[0].getsockname()[1]
    sys.stdout.write("READY %d %d\n" % (smtp_port, ctl_port))
    sys.stdout.flush()
    await stop
    smtp_server.close()
    ctl_server.close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="SMTP sink of the benchmark")
    ap.add_argument("--connect-delay", type=float, default=0.0, metavar="MS", help="before the 220 greeting")
    ap.add_argument("--reply-delay", type=float, default=0.0, metavar="MS", help="before every other reply")
    ap.add_argument("--data-delay", type=float, default=0.0, metavar="MS", help="more at the end of DATA")
    ap.add_argument("--latency", type=float, default=0.0, metavar="MS",
                    help="a relay in front holds every byte MS ms in each direction")
    ap.add_argument("--pipelining", action="store_true", help="EHLO offers PIPELINING")
    ap.add_argument("--reject-every", type=int, default=0, metavar="N",
                    help="answer 421 and hang up at every Nth end of DATA (or MAIL FROM)")
    ap.add_argument("--reject-stage", choices=["data", "mail"], default="data",
                    help="where --reject-every refuses (default: end of DATA)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except KeyboardInterrupt:
        pass
