"""SMTP sink for the benchmark.

Runs an aiosmtpd SMTP server and a tiny line-based control server, both on
loopback, both on ports chosen by the OS, in one asyncio loop (no threads).

For every message received (one DATA command) it records a tuple
``(arrival time.time(), Subject, Message-ID)``.  Parsing is deliberately
minimal: only the header block is scanned with one regular expression.

On start-up it prints one line to stdout::

    READY <smtp_port> <control_port>

Control protocol (one command per line, one reply line each):

    COUNT                -> "<n>"                 messages received so far
    WAIT <n> <timeout>   -> "<count>"             replies once count >= n or
                                                  after <timeout> seconds
    DUMP <path>          -> "<n>"                 writes "ts\\tsubject\\tmsgid"
                                                  lines to <path>
    RESET                -> "OK"                  forget everything
    QUIT                 -> "OK"                  stop the process

Needs aiosmtpd; run it with a benchmark virtualenv's python.
"""

import asyncio
import re
import sys
import time

from aiosmtpd.smtp import SMTP

_HEADER_RE = re.compile(rb"^(subject|message-id):[ \t]*([^\r\n]*)", re.I | re.M)


class Recorder:
    def __init__(self):
        self.records = []
        self.waiters = []  # list of (threshold, future)

    async def handle_DATA(self, server, session, envelope):
        now = time.time()
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
        self.records.append((now, subject, msgid))
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
            for ts, subject, msgid in recs:
                fh.write(
                    "%.6f\t%s\t%s\n"
                    % (
                        ts,
                        subject.decode("utf-8", "replace").replace("\t", " "),
                        msgid.decode("utf-8", "replace").replace("\t", " "),
                    )
                )
        return len(recs)


async def main():
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def smtp_factory():
        # A fixed hostname avoids a getfqdn() call per connection.
        # No size limit: the attachments scenario sends 100 MB attachments.
        return SMTP(recorder, hostname="bench-sink", ident="bench-sink", data_size_limit=None, loop=loop)

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
                elif cmd == "RESET":
                    recorder.records = []
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
    ctl_port = ctl_server.sockets[0].getsockname()[1]
    sys.stdout.write("READY %d %d\n" % (smtp_port, ctl_port))
    sys.stdout.flush()
    await stop
    smtp_server.close()
    ctl_server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
