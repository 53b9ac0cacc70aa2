"""Benchmark worker: runs ONE scenario on ONE database with the `mailer`
package of the virtualenv whose python runs it.

bench/run.py starts it as::

    <venv>/bin/python bench/worker.py info --out result.json
    <venv>/bin/python bench/worker.py scenario NAME --db sqlite|postgres \
        --params '{"n": 10000}' --out result.json

It only uses the public API shared by django-mailer 2.3.2 and our
reimplementation: mailer.send_mail, mailer.backend.DbBackend (through
django.core.mail), the `send_mail` and `runmailer_pg` management commands
and the MAILER_* settings (see project/benchproj/settings.py).  To check that
every row was stored / every row left the queue it counts rows of the
`mailer.Message` model through the app registry.

The result file is JSON: {"ok", "error", "metrics", "checks", "info"}.
"checks" lists correctness checks ({"name", "ok", "detail"}).
"""

import argparse
import base64
import collections
import json
import os
import pickle
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.join(BENCH_DIR, "project")
MANAGE = os.path.join(PROJECT_DIR, "manage.py")
SINK = os.path.join(BENCH_DIR, "smtp_sink.py")

FROM = "sender@bench.example"
SMALL_BODY = (
    "Hello,\n\nthis is a benchmark message of a realistic small size. It has a "
    "couple of lines of text, like a password reset or a notification mail.\n\n"
    "Regards,\nthe benchmark\n"
)


# Every child process this worker starts (SMTP sink, manage.py ...), so that
# none survives the worker, whatever happens (error, SIGTERM, Ctrl-C).
_CHILDREN = []


def kill_children():
    for proc in _CHILDREN:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.wait(5)
            except Exception:
                pass


def big_body(size=20 * 1024):
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor %05d.\n"
    out = []
    total = 0
    i = 0
    while total < size:
        s = line % i
        out.append(s)
        total += len(s)
        i += 1
    return "".join(out)[:size]


# --------------------------------------------------------------------------
# environment / database
# --------------------------------------------------------------------------


class Env:
    """Per-worker temp dir, DB and Django setup."""

    def __init__(self, db, app="mailer"):
        self.db = db
        self.app = app
        self.tmpdir = tempfile.mkdtemp(prefix="mailer-bench-")
        self.pg_name = os.environ.get("BENCH_PG_NAME", "mailer_bench")
        os.environ["DJANGO_SETTINGS_MODULE"] = "benchproj.settings"
        os.environ["BENCH_DB"] = db
        os.environ["BENCH_APP"] = app
        os.environ["BENCH_SQLITE_PATH"] = os.path.join(self.tmpdir, "bench.sqlite3")
        os.environ["BENCH_LOCK_PATH"] = os.path.join(self.tmpdir, "send_mail")
        os.environ["BENCH_PG_NAME"] = self.pg_name
        os.environ.setdefault("BENCH_MAILER_BACKEND", "smtp")
        os.environ.setdefault("BENCH_USE_FILE_LOCK", "1")
        if PROJECT_DIR not in sys.path:
            sys.path.insert(0, PROJECT_DIR)
        self.django_ready = False

    # -- raw PostgreSQL admin connection (not through Django) --
    def _pg_admin(self, sql_list):
        try:
            import psycopg

            conn = psycopg.connect(
                host=os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
                port=os.environ.get("BENCH_PG_PORT", "5432"),
                user=os.environ.get("BENCH_PG_USER", "postgres"),
                password=os.environ.get("BENCH_PG_PASSWORD", ""),
                dbname="postgres",
                autocommit=True,
            )
        except ImportError:
            import psycopg2

            conn = psycopg2.connect(
                host=os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
                port=os.environ.get("BENCH_PG_PORT", "5432"),
                user=os.environ.get("BENCH_PG_USER", "postgres"),
                password=os.environ.get("BENCH_PG_PASSWORD", ""),
                dbname="postgres",
            )
            conn.autocommit = True
        try:
            cur = conn.cursor()
            for sql in sql_list:
                cur.execute(sql)
        finally:
            conn.close()

    def fresh_db(self):
        """(Re)create an empty database and migrate it."""
        if self.django_ready:
            from django.db import connections

            connections.close_all()
        if self.db == "postgres":
            name = self.pg_name.replace('"', "")
            self._pg_admin(['DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name, 'CREATE DATABASE "%s"' % name])
        else:
            path = os.environ["BENCH_SQLITE_PATH"]
            for suffix in ("", "-journal", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        self.setup_django()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)

    def setup_django(self):
        if not self.django_ready:
            import django

            django.setup()
            self.django_ready = True

    def cleanup(self):
        if self.django_ready:
            try:
                from django.db import connections

                connections.close_all()
            except Exception:
                pass
        if self.db == "postgres" and os.environ.get("BENCH_KEEP_DB") != "1":
            try:
                self._pg_admin(['DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.pg_name.replace('"', "")])
            except Exception:
                pass
        import shutil

        shutil.rmtree(self.tmpdir, ignore_errors=True)


def message_model():
    from django.apps import apps

    return apps.get_model("mailer", "Message")


def queue_count():
    return message_model().objects.count()


def clear_queue():
    from django.db import connection

    table = message_model()._meta.db_table
    with connection.cursor() as cur:
        cur.execute("DELETE FROM %s" % connection.ops.quote_name(table))


# --------------------------------------------------------------------------
# SMTP sink control
# --------------------------------------------------------------------------


class Sink:
    def __init__(self, args=()):
        self.proc = subprocess.Popen(
            [sys.executable, SINK] + list(args),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        _CHILDREN.append(self.proc)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError("SMTP sink did not start (got %r)" % line)
        _, smtp_port, ctl_port = line.split()
        self.port = int(smtp_port)
        self.sock = socket.create_connection(("127.0.0.1", int(ctl_port)))
        self.rfile = self.sock.makefile("r", encoding="utf-8")
        self.dump_path = tempfile.mktemp(prefix="mailer-bench-sink-", suffix=".tsv")

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\n")
        reply = self.rfile.readline()
        if not reply:
            raise RuntimeError("SMTP sink closed the control connection")
        return reply.strip()

    def count(self):
        return int(self.cmd("COUNT"))

    def wait(self, n, timeout):
        return int(self.cmd("WAIT %d %f" % (n, timeout)))

    def reset(self):
        self.cmd("RESET")

    def cpu_s(self):
        """CPU time (user + system) the sink process used so far (Linux)."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stats(self):
        """Messages, connections accepted, most open at once, time of the first."""
        messages, connections, max_open, first = self.cmd("STATS").split()
        return {
            "messages": int(messages),
            "connections": int(connections),
            "max_open": int(max_open),
            "first_connect": float(first),
        }

    def records(self, monotonic=False):
        """List of (arrival time.time(), subject, message_id); with
        ``monotonic``, (arrival time.monotonic(), subject, message_id)."""
        self.cmd("DUMP " + self.dump_path)
        out = []
        with open(self.dump_path, encoding="utf-8") as fh:
            for line in fh:
                ts, subject, msgid, mono = line.rstrip("\n").split("\t")
                out.append((float(mono if monotonic else ts), subject, msgid))
        os.remove(self.dump_path)
        return out

    def mails(self):
        """time.monotonic() of every MAIL FROM the sink accepted."""
        self.cmd("MAILS " + self.dump_path)
        with open(self.dump_path) as fh:
            out = [float(line) for line in fh if line.strip()]
        os.remove(self.dump_path)
        return out

    def rejects(self):
        """List of (time.monotonic(), stage, message_id), one per 421 given."""
        self.cmd("REJECTS " + self.dump_path)
        out = []
        with open(self.dump_path, encoding="utf-8") as fh:
            for line in fh:
                mono, stage, msgid = line.rstrip("\n").split("\t")
                out.append((float(mono), stage, msgid))
        os.remove(self.dump_path)
        return out

    def close(self):
        try:
            self.cmd("QUIT")
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.sock.close()
        except Exception:
            pass


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_emails(tag, start, count, body):
    from django.core.mail import EmailMessage

    return [
        EmailMessage(
            subject="bench %s %d" % (tag, i),
            body=body,
            from_email=FROM,
            to=["rcpt%d@bench.example" % i],
            headers={"Message-ID": msgid(tag, i)},
        )
        for i in range(start, start + count)
    ]


def msgid(tag, i):
    return "<bench.%s.%d@bench.example>" % (tag, i)


def fill_queue(tag, n, body, batch=500):
    """Queue n messages through DbBackend (bulk), with preset Message-IDs."""
    from django.core.mail import get_connection

    backend = get_connection("mailer.backend.DbBackend")
    done = 0
    while done < n:
        k = min(batch, n - done)
        backend.send_messages(make_emails(tag, done, k, body))
        done += k


class ChildResult:
    def __init__(self, wall, rc, maxrss_mb, log_tail):
        self.wall = wall
        self.rc = rc
        self.maxrss_mb = maxrss_mb
        self.log_tail = log_tail


def _tail(path, n=2000):
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


# Runs manage.py and, at exit, writes the process's own peak RSS (VmHWM of
# its own address space) to $BENCH_RSS_FILE. The rusage os.wait4 reports is
# not enough: Linux counts in a child's ru_maxrss the address space it was
# forked from (this worker's RSS at the time, over 200 MB after some
# scenarios), so a small command looked as big as the worker.
RSS_WRAPPER = """
import atexit, os, runpy, sys

def _report():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(os.environ["BENCH_RSS_FILE"], "w") as out:
                    out.write(line.split()[1])

atexit.register(_report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as "python manage.py" does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_manage(args, env_extra, tmpdir, label):
    env = os.environ.copy()
    env.update(env_extra)
    log_path = os.path.join(tmpdir, "%s.log" % label)
    log = open(log_path, "wb")
    rss_file = os.path.join(tmpdir, "%s.rss" % label)
    if os.path.exists(rss_file):
        os.unlink(rss_file)
    wrapper = sys.platform.startswith("linux")
    if wrapper:
        env["BENCH_RSS_FILE"] = rss_file
    proc = subprocess.Popen(
        [sys.executable] + (["-c", RSS_WRAPPER] if wrapper else []) + [MANAGE] + list(args),
        cwd=tmpdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    _CHILDREN.append(proc)
    proc.bench_log = log_path
    proc.bench_rss_file = rss_file
    return proc


def wait_child(proc, timeout):
    """Wait for proc with os.wait4 (gives that child's own peak RSS)."""
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:
        kill()
        raise
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.bench_cpu_s = ru.ru_utime + ru.ru_stime
    tail = _tail(proc.bench_log)
    if killed:
        tail = "[killed after %.0f s timeout]\n%s" % (timeout, tail)
    try:
        with open(proc.bench_rss_file) as fh:
            return proc.returncode, int(fh.read()) / 1024.0, tail  # VmHWM, KiB
    except (OSError, ValueError):
        # Linux reports ru_maxrss in KiB (an upper bound: see RSS_WRAPPER)
        return proc.returncode, ru.ru_maxrss / 1024.0, tail


def has_exited(proc):
    """Whether the child exited, without reaping it (wait_child still can)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def run_manage(args, env_extra, tmpdir, label, timeout):
    t0 = time.perf_counter()
    proc = start_manage(args, env_extra, tmpdir, label)
    rc, rss, tail = wait_child(proc, timeout)
    return ChildResult(time.perf_counter() - t0, rc, rss, tail)


def check_arrivals(records, expected, field):
    """Compare sink records with the expected keys (field 1=subject, 2=msgid)."""
    counts = collections.Counter(r[field] for r in records)
    expected = set(expected)
    duplicates = sum(c - 1 for k, c in counts.items() if c > 1)
    lost = len(expected - set(counts))
    unexpected = sum(c for k, c in counts.items() if k not in expected)
    return {
        "received": len(records),
        "unique": len(counts),
        "duplicates": duplicates,
        "lost": lost,
        "unexpected": unexpected,
    }


def arrival_check(name, stats):
    ok = stats["duplicates"] == 0 and stats["lost"] == 0 and stats["unexpected"] == 0
    return {
        "name": name,
        "ok": ok,
        "detail": "received %(received)d, duplicates %(duplicates)d, lost %(lost)d, unexpected %(unexpected)d"
        % stats,
    }


def simple_check(name, ok, detail):
    return {"name": name, "ok": bool(ok), "detail": detail}


def percentile(values, p):
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = (len(vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def child_timeout(n, rate_floor=20.0, minimum=120.0):
    """Generous kill timeout for a drain of n messages."""
    return max(minimum, n / rate_floor)


# --------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------


def sc_enqueue(env, p, res):
    """Bulk enqueue, single send_mail, raw INSERT reference."""
    n = int(p["n"])
    env.fresh_db()
    from django.core import mail
    from django.core.mail import EmailMessage
    from django.db import connection
    from django.utils import timezone

    import mailer

    queue_count()  # warm the connection

    # 1. send_mass_mail through EMAIL_BACKEND = mailer.backend.DbBackend
    # A bulk is a fraction of a second: the median of 5, each into an
    # emptied queue, so that one scheduling hiccup doesn't decide the figure.
    datatuple = [("bench bulk %d" % i, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i]) for i in range(n)]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sent = mail.send_mass_mail(datatuple)
        times.append(time.perf_counter() - t0)
        c = queue_count()
        res["checks"].append(simple_check("bulk rows stored", c == n and sent == n, "%d rows, returned %r, want %d" % (c, sent, n)))
        clear_queue()
    t_bulk = statistics.median(times)
    res["metrics"]["bulk_s"] = t_bulk
    res["metrics"]["bulk_rows_per_s"] = n / t_bulk

    # 1b. The floor of any bulk: the database taking the same number of
    # 2.3.2-shaped rows, serialized before the clock starts, in one
    # transaction (executemany: psycopg 3 pipelines it, sqlite3 loops in C).
    # No queue can queue faster than this; 2.3.2's bulk time over it is the
    # most any "ours / 2.3.2" ratio can reach in this run.
    from django.db import transaction

    raw_sql, raw_payloads = _raw_insert_reference(n)
    floor_times = []
    for _ in range(3):
        stamp = timezone.now()
        t0 = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cur:
            cur.executemany(raw_sql, [[data, stamp, 2, 0] for data in raw_payloads])
        floor_times.append(time.perf_counter() - t0)
        with connection.cursor() as cur:
            cur.execute("DELETE FROM %s" % connection.ops.quote_name("bench_raw_message"))
    res["metrics"]["bulk_floor_rows_per_s"] = n / statistics.median(floor_times)

    # 2. mailer.send_mail, one call (one autocommit transaction) each, in
    # blocks of 100 alternating with the raw INSERT reference (3. below) and
    # with a raw INSERT of the row send_mail writes, into the queue table
    # itself (3b.), so that load drift on a shared machine hits all alike.
    own_sql, own_params, data_at = _own_row_reference()
    now = timezone.now
    t_single = t_raw = t_own = t_least = 0.0
    block = 100
    with connection.cursor() as cur:
        for start in range(0, n, block):
            stop = min(n, start + block)
            t0 = time.perf_counter()
            for i in range(start, stop):
                mailer.send_mail("bench single %d" % i, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
            t1 = time.perf_counter()
            for data in raw_payloads[start:stop]:
                cur.execute(raw_sql, [data, now(), 2, 0])
            t2 = time.perf_counter()
            for _ in range(start, stop):
                cur.execute(own_sql, own_params)
            t3 = time.perf_counter()
            # 3c. The least any send_mail storing 2.3.2's form in this row
            # does: build Django's message, pickle and base64 it, INSERT.
            for i in range(start, stop):
                email = EmailMessage("bench least %d" % i, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
                params = own_params.copy()
                params[data_at] = base64.encodebytes(pickle.dumps(email)).decode("ascii")
                cur.execute(own_sql, params)
            t_single += t1 - t0
            t_raw += t2 - t1
            t_own += t3 - t2
            t_least += time.perf_counter() - t3
    c = queue_count()
    res["checks"].append(simple_check("single rows stored", c == 3 * n + 1, "%d rows, want %d" % (c, 3 * n + 1)))
    res["metrics"]["least_single_rows_per_s"] = n / t_least
    res["metrics"]["least_single_vs_raw"] = t_raw / t_least
    res["metrics"]["single_vs_least"] = t_least / t_single
    res["metrics"]["own_row_insert_rows_per_s"] = n / t_own
    res["metrics"]["single_vs_own_row"] = (n / t_single) / (n / t_own)
    res["metrics"]["own_row_vs_raw"] = (n / t_own) / (n / t_raw)
    res["metrics"]["single_s"] = t_single
    res["metrics"]["single_rows_per_s"] = n / t_single
    clear_queue()

    # 2b. statements per send_mail call, counted outside the timed loop
    # (capturing makes every statement slower).
    from django.test.utils import CaptureQueriesContext

    calls = 20
    with CaptureQueriesContext(connection) as captured:
        for i in range(calls):
            mailer.send_mail("bench count %d" % i, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
    res["metrics"]["single_statements"] = len(captured.captured_queries) / calls
    clear_queue()

    # 3. the reference's figures (measured above, block by block)
    with connection.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM %s" % connection.ops.quote_name("bench_raw_message"))
        c = cur.fetchone()[0]
    res["checks"].append(simple_check("raw rows stored", c == n, "%d rows, want %d" % (c, n)))
    res["metrics"]["raw_insert_s"] = t_raw
    res["metrics"]["raw_insert_rows_per_s"] = n / t_raw
    res["metrics"]["single_vs_raw"] = (n / t_single) / (n / t_raw)
    res["metrics"]["bulk_vs_raw"] = (n / t_bulk) / (n / t_raw)


def _own_row_reference():
    """(sql, params, index of message_data): a raw INSERT of the very row one mailer.send_mail call
    writes (queued once here, read back), into the package's own queue
    table: the database's share of a send_mail, with that package's columns
    and indexes, and no Python."""
    from django.db import connection

    import mailer
    from mailer.models import Message

    mailer.send_mail("bench own row", SMALL_BODY, FROM, ["rcpt@bench.example"])
    row = Message.objects.order_by("-id")[0]
    fields = [f for f in Message._meta.concrete_fields if not f.primary_key]
    qn = connection.ops.quote_name
    sql = "INSERT INTO %s (%s) VALUES (%s)" % (
        qn(Message._meta.db_table),
        ", ".join(qn(f.column) for f in fields),
        ", ".join(["%s"] * len(fields)),
    )
    params = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in fields]
    return sql, params, [f.attname for f in fields].index("message_data")


def _raw_insert_reference(n):
    """The raw single-row INSERT reference: a bench-owned table mirroring
    2.3.2's mailer_message, and n payloads of the kind 2.3.2 stores (base64
    of a pickled EmailMessage of the same content), serialised before any
    clock starts. Returns (sql, payloads)."""
    from django.core.mail import EmailMessage
    from django.db import connection

    qn = connection.ops.quote_name
    table = qn("bench_raw_message")
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute(
                "CREATE TABLE %s (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
                "message_data text NOT NULL, when_added timestamp with time zone NOT NULL, "
                "priority smallint NOT NULL CHECK (priority >= 0), retry_count integer NOT NULL)" % table
            )
        else:
            cur.execute(
                "CREATE TABLE %s (id integer NOT NULL PRIMARY KEY AUTOINCREMENT, "
                "message_data text NOT NULL, when_added datetime NOT NULL, "
                "priority smallint unsigned NOT NULL CHECK (priority >= 0), retry_count integer NOT NULL)" % table
            )
    payloads = [
        base64.encodebytes(
            pickle.dumps(EmailMessage("bench raw %d" % i, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i]))
        ).decode("ascii")
        for i in range(n)
    ]
    sql = "INSERT INTO %s (message_data, when_added, priority, retry_count) VALUES (%%s, %%s, %%s, %%s)" % table
    return sql, payloads


def sc_drain(env, p, res):
    """manage.py send_mail -> SMTP sink, plus the smtplib one-connection ceiling."""
    n = int(p["n"])
    env.fresh_db()
    sink = Sink()
    try:
        fill_queue("drain", n, SMALL_BODY)
        c = queue_count()
        res["checks"].append(simple_check("queue filled", c == n, "%d rows, want %d" % (c, n)))
        r = run_manage(
            ["send_mail"],
            {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port)},
            env.tmpdir,
            "send_mail",
            child_timeout(n),
        )
        res["checks"].append(simple_check("send_mail exit status", r.rc == 0, "rc=%s %s" % (r.rc, r.log_tail[-800:] if r.rc else "")))
        sink.wait(n, 10)
        stats = check_arrivals(sink.records(), [msgid("drain", i) for i in range(n)], 2)
        res["checks"].append(arrival_check("drain: every message arrived exactly once", stats))
        left = queue_count()
        res["checks"].append(simple_check("drain: queue empty afterwards", left == 0, "%d rows left" % left))
        res["metrics"]["drain_wall_s"] = r.wall
        res["metrics"]["drain_msgs_per_s"] = n / r.wall
        # The command's start-up (Python, Django, the first connection): the
        # same command on an empty queue. Taken off both sides' drain times
        # for the pass-only figures below.
        r0 = run_manage(["send_mail"], {"BENCH_MAILER_BACKEND": "dummy"}, env.tmpdir, "send_mail_empty", 300)
        startup = r0.wall if r0.rc == 0 else 0.0
        res["metrics"]["startup_s"] = startup
        t_pass = r.wall - startup
        res["metrics"]["drain_pass_msgs_per_s"] = n / t_pass
        res["metrics"]["drain_peak_rss_mb"] = r.maxrss_mb

        # Ceiling: plain smtplib, ONE connection, the same n messages,
        # rendered to bytes before the clock starts.
        sink.reset()
        emails = make_emails("drain", 0, n, SMALL_BODY)
        payloads = [(e.to, e.message().as_bytes()) for e in emails]
        del emails
        t0 = time.perf_counter()
        client = smtplib.SMTP("127.0.0.1", sink.port, local_hostname="bench-client", timeout=60)
        for to, data in payloads:
            client.sendmail(FROM, to, data)
        client.quit()
        t_ceiling = time.perf_counter() - t0
        sink.wait(n, 10)
        stats = check_arrivals(sink.records(), [msgid("drain", i) for i in range(n)], 2)
        res["checks"].append(arrival_check("ceiling: every message arrived exactly once", stats))
        res["metrics"]["ceiling_s"] = t_ceiling
        res["metrics"]["ceiling_msgs_per_s"] = n / t_ceiling
        res["metrics"]["drain_vs_ceiling"] = (n / r.wall) / (n / t_ceiling)

        # Ceiling 2: Django's own SMTP backend sending the same n messages
        # over ONE connection, no queue: what the drain costs beyond sending.
        from django.core.mail.backends.smtp import EmailBackend
        from django.core.mail.utils import DNS_NAME

        str(DNS_NAME)  # resolved once per process, as in the drain
        sink.reset()
        emails = make_emails("drain", 0, n, SMALL_BODY)
        t0 = time.perf_counter()
        backend = EmailBackend(host="127.0.0.1", port=sink.port, timeout=60)
        sent = backend.send_messages(emails)
        t_django = time.perf_counter() - t0
        del emails
        sink.wait(n, 10)
        stats = check_arrivals(sink.records(), [msgid("drain", i) for i in range(n)], 2)
        res["checks"].append(arrival_check("Django backend: every message arrived exactly once", stats))
        res["checks"].append(simple_check("Django backend: sent count", sent == n, "sent %r, want %d" % (sent, n)))
        res["metrics"]["django_backend_s"] = t_django
        res["metrics"]["django_backend_msgs_per_s"] = n / t_django
        res["metrics"]["drain_vs_django"] = (n / r.wall) / (n / t_django)
        res["metrics"]["drain_pass_vs_django"] = t_django / t_pass

        # The floor of "one committed transaction per sent message": k
        # single-row INSERTs in autocommit (one round trip and one durable
        # commit each). Even a queue costing nothing else could not beat
        # 1 / (1/django + 1/commits) msgs/s: that ratio to the Django backend
        # is the limit the drain can reach on this machine.
        from django.db import connection, transaction

        k = min(n, 2000)
        table = connection.ops.quote_name("bench_commit_floor")
        with connection.cursor() as cur:
            cur.execute("CREATE TABLE %s (id integer PRIMARY KEY, data text NOT NULL)" % table)
            t0 = time.perf_counter()
            for i in range(k):
                cur.execute("INSERT INTO %s (id, data) VALUES (%%s, %%s)" % table, [i, SMALL_BODY])
            t_commits = time.perf_counter() - t0
            # Any drain must also learn which message to send before it
            # commits its outcome: at least one more statement per message.
            # The cheapest (the newest row by primary key), then the same
            # durable INSERT: the floor of "claim, then record and commit".
            newest = "SELECT id FROM %s ORDER BY id DESC LIMIT 1" % table
            t0 = time.perf_counter()
            for i in range(k, 2 * k):
                cur.execute(newest)
                cur.fetchone()
                cur.execute("INSERT INTO %s (id, data) VALUES (%%s, %%s)" % table, [i, SMALL_BODY])
            t_claims = time.perf_counter() - t0
            cur.execute("DROP TABLE %s" % table)
        commits_per_s = k / t_commits
        django_per_s = n / t_django
        res["metrics"]["commits_per_s"] = commits_per_s
        res["metrics"]["drain_limit_vs_django"] = 1 / (1 + django_per_s / commits_per_s)
        res["metrics"]["claim_commits_per_s"] = k / t_claims
        res["metrics"]["claim_limit_vs_django"] = 1 / (1 + django_per_s / (k / t_claims))

        # The least drain: the simplest queue keeping one committed
        # transaction per sent message, written straight on Django's cursor
        # in this process: per message, in one transaction, claim the oldest
        # row (FOR UPDATE SKIP LOCKED where rows lock), unpickle it (no
        # allow-list), send it with Django's backend on one kept connection,
        # log it, delete it, commit. No drain built on Django's connections
        # can do less per message; its ratio to Django's backend is what the
        # drain target can reach on this machine.
        sink.reset()
        least_q = connection.ops.quote_name("bench_least_queue")
        least_log = connection.ops.quote_name("bench_least_log")
        lock = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
        with connection.cursor() as cur:
            cur.execute("CREATE TABLE %s (id integer PRIMARY KEY, message_data text NOT NULL)" % least_q)
            cur.execute(
                "CREATE TABLE %s (id integer PRIMARY KEY, message_data text NOT NULL, result text NOT NULL)" % least_log
            )
            cur.executemany(
                "INSERT INTO %s (id, message_data) VALUES (%%s, %%s)" % least_q,
                [
                    (i, base64.encodebytes(pickle.dumps(e)).decode("ascii"))
                    for i, e in enumerate(make_emails("least", 0, n, SMALL_BODY))
                ],
            )
        claim_sql = "SELECT id, message_data FROM %s ORDER BY id LIMIT 1%s" % (least_q, lock)
        log_sql = "INSERT INTO %s (id, message_data, result) VALUES (%%s, %%s, %%s)" % least_log
        delete_sql = "DELETE FROM %s WHERE id = %%s" % least_q
        backend = EmailBackend(host="127.0.0.1", port=sink.port, timeout=60)
        t0 = time.perf_counter()
        backend.open()
        with connection.cursor() as cur:
            while True:
                with transaction.atomic():
                    cur.execute(claim_sql)
                    row = cur.fetchone()
                    if row is None:
                        break
                    backend.send_messages([pickle.loads(base64.decodebytes(row[1].encode("ascii")))])
                    cur.execute(log_sql, [row[0], row[1], "1"])
                    cur.execute(delete_sql, [row[0]])
        backend.close()
        t_least = time.perf_counter() - t0
        sink.wait(n, 10)
        stats = check_arrivals(sink.records(), [msgid("least", i) for i in range(n)], 2)
        res["checks"].append(arrival_check("least drain: every message arrived exactly once", stats))
        with connection.cursor() as cur:
            cur.execute("DROP TABLE %s" % least_q)
            cur.execute("DROP TABLE %s" % least_log)
        res["metrics"]["least_drain_msgs_per_s"] = n / t_least
        res["metrics"]["least_drain_vs_django"] = t_django / t_least

        # The limit of this side's own queue machinery: the same drain with
        # Django's dummy backend (claim, decode, log, delete, commit; no
        # SMTP) takes 1/machinery s per message, so no drain of this side
        # can beat 1 / (1/django + 1/machinery) msgs/s, whatever SMTP costs.
        fill_queue("drainq", n, SMALL_BODY)
        r2 = run_manage(["send_mail"], {"BENCH_MAILER_BACKEND": "dummy"}, env.tmpdir, "send_mail_dummy", child_timeout(n))
        res["checks"].append(simple_check("dummy drain exit status", r2.rc == 0, "rc=%s %s" % (r2.rc, r2.log_tail[-800:] if r2.rc else "")))
        left = queue_count()
        res["checks"].append(simple_check("dummy drain: queue empty afterwards", left == 0, "%d rows left" % left))
        machinery_per_s = n / (r2.wall - startup)
        res["metrics"]["machinery_msgs_per_s"] = machinery_per_s
        res["metrics"]["machinery_limit_vs_django"] = 1 / (1 + django_per_s / machinery_per_s)
    finally:
        sink.close()


def sc_dummy(env, p, res):
    """manage.py send_mail with MAILER_EMAIL_BACKEND = dummy backend."""
    n = int(p["n"])
    env.fresh_db()
    fill_queue("dummy", n, SMALL_BODY)
    c = queue_count()
    res["checks"].append(simple_check("queue filled", c == n, "%d rows, want %d" % (c, n)))
    r = run_manage(["send_mail"], {"BENCH_MAILER_BACKEND": "dummy"}, env.tmpdir, "send_mail", child_timeout(n))
    res["checks"].append(simple_check("send_mail exit status", r.rc == 0, "rc=%s %s" % (r.rc, r.log_tail[-800:] if r.rc else "")))
    left = queue_count()
    res["checks"].append(simple_check("queue empty afterwards", left == 0, "%d rows left" % left))
    res["metrics"]["wall_s"] = r.wall
    res["metrics"]["msgs_per_s"] = n / r.wall
    res["metrics"]["peak_rss_mb"] = r.maxrss_mb


def sc_memory(env, p, res):
    """Peak RSS of manage.py send_mail (dummy backend) for several queue sizes."""
    sizes = [int(s) for s in p["sizes"]]
    body = big_body(int(p.get("body_bytes", 20 * 1024)))
    env.fresh_db()
    r = run_manage(["send_mail"], {"BENCH_MAILER_BACKEND": "dummy"}, env.tmpdir, "send_mail_empty", 300)
    res["checks"].append(simple_check("empty queue: exit status", r.rc == 0, "rc=%s %s" % (r.rc, r.log_tail[-800:] if r.rc else "")))
    res["metrics"]["rss_mb_empty"] = r.maxrss_mb
    rss = {}
    for size in sizes:
        env.fresh_db()
        t0 = time.perf_counter()
        fill_queue("mem%d" % size, size, body, batch=250)
        t_fill = time.perf_counter() - t0
        c = queue_count()
        res["checks"].append(simple_check("%d: queue filled" % size, c == size, "%d rows, want %d" % (c, size)))
        r = run_manage(
            ["send_mail"], {"BENCH_MAILER_BACKEND": "dummy"}, env.tmpdir, "send_mail_%d" % size, child_timeout(size, 5.0)
        )
        res["checks"].append(simple_check("%d: exit status" % size, r.rc == 0, "rc=%s %s" % (r.rc, r.log_tail[-800:] if r.rc else "")))
        left = queue_count()
        res["checks"].append(simple_check("%d: queue empty afterwards" % size, left == 0, "%d rows left" % left))
        rss[size] = r.maxrss_mb
        res["metrics"]["rss_mb_%d" % size] = r.maxrss_mb
        res["metrics"]["wall_s_%d" % size] = r.wall
        res["metrics"]["msgs_per_s_%d" % size] = size / r.wall
        res["metrics"]["fill_s_%d" % size] = t_fill
    lo, hi = min(sizes), max(sizes)
    res["metrics"]["rss_ratio"] = rss[hi] / rss[lo]
    res["info"]["sizes"] = sizes


def sc_runmailer_pg(env, p, res):
    """runmailer_pg: commit-to-arrival latency of single messages, then a burst."""
    from django.db import transaction

    import mailer

    if env.db != "postgres":
        raise RuntimeError("runmailer_pg needs PostgreSQL")
    n_single = int(p["singles"])
    n_burst = int(p["burst"])
    pause = float(p.get("pause", 0.05))
    env.fresh_db()
    sink = Sink()
    proc = None
    completed = False
    try:
        proc = start_manage(
            ["runmailer_pg"],
            {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port)},
            env.tmpdir,
            "runmailer_pg",
        )
        def wait_arrivals(count, timeout):
            """Wait until the sink has `count` messages; fail fast if the loop died."""
            deadline = time.time() + timeout
            while True:
                got = sink.wait(count, min(0.5, max(0.0, deadline - time.time())))
                if got >= count:
                    return True
                if proc.poll() is not None:
                    raise RuntimeError(
                        "runmailer_pg exited early (rc=%r): %s" % (proc.returncode, _tail(proc.bench_log)[-1500:])
                    )
                if time.time() >= deadline:
                    return False

        # Warm-up message: proves the loop is up (whatever it does at
        # start-up) before anything is timed.
        mailer.send_mail("bench warmup 0", SMALL_BODY, FROM, ["warmup@bench.example"])
        if not wait_arrivals(1, 60):
            raise RuntimeError(
                "runmailer_pg did not deliver the warm-up message within 60 s: %s" % _tail(proc.bench_log)[-1500:]
            )
        time.sleep(0.5)

        commit_ts = {}
        late = 0
        for i in range(n_single):
            subject = "bench single %d" % i
            mailer.send_mail(subject, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
            commit_ts[subject] = time.time()
            if not wait_arrivals(2 + i, 30):
                late += 1
                if late >= 3:
                    raise RuntimeError("3 single messages did not arrive within 30 s each; giving up")
            time.sleep(pause)
        res["checks"].append(simple_check("singles arrived within 30 s each", late == 0, "%d late" % late))

        burst_subjects = ["bench burst %d" % i for i in range(n_burst)]
        with transaction.atomic():
            for i, subject in enumerate(burst_subjects):
                mailer.send_mail(subject, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
        t_commit = time.time()
        total = 1 + n_single + n_burst
        wait_arrivals(total, child_timeout(n_burst))
        records = sink.records()

        expected = ["bench warmup 0"] + list(commit_ts) + burst_subjects
        stats = check_arrivals(records, expected, 1)
        res["checks"].append(arrival_check("every message arrived exactly once", stats))
        mids = collections.Counter(r[2] for r in records)
        res["checks"].append(
            simple_check("distinct Message-IDs", all(mids.values()) and max(mids.values()) == 1 and "" not in mids, "%d ids for %d messages" % (len(mids), len(records)))
        )

        first_arrival = {}
        for ts, subject, _ in records:
            first_arrival.setdefault(subject, ts)
        lat = [(first_arrival[s] - t) * 1000.0 for s, t in commit_ts.items() if s in first_arrival]
        burst_arrivals = [first_arrival[s] for s in burst_subjects if s in first_arrival]
        if lat:
            res["metrics"]["latency_p50_ms"] = percentile(lat, 50)
            res["metrics"]["latency_p95_ms"] = percentile(lat, 95)
            res["metrics"]["latency_p99_ms"] = percentile(lat, 99)
            res["metrics"]["latency_max_ms"] = max(lat)
            res["metrics"]["latency_min_ms"] = min(lat)
        if burst_arrivals and len(burst_arrivals) == n_burst:
            burst_s = max(burst_arrivals) - t_commit
            res["metrics"]["burst_s"] = burst_s
            res["metrics"]["burst_msgs_per_s"] = n_burst / burst_s
        # the row of the last message is deleted just after it is sent
        deadline = time.time() + 10
        left = queue_count()
        while left and time.time() < deadline:
            time.sleep(0.1)
            left = queue_count()
        res["checks"].append(simple_check("queue empty afterwards", left == 0, "%d rows left" % left))

        # The burst's floor with one connection: Django's own SMTP backend
        # sending as many ready messages over one connection, no queue.
        from django.core.mail.backends.smtp import EmailBackend

        emails = make_emails("burstref", 0, n_burst, SMALL_BODY)
        t0 = time.perf_counter()
        EmailBackend(host="127.0.0.1", port=sink.port, timeout=60).send_messages(emails)
        res["metrics"]["burst_django_backend_s"] = time.perf_counter() - t0

        # And over four connections, one thread each (a quarter of the
        # messages each), as one process with --concurrency 4 would.
        quarters = [emails[k::4] for k in range(4)]
        threads = [
            threading.Thread(
                target=EmailBackend(host="127.0.0.1", port=sink.port, timeout=60).send_messages, args=(q,)
            )
            for q in quarters
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res["metrics"]["burst_django_backend_c4_s"] = time.perf_counter() - t0
        del emails, quarters

        # Where the package can (ours: --concurrency), the same burst over
        # four connections from one runmailer_pg.
        if _has_concurrency():
            os.killpg(proc.pid, signal.SIGTERM)
            wait_child(proc, 30)
            sink.reset()
            proc = start_manage(
                ["runmailer_pg", "--concurrency", "4"],
                {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port)},
                env.tmpdir,
                "runmailer_pg_c4",
            )
            mailer.send_mail("bench warmup c4", SMALL_BODY, FROM, ["warmup@bench.example"])
            if not wait_arrivals(1, 60):
                raise RuntimeError("runmailer_pg --concurrency 4 did not start: %s" % _tail(proc.bench_log)[-1500:])
            time.sleep(0.5)
            subjects = ["bench burst4 %d" % i for i in range(n_burst)]
            with transaction.atomic():
                for i, subject in enumerate(subjects):
                    mailer.send_mail(subject, SMALL_BODY, FROM, ["rcpt%d@bench.example" % i])
            t_commit = time.time()
            wait_arrivals(1 + n_burst, child_timeout(n_burst))
            records = sink.records()
            stats = check_arrivals(records, ["bench warmup c4"] + subjects, 1)
            res["checks"].append(arrival_check("--concurrency 4: every message arrived exactly once", stats))
            arrivals = [ts for ts, subject, _ in records if subject.startswith("bench burst4 ")]
            if len(arrivals) >= n_burst:
                res["metrics"]["burst_c4_s"] = max(arrivals) - t_commit
        completed = True
    finally:
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    res["info"]["runmailer_pg_sigkill"] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    proc.wait()
            elif completed:
                res["checks"].append(simple_check("runmailer_pg still running at the end", False, "exited rc=%r: %s" % (proc.returncode, _tail(proc.bench_log)[-800:])))
        sink.close()


def sc_workers4(env, p, res):
    """Four concurrent manage.py send_mail (no file lock) on one queue."""
    n = int(p["n"])
    k = int(p.get("workers", 4))
    env.fresh_db()
    sink = Sink()
    try:
        fill_queue("w4", n, SMALL_BODY)
        c = queue_count()
        res["checks"].append(simple_check("queue filled", c == n, "%d rows, want %d" % (c, n)))
        extra = {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port), "BENCH_USE_FILE_LOCK": "0"}
        t0 = time.perf_counter()
        procs = [start_manage(["send_mail"], extra, env.tmpdir, "send_mail_%d" % j) for j in range(k)]
        outcomes = [wait_child(pr, child_timeout(n)) for pr in procs]
        wall = time.perf_counter() - t0
        bad = [(j, rc, tail[-500:]) for j, (rc, _, tail) in enumerate(outcomes) if rc != 0]
        res["checks"].append(simple_check("all workers exit 0", not bad, repr(bad)[:2000]))
        sink.wait(n, 10)
        stats = check_arrivals(sink.records(), [msgid("w4", i) for i in range(n)], 2)
        res["checks"].append(arrival_check("every message arrived exactly once", stats))
        left = queue_count()
        res["checks"].append(simple_check("queue empty afterwards", left == 0, "%d rows left" % left))
        res["metrics"]["wall_s"] = wall
        res["metrics"]["msgs_per_s"] = (stats["unique"] - stats["unexpected"]) / wall
        res["metrics"]["duplicates"] = stats["duplicates"]
        res["metrics"]["lost"] = stats["lost"]
        res["metrics"]["max_worker_rss_mb"] = max(o[1] for o in outcomes)
    finally:
        sink.close()


ATTACHMENT_QUEUE_CODE = """
import os
from django.core.mail import EmailMessage
email = EmailMessage("att", "body", "from@example.com", ["to@example.com"],
                     headers={"Message-ID": "<bench.att@bench.example>"})
email.attach("big.bin", os.urandom(int(os.environ["BENCH_ATT_BYTES"])), "application/octet-stream")
email.send()
"""


def _has_concurrency():
    import importlib.util

    return importlib.util.find_spec("mailer.pool") is not None


def _has_attachment_storage():
    import importlib.util

    return importlib.util.find_spec("mailer.attachments") is not None


def _column_mb(table):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(SUM(LENGTH(message_data)), 0) FROM %s" % table)
        return cursor.fetchone()[0] / (1024.0 * 1024.0)


def sc_attachments(env, p, res):
    """Peak RSS of queueing one message with a large attachment, and of the
    manage.py send_mail that delivers it to the sink: inline (in the row) and,
    where the package has MAILER_ATTACHMENT_STORAGE, stored."""
    sizes = [int(s) for s in p["att_mb"]]
    modes = ["inline"] + (["stored"] if _has_attachment_storage() else [])
    res["info"]["modes"] = modes
    r = run_manage(["shell", "-c", "pass"], {}, env.tmpdir, "shell_empty", 300)
    res["metrics"]["rss_mb_baseline"] = r.maxrss_mb
    sink = Sink()
    try:
        for size in sizes:
            for mode in modes:
                env.fresh_db()
                sink.reset()
                extra = {"BENCH_ATT_BYTES": str(size * 1024 * 1024), "BENCH_SMTP_PORT": str(sink.port)}
                if mode == "stored":
                    extra["BENCH_ATTACHMENT_DIR"] = os.path.join(env.tmpdir, "attachments-%d" % size)
                label = "%d_%s" % (size, mode)
                q = run_manage(["shell", "-c", ATTACHMENT_QUEUE_CODE], extra, env.tmpdir, "queue_" + label, 600)
                res["checks"].append(simple_check("%s: queued" % label, q.rc == 0 and queue_count() == 1,
                                                  "rc=%s %s" % (q.rc, q.log_tail[-800:] if q.rc else "")))
                row_mb = _column_mb("mailer_message")
                s = run_manage(["send_mail"], extra, env.tmpdir, "send_" + label, 900)
                arrived = sink.wait(1, 60)
                res["checks"].append(simple_check("%s: sent" % label, s.rc == 0 and arrived == 1 and queue_count() == 0,
                                                  "rc=%s arrived=%s %s" % (s.rc, arrived, s.log_tail[-800:] if s.rc else "")))
                res["metrics"]["queue_rss_mb_" + label] = q.maxrss_mb
                res["metrics"]["send_rss_mb_" + label] = s.maxrss_mb
                res["metrics"]["row_mb_" + label] = row_mb
                res["metrics"]["log_mb_" + label] = _column_mb("mailer_messagelog")
            if "stored" in modes:
                res["metrics"]["send_stored_vs_inline_%d" % size] = (
                    res["metrics"]["send_rss_mb_%d_stored" % size] / res["metrics"]["send_rss_mb_%d_inline" % size]
                )
    finally:
        sink.close()


def fill_post_office(tag, n, body, batch=500):
    """Queue n messages through django-post_office's own API (bulk)."""
    from post_office import mail

    done = 0
    while done < n:
        k = min(batch, n - done)
        mail.send_many(
            [
                {
                    "sender": FROM,
                    "recipients": ["rcpt%d@bench.example" % i],
                    "subject": "bench %s %d" % (tag, i),
                    "message": body,
                    "headers": {"Message-ID": msgid(tag, i)},
                }
                for i in range(done, done + k)
            ]
        )
        done += k


def post_office_unsent():
    from post_office.models import STATUS, Email

    return Email.objects.exclude(status=STATUS.sent).count()


def provider_ceiling(n, k, sink, tag, res):
    """What the sink and this machine allow: plain smtplib over k connections
    (one thread each), messages rendered to bytes before the clock starts."""
    import queue

    try:
        work = queue.SimpleQueue()
        for e in make_emails(tag, 0, n, SMALL_BODY):
            work.put((e.to, e.message().as_bytes()))
        errors = []

        def client():
            try:
                conn = smtplib.SMTP("127.0.0.1", sink.port, local_hostname="bench-client", timeout=60)
                try:
                    while True:
                        try:
                            to, data = work.get_nowait()
                        except queue.Empty:
                            break
                        conn.sendmail(FROM, to, data)
                finally:
                    conn.quit()
            except Exception as exc:  # reported as a check
                errors.append(repr(exc))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        res["checks"].append(simple_check("every client finished", not errors, "; ".join(errors)[:2000]))
        sink.wait(n, 10)
        records = sink.records()
        stats = sink.stats()
        arrivals = check_arrivals(records, [msgid(tag, i) for i in range(n)], 2)
        res["checks"].append(arrival_check("every message arrived exactly once", arrivals))
        provider_metrics(res["metrics"], arrivals, stats, records, wall, sink)
    finally:
        sink.close()


def provider_metrics(m, arrivals, stats, records, wall, sink):
    delivered = arrivals["unique"] - arrivals["unexpected"]
    m["delivered"] = delivered
    m["duplicates"] = arrivals["duplicates"]
    m["lost"] = arrivals["lost"]
    m["connections"] = stats["connections"]
    m["max_open_connections"] = stats["max_open"]
    if records and stats["first_connect"]:
        window = max(r[0] for r in records) - stats["first_connect"]
        m["send_window_s"] = window
        m["msgs_per_s"] = delivered / window
    m["wall_s"] = wall
    m["msgs_per_s_wall"] = delivered / wall
    sink_cpu = sink.cpu_s()
    if sink_cpu is not None and delivered:
        m["sink_cpu_ms_per_msg"] = 1000.0 * sink_cpu / delivered


def sc_provider(env, p, res):
    """A provider some distance away (a sink that answers late): one
    django-mailer or django-post_office configuration draining a queue.

    params: n, latency {connect, reply, data_end} in ms, and
      app "mailer": concurrency (None: the command's default, which is all
        2.3.2 has), processes (> 1: that many send_mail at once, no file lock);
      app "post_office": threads (THREADS_PER_PROCESS), one process;
      sqlite_wal: SQLite in WAL mode.

    msgs/s is as the provider sees it: messages delivered divided by the time
    from the first connection it accepted to the last message it accepted
    (interpreter and Django start-up left out, for every side alike);
    msgs_per_s_wall includes them.

    client "smtplib" (params connections, no database): the ceiling, see
    provider_ceiling().
    """
    n = int(p["n"])
    lat = p["latency"]
    processes = int(p.get("processes", 1))
    tag = "prov"
    sink_args = [
        "--connect-delay", str(lat.get("connect", 0)),
        "--reply-delay", str(lat.get("reply", 0)),
        "--data-delay", str(lat["data_end"]),
    ]
    # The latency scenario: a relay holding every byte lat["line"] ms each
    # way, in front of a sink that offers PIPELINING.
    if lat.get("line"):
        sink_args += ["--latency", str(lat["line"])]
    if lat.get("pipelining"):
        sink_args.append("--pipelining")
    if p.get("client") == "smtplib":
        return provider_ceiling(n, int(p["connections"]), Sink(sink_args), tag, res)
    if p.get("sqlite_wal"):
        os.environ["BENCH_SQLITE_WAL"] = "1"  # this process and the senders
    env.fresh_db()
    sink = Sink(sink_args)
    try:
        extra = {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port)}
        if env.app == "post_office":
            fill_post_office(tag, n, SMALL_BODY)
            queued = post_office_unsent()
            args = ["send_queued_mail", "--processes", "1", "--lockfile", os.path.join(env.tmpdir, "post_office")]
            extra["BENCH_PO_THREADS"] = str(int(p["threads"]))
            if p.get("batch"):
                extra["BENCH_PO_BATCH"] = str(int(p["batch"]))
        else:
            fill_queue(tag, n, SMALL_BODY)
            queued = queue_count()
            args = ["send_mail"]
            if p.get("concurrency") is not None:
                args += ["--concurrency", str(int(p["concurrency"]))]
            if processes > 1:
                extra["BENCH_USE_FILE_LOCK"] = "0"
            if p.get("pipelining") is False:
                extra["BENCH_SMTP_PIPELINING"] = "0"
        res["checks"].append(simple_check("queue filled", queued == n, "%d rows, want %d" % (queued, n)))
        t0 = time.perf_counter()
        procs = [start_manage(args, extra, env.tmpdir, "sender_%d" % j) for j in range(processes)]
        outcomes = [wait_child(pr, child_timeout(n, 1.0)) for pr in procs]
        wall = time.perf_counter() - t0
        bad = [(j, rc, tail[-500:]) for j, (rc, _, tail) in enumerate(outcomes) if rc != 0]
        res["checks"].append(simple_check("every sender exits 0", not bad, repr(bad)[:2000]))
        sink.wait(n, 10)
        records = sink.records()
        stats = sink.stats()
        arrivals = check_arrivals(records, [msgid(tag, i) for i in range(n)], 2)
        res["checks"].append(arrival_check("every message arrived exactly once", arrivals))
        left = post_office_unsent() if env.app == "post_office" else queue_count()
        res["checks"].append(simple_check("queue empty afterwards", left == 0, "%d not sent" % left))
        provider_metrics(res["metrics"], arrivals, stats, records, wall, sink)
        res["metrics"]["max_sender_rss_mb"] = max(o[1] for o in outcomes)
        # CPU the sender(s) used, start-up included: where the time goes
        cpu = sum(pr.bench_cpu_s for pr in procs)
        res["metrics"]["sender_cpu_s"] = cpu
        if delivered := res["metrics"]["delivered"]:
            res["metrics"]["sender_cpu_ms_per_msg"] = 1000.0 * cpu / delivered
    finally:
        sink.close()


def _routes_phase(env, n, n_slow, slow_args, res, label):
    """One drain of a queue holding ``n`` messages for the route "fast" (a
    sink answering at once) and ``n_slow`` for "slow" (a provider 20 ms
    away), queued slow first, by one ``send_mail``. Returns the fast
    route's msgs/s as its sink saw it (first connection -> last message)."""
    from django.conf import settings
    from django.core.mail import get_connection

    env.fresh_db()
    fast, slow = Sink([]), Sink(slow_args)
    try:
        ports = {"fast": fast.port, "slow": slow.port}
        os.environ["BENCH_ROUTES"] = json.dumps(ports)  # the sender's settings
        settings.MAILER_ROUTES = {  # this process's (read at use time)
            name: {"OPTIONS": {"host": "127.0.0.1", "port": port}} for name, port in ports.items()
        }
        for route, count in (("slow", n_slow), ("fast", n)):
            backend = get_connection("mailer.backend.DbBackend", using=route)
            for start in range(0, count, 500):
                backend.send_messages(make_emails(route, start, min(500, count - start), SMALL_BODY))
        t0 = time.perf_counter()
        proc = start_manage(["send_mail"], {}, env.tmpdir, "routes_" + label)
        rc, _, tail = wait_child(proc, child_timeout(n + n_slow * 10, 1.0))
        wall = time.perf_counter() - t0
        res["checks"].append(simple_check("send_mail exits 0 (%s)" % label, rc == 0, tail[-500:]))
        fast.wait(n, 10)
        slow.wait(n_slow, 10)
        m = res["metrics"]
        for route, sink, count in (("fast", fast, n), ("slow", slow, n_slow)):
            records = sink.records()
            arrivals = check_arrivals(records, [msgid(route, i) for i in range(count)], 2)
            res["checks"].append(arrival_check(
                "%s: every %s message arrived once, at the %s sink" % (label, route, route), arrivals))
            stats = sink.stats()
            if route == "fast" or count:
                key = "%s_%s" % (route, label)
                window = max(r[0] for r in records) - stats["first_connect"] if records else None
                m[key + "_msgs_per_s"] = (count / window) if window else None
                m[key + "_duplicates"] = arrivals["duplicates"]
                m[key + "_lost"] = arrivals["lost"]
        m["wall_%s_s" % label] = wall
        left = queue_count()
        res["checks"].append(simple_check("queue empty afterwards (%s)" % label, left == 0, "%d left" % left))
        return m.get("fast_%s_msgs_per_s" % label)
    finally:
        os.environ.pop("BENCH_ROUTES", None)
        fast.close()
        slow.close()


def sc_routes(env, p, res):
    """Two routes drained by one worker: "slow" (the provider scenario's
    sink, 20 ms away) and "fast" (a local sink). The fast route's throughput
    with the slow route's mail on the same queue, ahead of it in sending
    order, against its throughput alone (target: at least 0.9); every
    message must arrive once, at its own route's sink.

    params: n (fast messages), slow (slow messages), latency as for provider.
    """
    n, n_slow = int(p["n"]), int(p["slow"])
    lat = p["latency"]
    slow_args = [
        "--connect-delay", str(lat["connect"]),
        "--reply-delay", str(lat["reply"]),
        "--data-delay", str(lat["data_end"]),
    ]
    alone = _routes_phase(env, n, 0, slow_args, res, "alone")
    together = _routes_phase(env, n, n_slow, slow_args, res, "with_slow")
    if alone and together:
        res["metrics"]["fast_ratio"] = together / alone


def _rate_per_s(rate):
    """"20/s" -> 20.0 (also /m, /h, /d); the first of a list of rates."""
    if isinstance(rate, (list, tuple)):
        return min(_rate_per_s(r) for r in rate)
    count, unit = str(rate).split("/")
    return float(count) / {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit.strip()[0]]


def sc_quota(env, p, res):
    """A route limited to ``rate`` drained by ``processes`` x ``runmailer
    --route q --concurrency C`` against the provider scenario's sink; the
    workers share the route's quota through the database.

    The sink stamps every accepted message with time.monotonic() at the end
    of DATA (one clock for every process on Linux); bench/quotastats.py
    turns the stamps into the most messages in any sliding second and the
    mean rate (messages / (last - first arrival)).

    params: n, rate ("20/s"), processes, concurrency, latency (as provider),
      reject_every (> 0: the sink answers 421 and hangs up at every Nth end
      of DATA, or of MAIL FROM with reject_stage "mail"), file_lock (SQLite:
      keep MAILER_USE_FILE_LOCK on), settle (s to wait for late duplicates
      after the last message arrived), pause_check [lo, hi]: count the MAIL
      FROMs lo..hi s after a 421 (the route should be paused then).

    The workers run until every message arrived (or a time limit), then get
    SIGTERM and must exit 0.
    """
    import quotastats
    from django.apps import apps
    from django.conf import settings
    from django.core.mail import get_connection

    n = int(p["n"])
    rate = p["rate"]
    per_s = _rate_per_s(rate)
    processes, concurrency = int(p["processes"]), int(p["concurrency"])
    lat = p["latency"]
    reject_every = int(p.get("reject_every") or 0)
    tag = "quota"
    sink_args = [
        "--connect-delay", str(lat.get("connect", 0)),
        "--reply-delay", str(lat.get("reply", 0)),
        "--data-delay", str(lat["data_end"]),
    ]
    if reject_every:
        sink_args += ["--reject-every", str(reject_every), "--reject-stage", p.get("reject_stage", "data")]
    env.fresh_db()
    sink = Sink(sink_args)
    procs = []
    try:
        os.environ["BENCH_ROUTES"] = json.dumps({"q": sink.port})  # the workers' settings
        os.environ["BENCH_ROUTE_RATES"] = json.dumps({"q": rate})
        settings.MAILER_ROUTES = {  # this process's (read at use time)
            "q": {
                "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
                "OPTIONS": {"host": "127.0.0.1", "port": sink.port, "timeout": 60},
                "RATE": rate,
            }
        }
        backend = get_connection("mailer.backend.DbBackend", using="q")
        for start in range(0, n, 500):
            backend.send_messages(make_emails(tag, start, min(500, n - start), SMALL_BODY))
        queued = queue_count()
        res["checks"].append(simple_check("queue filled", queued == n, "%d rows, want %d" % (queued, n)))
        extra = {"BENCH_USE_FILE_LOCK": "1" if p.get("file_lock") else "0"}
        args = ["runmailer", "--route", "q", "--concurrency", str(concurrency)]
        t0 = time.perf_counter()
        procs = [start_manage(args, extra, env.tmpdir, "runmailer_%d" % j) for j in range(processes)]
        # At the quota the drain takes n / rate; pauses add to it.
        deadline = time.monotonic() + float(p.get("timeout") or 120 + 3 * n / per_s)
        got = 0
        while time.monotonic() < deadline:
            got = sink.wait(n, min(2.0, max(0.1, deadline - time.monotonic())))
            if got >= n or all(has_exited(pr) for pr in procs):
                break
        drained = time.perf_counter() - t0
        time.sleep(float(p.get("settle", 2.0)))  # a late second copy would show up here
        left = queue_count()
        for pr in procs:
            if not has_exited(pr):
                os.kill(pr.pid, signal.SIGTERM)
        outcomes = [wait_child(pr, 60) for pr in procs]
        wall = time.perf_counter() - t0
        bad = [(j, rc, tail[-500:]) for j, (rc, _, tail) in enumerate(outcomes) if rc != 0]
        res["checks"].append(simple_check("every worker exits 0 on SIGTERM", not bad, repr(bad)[:2000]))

        records = sink.records(monotonic=True)
        rejects = sink.rejects()
        mails = sink.mails()
        stats = sink.stats()
        times = sorted(r[0] for r in records)
        counts = quotastats.arrival_counts([r[2] for r in records], [msgid(tag, i) for i in range(n)])
        res["checks"].append(simple_check(
            "every message arrived exactly once", counts["duplicates"] == 0 and counts["missing"] == 0
            and counts["unexpected"] == 0,
            "received %d, duplicates %d %s, missing %d %s, unexpected %d" % (
                counts["received"], counts["duplicates"], counts["duplicated_ids"][:5], counts["missing"],
                counts["missing_ids"][:5], counts["unexpected"])))
        res["checks"].append(simple_check("queue empty afterwards", left == 0, "%d rows left" % left))
        logs = []
        for pr in procs:
            with open(pr.bench_log, encoding="utf-8", errors="replace") as fh:
                logs.append(fh.read().splitlines())
        paused = [quotastats.count_paused(lines) for lines in logs]
        pause_lines = [ln for lines in logs for ln in lines if "paused" in ln.lower()]
        log_model = apps.get_model("mailer", "MessageLog")
        failure_logs = log_model.objects.filter(result="3").count()
        success_logs = log_model.objects.filter(result="1").count()
        if reject_every:
            res["checks"].append(simple_check("the sink answered 421", rejects, "%d 421s" % len(rejects)))
            res["checks"].append(simple_check(
                "the route paused (a 'paused' line in the workers' logs)", sum(paused),
                "%d lines, per worker %s" % (sum(paused), paused)))
            res["checks"].append(simple_check(
                "no 421 counted as a failed attempt (no failure in the log)", failure_logs == 0,
                "%d failure rows" % failure_logs))
        m = res["metrics"]
        m["n"] = n
        m["delivered"] = n - counts["missing"]
        m["duplicates"] = counts["duplicates"]
        m["lost"] = counts["missing"]
        m["max_1s"] = quotastats.max_in_window(times, 1.0) if times else None
        start, _ = quotastats.busiest_window(times, 1.0)
        m["busiest_second_at_s"] = (start - times[0]) if times else None
        m["mean_rate"] = quotastats.mean_rate(times)
        m["span_s"] = (times[-1] - times[0]) if times else None
        m["rejects_421"] = len(rejects)
        m["paused_lines"] = sum(paused)
        m["paused_lines_per_worker"] = paused
        m["paused_warnings"] = sum(quotastats.count_paused(lines, "WARNING") for lines in logs)
        all_gaps = quotastats.gaps_after([r[0] for r in rejects], mails)
        gaps = [g for g in all_gaps if g is not None]
        if rejects:
            lo, hi = p.get("pause_check", (0.2, 0.8))
            m["mails_in_pause"] = quotastats.starts_after([r[0] for r in rejects], mails, lo, hi)
        if gaps:
            m["quiet_after_421_min_s"] = min(gaps)
            m["quiet_after_421_median_s"] = statistics.median(gaps)
            m["quiet_after_421_max_s"] = max(gaps)
        m["failure_logs"] = failure_logs
        m["success_logs"] = success_logs
        m["connections"] = stats["connections"]
        m["max_open_connections"] = stats["max_open"]
        m["drain_s"] = drained
        m["wall_s"] = wall
        m["sender_cpu_s"] = sum(pr.bench_cpu_s for pr in procs)
        # Raw figures, to recompute or plot: arrival and 421 times from the first arrival.
        t_first = times[0] if times else 0.0
        res["raw"] = {
            "arrivals_s": [round(t - t_first, 6) for t in times],
            "rejects": [(round(t - t_first, 6), stage, mid) for t, stage, mid in rejects],
            "quiet_after_421_s": [None if g is None else round(g, 3) for g in all_gaps],
            "mail_from_s": [round(t - t_first, 6) for t in mails],
            "pause_lines": pause_lines[:50],
        }
    finally:
        os.environ.pop("BENCH_ROUTES", None)
        os.environ.pop("BENCH_ROUTE_RATES", None)
        sink.close()


SCENARIOS = {
    "enqueue": sc_enqueue,
    "drain": sc_drain,
    "dummy": sc_dummy,
    "memory": sc_memory,
    "runmailer_pg": sc_runmailer_pg,
    "workers4": sc_workers4,
    "attachments": sc_attachments,
    "provider": sc_provider,
    "latency": sc_provider,  # the same drain, behind a latency line (run.py)
    "routes": sc_routes,
    "quota": sc_quota,
}


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------


def package_info(app="mailer"):
    info = {"python": sys.version.split()[0], "executable": sys.executable, "app": app}
    import django

    info["django"] = django.get_version()
    if app == "post_office":
        import post_office
        from post_office.version import VERSION

        info["app_file"] = post_office.__file__
        info["app_version"] = VERSION
        return info
    import mailer

    info["mailer_file"] = getattr(mailer, "__file__", None)
    info["mailer_path"] = list(getattr(mailer, "__path__", []))
    info["mailer_version"] = getattr(mailer, "__version__", None)
    info["app_file"] = info["mailer_file"]
    info["app_version"] = info["mailer_version"]
    return info


def error_summary(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0][:300] if text else "")


def cmd_info(args):
    res = {"ok": False, "error": None, "metrics": {}, "checks": [], "info": {}}
    env = Env("sqlite", args.app)
    try:
        env.setup_django()
        res["info"].update(package_info(args.app))
        from django.core.management import get_commands

        cmds = get_commands()
        if args.app == "post_office":
            res["info"]["commands"] = {"send_queued_mail": cmds.get("send_queued_mail")}
            from post_office import mail  # noqa: F401

            res["ok"] = True
            return res
        res["info"]["commands"] = {c: cmds.get(c) for c in ("send_mail", "runmailer_pg", "retry_deferred")}
        for mod in ("mailer.engine", "mailer.backend", "mailer.models"):
            __import__(mod)
        from mailer import send_mail  # noqa: F401
        from mailer.backend import DbBackend  # noqa: F401

        res["ok"] = True
    except BaseException as exc:
        res["error"] = traceback.format_exc()
        res["error_summary"] = error_summary(exc)
    finally:
        env.cleanup()
    return res


def cmd_scenario(args):
    res = {"ok": False, "error": None, "metrics": {}, "checks": [], "info": {"scenario": args.name, "db": args.db}}
    params = json.loads(args.params or "{}")
    res["info"]["params"] = params
    env = Env(args.db, args.app)
    t0 = time.perf_counter()
    try:
        env.setup_django()
        res["info"].update(package_info(args.app))
        SCENARIOS[args.name](env, params, res)
        res["ok"] = True
    except BaseException as exc:
        res["error"] = traceback.format_exc()
        res["error_summary"] = error_summary(exc)
    finally:
        kill_children()
        env.cleanup()
    res["info"]["elapsed_s"] = time.perf_counter() - t0
    return res


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("info")
    a.add_argument("--out", required=True)
    a.add_argument("--app", choices=["mailer", "post_office"], default="mailer")
    s = sub.add_parser("scenario")
    s.add_argument("name", choices=sorted(SCENARIOS))
    s.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    s.add_argument("--params", default="{}")
    s.add_argument("--out", required=True)
    s.add_argument("--app", choices=["mailer", "post_office"], default="mailer")
    args = ap.parse_args()

    def on_term(signum, frame):
        raise SystemExit("worker got signal %d" % signum)

    signal.signal(signal.SIGTERM, on_term)
    res = cmd_info(args) if args.cmd == "info" else cmd_scenario(args)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
