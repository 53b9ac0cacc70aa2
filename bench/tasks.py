#!/usr/bin/env python3
"""Benchmark: delivery through Django's tasks framework (``mailer.tasks``).

    /path/to/venv/bin/python bench/tasks.py --db postgres
    /path/to/venv/bin/python bench/tasks.py --db sqlite --latency 0

Runs in the python it is started with, which must have Django, aiosmtpd,
the database driver and django-tasks-db (plus django-tasks before Django
6.0) installed; this checkout is imported from the working tree. In one run:

* enqueue: ``mailer.send_mail`` one per call (each its own transaction) and
  a bulk through ``DbBackend`` in one transaction, with
  ``MAILER_TASK_BACKEND`` off and on (django-tasks-db's DatabaseBackend),
  alternating, medians of ``--runs``; and how many tasks were enqueued;
* latency (PostgreSQL): commit to arrival at an SMTP sink of single
  messages, with django-tasks-db's ``db_worker`` (at its default polling
  interval of 1 s and at ``--interval 0.1``) beside ``runmailer_pg``.

Prints a table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, REPO_DIR)
# The manage.py subprocesses import this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_DIR, os.environ.get("PYTHONPATH")) if p)
os.environ["BENCH_TASKS"] = "1"
os.environ.setdefault("BENCH_PG_NAME", "mailer_bench_tasks")

import worker  # noqa: E402  (bench/worker.py: Env, Sink, start_manage)

FROM = worker.FROM
BODY = worker.SMALL_BODY


def clear(env: worker.Env) -> None:
    from django_tasks_db.models import DBTaskResult

    worker.clear_queue()
    DBTaskResult.objects.all().delete()


def task_count() -> int:
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.count()


def enqueue_once(env: worker.Env, on: bool, singles: int, bulk: int) -> dict:
    from django.conf import settings
    from django.core.mail import get_connection
    from django.db import transaction

    import mailer

    settings.MAILER_TASK_BACKEND = "mail" if on else None
    clear(env)
    t0 = time.perf_counter()
    for i in range(singles):
        mailer.send_mail("single %d" % i, BODY, FROM, ["rcpt%d@bench.example" % i])
    single_s = time.perf_counter() - t0
    single_tasks = task_count()
    clear(env)
    emails = worker.make_emails("bulk", 0, bulk, BODY)
    backend = get_connection("mailer.backend.DbBackend")
    t0 = time.perf_counter()
    with transaction.atomic():
        backend.send_messages(emails)
    bulk_s = time.perf_counter() - t0
    bulk_tasks = task_count()
    clear(env)
    return {
        "single_rows_per_s": singles / single_s,
        "single_tasks": single_tasks,
        "bulk_rows_per_s": bulk / bulk_s,
        "bulk_tasks": bulk_tasks,
    }


def bench_enqueue(env: worker.Env, runs: int, singles: int, bulk: int) -> dict:
    # Warm-up (imports, first connection, the task object) off the clock.
    enqueue_once(env, True, 20, 20)
    enqueue_once(env, False, 20, 20)
    samples: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(runs):
        for mode in ("off", "on"):
            samples[mode].append(enqueue_once(env, mode == "on", singles, bulk))
    out = {}
    for mode, rows in samples.items():
        out[mode] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return out


def latency(env: worker.Env, label: str, args: list[str], tasks_on: bool, n: int) -> dict:
    """Commit-to-arrival of ``n`` single messages with one worker process."""
    from django.conf import settings

    import mailer

    env.fresh_db()
    settings.MAILER_TASK_BACKEND = "mail" if tasks_on else None
    sink = worker.Sink()
    extra = {"BENCH_MAILER_BACKEND": "smtp", "BENCH_SMTP_PORT": str(sink.port)}
    if tasks_on:
        extra["BENCH_TASK_BACKEND"] = "mail"
    proc = worker.start_manage(args, extra, env.tmpdir, label)
    try:
        mailer.send_mail("warmup", BODY, FROM, ["warmup@bench.example"])
        if sink.wait(1, 60) < 1:
            raise RuntimeError("%s delivered nothing in 60 s: %s" % (label, worker._tail(proc.bench_log)))
        time.sleep(0.5)
        commit = {}
        for i in range(n):
            subject = "single %d" % i
            mailer.send_mail(subject, BODY, FROM, ["rcpt%d@bench.example" % i])
            commit[subject] = time.time()
            if sink.wait(2 + i, 30) < 2 + i:
                raise RuntimeError("%s: message %d did not arrive in 30 s" % (label, i))
            time.sleep(0.05)
        arrival = {subject: ts for ts, subject, _ in sink.records()}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        sink.close()
    ms = sorted((arrival[s] - t) * 1000 for s, t in commit.items())
    return {
        "p50_ms": worker.percentile(ms, 50),
        "p95_ms": worker.percentile(ms, 95),
        "max_ms": ms[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=1000)
    ap.add_argument("--bulk", type=int, default=10000)
    ap.add_argument("--latency", type=int, default=100, help="single messages per worker (0: skip)")
    ap.add_argument("--json")
    args = ap.parse_args()

    env = worker.Env(args.db)
    try:
        env.fresh_db()
        import django

        results: dict = {"db": args.db, "django": django.get_version()}
        results["enqueue"] = bench_enqueue(env, args.runs, args.singles, args.bulk)
        if args.latency:
            workers = [("db_worker", ["db_worker", "--backend", "mail", "--no-startup-delay",
                                      "--no-reload"], True),
                       ("db_worker --interval 0.1", ["db_worker", "--backend", "mail",
                                                     "--interval", "0.1", "--no-startup-delay",
                                                     "--no-reload"], True)]
            if args.db == "postgres":
                workers.append(("runmailer_pg", ["runmailer_pg"], False))
            results["latency"] = {
                label: latency(env, label.replace(" ", "_"), cmd, on, args.latency)
                for label, cmd, on in workers
            }
    finally:
        env.cleanup()

    e = results["enqueue"]
    print("Django %s, %s" % (results["django"], args.db))
    print("%-44s %12s %12s" % ("enqueue", "tasks off", "tasks on"))
    for key, label in [
        ("single_rows_per_s", "send_mail, one per call (rows/s)"),
        ("single_tasks", "  tasks enqueued (%d calls)" % args.singles),
        ("bulk_rows_per_s", "DbBackend bulk, one transaction (rows/s)"),
        ("bulk_tasks", "  tasks enqueued (%d rows)" % args.bulk),
    ]:
        print("%-44s %12.0f %12.0f" % (label, e["off"][key], e["on"][key]))
    for label, lat in results.get("latency", {}).items():
        print("commit->arrival, %-27s p50 %6.1f ms  p95 %6.1f ms  max %6.1f ms"
              % (label, lat["p50_ms"], lat["p95_ms"], lat["max_ms"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
