#!/usr/bin/env python3
"""Benchmark: django-mailer 2.3.2 (from PyPI) versus this checkout.

    python3 bench/run.py                      # everything, 3 runs, medians
    python3 bench/run.py --quick              # tiny smoke run (< 1 minute)
    python3 bench/run.py --only dm232 --runs 1 --json out.json
    python3 bench/run.py --scenarios provider  # a provider 20 ms away, ~4 min
    python3 bench/run.py --scenarios quota     # a route limited to 20/s, ours only, ~4 min

Standard library only.  It creates two virtualenvs on first use,
bench/.venvs/dm232 (django-mailer==2.3.2) and bench/.venvs/ours (this
checkout, editable), and runs bench/worker.py with each venv's python, one
scenario run at a time, alternating the two sides.  The `provider` scenario
also uses a third, bench/.venvs/post_office (django-post_office), and
prints its own table.  See bench/README.md.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
VENVS_DIR = os.path.join(BENCH_DIR, ".venvs")
WORKER = os.path.join(BENCH_DIR, "worker.py")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

COMMON_REQS = ["Django==5.2.*", "psycopg2-binary", "psycopg[binary]", "aiosmtpd", "lockfile"]

POST_OFFICE_VERSION = "3.12.0"
SIDES = {
    "dm232": {"label": "2.3.2", "reqs": COMMON_REQS + ["django-mailer==2.3.2"]},
    "ours": {"label": "ours", "reqs": list(COMMON_REQS)},
    # Only the provider scenario runs it (worker.py --app post_office).
    "post_office": {
        "label": "post_office",
        "reqs": ["Django==5.2.*", "psycopg[binary]", "aiosmtpd", "django-post_office==" + POST_OFFICE_VERSION],
        "app": "post_office",
    },
}
SIDE_ORDER = ["dm232", "ours"]

SCENARIO_ORDER = ["enqueue", "drain", "dummy", "memory", "runmailer_pg", "workers4", "attachments", "provider",
                  "latency", "routes", "quota"]
# Scenarios of what 2.3.2 doesn't have: measured on our side only.
OURS_ONLY = {"routes", "quota"}
# Run only when asked for (--scenarios): quota paces itself at 20 msgs/s
# and sits through the provider's pauses, about 2 minutes per database.
OPT_IN = {"quota"}
DEFAULT_SCENARIOS = [s for s in SCENARIO_ORDER if s not in OPT_IN]
SCENARIO_DBS = {
    "enqueue": ["sqlite", "postgres"],
    "drain": ["sqlite", "postgres"],
    "dummy": ["sqlite", "postgres"],
    "memory": ["sqlite", "postgres"],
    "runmailer_pg": ["postgres"],
    "workers4": ["postgres"],
    "attachments": ["sqlite", "postgres"],
    "provider": ["sqlite", "postgres"],
    "latency": ["sqlite", "postgres"],
    "routes": ["sqlite", "postgres"],
    "quota": ["sqlite", "postgres"],
}

# The provider scenario: an SMTP sink that answers like a provider 20 ms away
# (milliseconds: before the greeting, before every other reply, more at the
# end of DATA). One connection carries at most 1000 / 130 = 7.7 msgs/s.
PROVIDER_LATENCY = {"connect": 100, "reply": 20, "data_end": 50}
PROVIDER_CONNECTION_LIMIT = 1000.0 / (3 * PROVIDER_LATENCY["reply"] + PROVIDER_LATENCY["reply"] + PROVIDER_LATENCY["data_end"])
# (key, side, db, label, size class, params); sizes per class in FULL/QUICK.
PROVIDER_VARIANTS = [
    # What the sink and the machine allow: plain smtplib, no queue, no database.
    ("ceiling_1", "ours", "sqlite", "reference: smtplib, 1 connection, no queue", "c1",
     {"client": "smtplib", "connections": 1}),
    ("ceiling_10", "ours", "sqlite", "reference: smtplib, 10 connections, no queue", "fast",
     {"client": "smtplib", "connections": 10}),
    ("dm232", "dm232", "postgres", "django-mailer 2.3.2, send_mail", "slow", {}),
    ("post_office_t10", "post_office", "postgres",
     "django-post_office %s, send_queued_mail, 1 process x 10 threads" % POST_OFFICE_VERSION[:-2], "fast",
     {"threads": 10}),
    ("ours_c1_sqlite", "ours", "sqlite", "ours, send_mail --concurrency 1", "c1", {"concurrency": 1}),
    ("ours_c10_sqlite", "ours", "sqlite", "ours, send_mail --concurrency 10", "fast", {"concurrency": 10}),
    ("ours_c10_sqlite_wal", "ours", "sqlite", "ours, send_mail --concurrency 10, SQLite in WAL mode", "fast",
     {"concurrency": 10, "sqlite_wal": True}),
    ("ours_c1_pg", "ours", "postgres", "ours, send_mail --concurrency 1", "c1", {"concurrency": 1}),
    ("ours_c10_pg", "ours", "postgres", "ours, send_mail --concurrency 10", "fast", {"concurrency": 10}),
    ("ours_3x5_pg", "ours", "postgres", "ours, 3 x send_mail --concurrency 5, no file lock", "fast",
     {"concurrency": 5, "processes": 3}),
]
# --quick runs two configurations only, post_office and ours with
# concurrency (each costs a fresh database and Django start-ups, whatever the
# message count); 2.3.2 and the other configurations share their code paths.
PROVIDER_QUICK = ["post_office_t10", "ours_c10_sqlite"]

# The latency scenario: a latency line (a TCP relay holding every byte 10 ms
# each way: a 20 ms round trip) in front of a fast sink that offers
# PIPELINING and does the provider's 50 ms of end-of-data work. smtplib pays
# 4 round trips + 50 ms = 130 ms a message (7.7 msgs/s a connection).
LATENCY_LINE = {"line": 10, "data_end": 50, "pipelining": True}
LATENCY_CONNECTION_LIMIT = 1000.0 / (4 * 2 * LATENCY_LINE["line"] + LATENCY_LINE["data_end"])
LATENCY_VARIANTS = [
    ("lat_ceiling_1", "ours", "sqlite", "reference: smtplib, 1 connection, no queue", "c1",
     {"client": "smtplib", "connections": 1}),
    ("lat_ceiling_10", "ours", "sqlite", "reference: smtplib, 10 connections, no queue", "fast",
     {"client": "smtplib", "connections": 10}),
    ("lat_dm232", "dm232", "postgres", "django-mailer 2.3.2, send_mail", "slow", {}),
    ("lat_post_office_t10", "post_office", "postgres",
     "django-post_office %s, send_queued_mail, 1 process x 10 threads" % POST_OFFICE_VERSION[:-2], "fast",
     {"threads": 10}),
    ("lat_ours_c1_nopipe", "ours", "postgres", "ours, --concurrency 1, MAILER_SMTP_PIPELINING = False", "c1",
     {"concurrency": 1, "pipelining": False}),
    ("lat_ours_c1", "ours", "postgres", "ours, --concurrency 1, pipelining", "c1", {"concurrency": 1}),
    ("lat_ours_c10_nopipe", "ours", "postgres", "ours, --concurrency 10, MAILER_SMTP_PIPELINING = False",
     "fast", {"concurrency": 10, "pipelining": False}),
    ("lat_ours_c10", "ours", "postgres", "ours, --concurrency 10, pipelining", "fast", {"concurrency": 10}),
    ("lat_ours_c10_sqlite_nopipe", "ours", "sqlite", "ours, --concurrency 10, MAILER_SMTP_PIPELINING = False",
     "fast", {"concurrency": 10, "pipelining": False}),
    ("lat_ours_c10_sqlite", "ours", "sqlite", "ours, --concurrency 10, pipelining", "fast", {"concurrency": 10}),
]
LATENCY_QUICK = ["lat_ours_c10_sqlite"]

# The quota scenario (ours only: 2.3.2 and post_office have no quotas): a
# route limited to QUOTA_RATE, drained by QUOTA_PROCESSES x runmailer
# --concurrency QUOTA_CONCURRENCY against the provider scenario's sink. A
# burst of QUOTA_BURST over the rate is allowed in any sliding second; the
# mean over the run must reach QUOTA_MEAN_FLOOR of the rate. The pushback
# run's sink answers 421 to every QUOTA_REJECT_EVERY-th message; the
# route's pauses double (1 s, 2 s, 4 s ...) while the provider keeps
# pushing back, so that run is short: 6 pauses are about a minute.
QUOTA_RATE = 20
QUOTA_BURST = 2
QUOTA_MEAN_FLOOR = 0.95
QUOTA_PROCESSES = 3
QUOTA_CONCURRENCY = 5
QUOTA_REJECT_EVERY = 10
# The pushback run counts the transactions (MAIL FROM) that began 0.2 to 0.8 s
# after a 421: 0.2 s leaves time for one already under way and for the worker
# to note the pause; 0.8 s is the shortest pause (the feature's first one,
# 1 s, less its 20 % jitter). The route should be paused all that time.
QUOTA_PAUSE_CHECK = (0.2, 0.8)
# (key, db, label, params). SQLite keeps the file lock (docs/settings.rst:
# "Keep it True on SQLite"; without it three processes sent 281 copies of
# 100 messages in a trial), so one process sends at a time there.
QUOTA_VARIANTS = [
    (kind + "_" + db, db, label, dict(params, file_lock=db == "sqlite"))
    for db in ("sqlite", "postgres")
    for kind, label, params in (
        ("quota", "%d/s, %d x runmailer --concurrency %d" % (QUOTA_RATE, QUOTA_PROCESSES, QUOTA_CONCURRENCY), {}),
        ("pushback", "the same, sink answers 421 to every %dth" % QUOTA_REJECT_EVERY,
         {"reject_every": QUOTA_REJECT_EVERY}),
    )
]

FULL = {"n": 10000, "sizes": [1000, 10000, 50000], "singles": 200, "burst": 2000, "runs": 3, "mem_runs": 1,
        "att_mb": [20, 100], "provider": {"slow": 12, "c1": 30, "fast": 300},
        "latency": {"slow": 12, "c1": 40, "fast": 400}, "quota": {"quota": 1200, "pushback": 60}, "quota_runs": 1}
QUICK = {"n": 200, "sizes": [50, 300], "singles": 10, "burst": 100, "runs": 1, "mem_runs": 1, "att_mb": [2],
         "provider": {"slow": 3, "c1": 5, "fast": 20}, "latency": {"slow": 3, "c1": 5, "fast": 20},
         "quota": {"quota": 100, "pushback": 20}, "quota_runs": 1}

# (key, label, unit, higher_is_better)
METRICS = {
    "enqueue": [
        ("bulk_rows_per_s", "send_mass_mail via DbBackend", "rows/s", True),
        ("single_rows_per_s", "mailer.send_mail, one per call", "rows/s", True),
        ("single_statements", "SQL statements per send_mail", "stmts", False),
        ("raw_insert_rows_per_s", "raw 1-row INSERT (reference)", "rows/s", True),
        ("single_vs_raw", "send_mail / raw INSERT", "x", True),
        ("own_row_insert_rows_per_s", "raw INSERT of send_mail's row, own table", "rows/s", True),
        ("own_row_vs_raw", "own-table row INSERT / raw INSERT", "x", True),
        ("single_vs_own_row", "send_mail / own-table row INSERT", "x", True),
        ("least_single_rows_per_s", "least send_mail: build, pickle, INSERT own row", "rows/s", True),
        ("least_single_vs_raw", "limit of send_mail / raw INSERT (least send_mail)", "x", True),
        ("single_vs_least", "send_mail / least send_mail", "x", True),
        ("bulk_floor_rows_per_s", "bulk floor: raw rows, one transaction", "rows/s", True),
    ],
    "drain": [
        ("drain_msgs_per_s", "manage.py send_mail -> SMTP", "msgs/s", True),
        ("drain_wall_s", "send_mail wall time", "s", False),
        ("ceiling_msgs_per_s", "smtplib 1-connection ceiling", "msgs/s", True),
        ("drain_vs_ceiling", "drain / ceiling", "x", True),
        ("django_backend_msgs_per_s", "Django SMTP backend, 1 connection, no queue", "msgs/s", True),
        ("drain_vs_django", "drain / Django backend", "x", True),
        ("drain_pass_msgs_per_s", "the drain's pass alone (no start-up)", "msgs/s", True),
        ("drain_pass_vs_django", "drain pass / Django backend", "x", True),
        ("startup_s", "send_mail start-up (empty queue)", "s", False),
        ("commits_per_s", "1-row INSERT, autocommit (durable commits/s)", "/s", True),
        ("drain_limit_vs_django", "limit of drain / Django with 1 commit per msg", "x", True),
        ("claim_commits_per_s", "1-row SELECT + durable INSERT (claims+commits/s)", "/s", True),
        ("claim_limit_vs_django", "limit of drain / Django, 1 claim + 1 commit per msg", "x", True),
        ("least_drain_msgs_per_s", "least drain: claim, unpickle, send, log, delete, commit", "msgs/s", True),
        ("least_drain_vs_django", "limit of drain / Django (least drain)", "x", True),
        ("machinery_msgs_per_s", "the same pass, dummy backend (queue machinery)", "msgs/s", True),
        ("machinery_limit_vs_django", "limit of drain / Django, this queue's machinery", "x", True),
        ("drain_peak_rss_mb", "send_mail peak RSS", "MB", False),
    ],
    "dummy": [
        ("msgs_per_s", "send_mail, dummy backend", "msgs/s", True),
        ("wall_s", "send_mail wall time", "s", False),
    ],
    "memory": [],  # built from the sizes at run time
    "runmailer_pg": [
        ("latency_p50_ms", "commit->arrival p50", "ms", False),
        ("latency_p95_ms", "commit->arrival p95", "ms", False),
        ("latency_p99_ms", "commit->arrival p99", "ms", False),
        ("latency_max_ms", "commit->arrival max", "ms", False),
        ("burst_s", "burst: commit->all arrived", "s", False),
        ("burst_django_backend_s", "burst floor: Django backend, 1 connection, no queue", "s", False),
        ("burst_django_backend_c4_s", "burst floor: Django backend, 4 connections (threads), no queue", "s", False),
        ("burst_c4_s", "burst, runmailer_pg --concurrency 4", "s", False),
        ("burst_msgs_per_s", "burst throughput", "msgs/s", True),
    ],
    "routes": [
        ("fast_alone_msgs_per_s", "fast route alone, 1 send_mail", "msgs/s", True),
        ("fast_with_slow_msgs_per_s", "fast route, slow route's mail queued ahead", "msgs/s", True),
        ("fast_ratio", "fast route with slow / alone", "x", True),
        ("slow_with_slow_msgs_per_s", "slow route (provider 20 ms away), same pass", "msgs/s", True),
        ("fast_with_slow_duplicates", "duplicate deliveries (fast)", "msgs", False),
        ("fast_with_slow_lost", "lost messages (fast)", "msgs", False),
    ],
    "workers4": [
        ("msgs_per_s", "4 x send_mail, no file lock", "msgs/s", True),
        ("wall_s", "total wall time", "s", False),
        ("duplicates", "duplicate deliveries", "msgs", False),
        ("lost", "lost messages", "msgs", False),
    ],
}


def memory_metrics(sizes):
    rows = [("rss_mb_empty", "peak RSS, empty queue", "MB", False)]
    for s in sizes:
        rows.append(("rss_mb_%d" % s, "peak RSS, %s x 20KB queued" % _k(s), "MB", False))
    rows.append(("rss_ratio", "RSS(%s) / RSS(%s)" % (_k(max(sizes)), _k(min(sizes))), "x", False))
    for s in sizes:
        rows.append(("msgs_per_s_%d" % s, "drain rate, %s x 20KB" % _k(s), "msgs/s", True))
    return rows


def attachment_metrics(sizes):
    rows = [("rss_mb_baseline", "peak RSS, manage.py shell doing nothing", "MB", False)]
    for s in sizes:
        for mode in ("inline", "stored"):
            rows += [
                ("queue_rss_mb_%d_%s" % (s, mode), "%d MB attachment, %s: queue peak RSS" % (s, mode), "MB", False),
                ("send_rss_mb_%d_%s" % (s, mode), "%d MB attachment, %s: send_mail peak RSS" % (s, mode), "MB", False),
                ("row_mb_%d_%s" % (s, mode), "%d MB attachment, %s: queue row" % (s, mode), "MB", False),
                ("log_mb_%d_%s" % (s, mode), "%d MB attachment, %s: log row" % (s, mode), "MB", False),
            ]
        rows.append(("send_stored_vs_inline_%d" % s, "%d MB: send_mail RSS stored / inline" % s, "x", False))
    return rows


def _k(n):
    return "%dk" % (n // 1000) if n >= 1000 and n % 1000 == 0 else str(n)


def _ratio(d, o):
    if d is None or o is None or d == 0:
        return None
    return o / d


# Targets: key -> (text, needs_dm232, predicate(dm232_value, ours_value))
TARGETS = {
    ("enqueue", "bulk_rows_per_s"): (">= 2x 2.3.2", True, lambda d, o: o >= 2 * d),
    ("enqueue", "single_vs_raw"): ("ours >= 0.80", False, lambda d, o: o >= 0.8),
    ("enqueue", "single_statements"): ("ours = 1", False, lambda d, o: o == 1),
    ("drain", "drain_vs_ceiling"): ("ours >= 0.90", False, lambda d, o: o >= 0.9),
    ("drain", "drain_vs_django"): ("ours >= 0.80", False, lambda d, o: o >= 0.8),
    ("drain", "drain_pass_vs_django"): ("ours >= 0.80", False, lambda d, o: o >= 0.8),
    ("dummy", "msgs_per_s"): (">= 5x 2.3.2", True, lambda d, o: o >= 5 * d),
    ("memory", "rss_ratio"): ("ours <= 1.10", False, lambda d, o: o <= 1.1),
    ("runmailer_pg", "latency_p99_ms"): ("<= 2.3.2", True, lambda d, o: o <= d),
    ("runmailer_pg", "burst_s"): (">= 5x faster", True, lambda d, o: o * 5 <= d),
    ("workers4", "msgs_per_s"): (">= 5x 2.3.2", True, lambda d, o: o >= 5 * d),
    ("workers4", "duplicates"): ("ours = 0", False, lambda d, o: o == 0),
    ("workers4", "lost"): ("ours = 0", False, lambda d, o: o == 0),
    ("attachments", "send_stored_vs_inline_20"): ("ours <= 0.50", False, lambda d, o: o <= 0.5),
    ("routes", "fast_ratio"): ("ours >= 0.90", False, lambda d, o: o >= 0.9),
}


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------
# virtualenvs
# --------------------------------------------------------------------------


def venv_python(side):
    return os.path.join(VENVS_DIR, side, "bin", "python")


def _pip(py, args, logfh):
    cmd = [py, "-m", "pip", "install", "--disable-pip-version-check"] + args
    logfh.write("\n$ %s\n" % " ".join(cmd))
    logfh.flush()
    return subprocess.call(cmd, stdout=logfh, stderr=subprocess.STDOUT)


def _purelib(py):
    return subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()


def _repo_is_packaged():
    return any(os.path.exists(os.path.join(REPO_DIR, f)) for f in ("pyproject.toml", "setup.py", "setup.cfg"))


def ensure_venv(side, reinstall=False):
    """Create/refresh bench/.venvs/<side>. Returns (python, note); raises on failure."""
    vdir = os.path.join(VENVS_DIR, side)
    py = venv_python(side)
    stamp_path = os.path.join(vdir, ".bench-stamp.json")
    reqs = SIDES[side]["reqs"]
    stamp = {}
    if os.path.exists(stamp_path):
        try:
            with open(stamp_path) as fh:
                stamp = json.load(fh)
        except ValueError:
            stamp = {}
    if reinstall and os.path.isdir(vdir):
        shutil.rmtree(vdir)
        stamp = {}
    if not os.path.exists(py):
        log("[setup] creating %s with %s" % (os.path.relpath(vdir, REPO_DIR), sys.executable))
        subprocess.check_call([sys.executable, "-m", "venv", vdir])
        stamp = {}
    install_log = os.path.join(vdir, "bench-install.log")
    need_reqs = stamp.get("reqs") != reqs
    need_repo = side == "ours" and (
        need_reqs or stamp.get("repo") != REPO_DIR or (stamp.get("mode") != "editable" and _repo_is_packaged())
    )
    if not need_reqs and not need_repo:
        return py, stamp.get("mode", "")
    with open(install_log, "a") as logfh:
        if need_reqs:
            log("[setup] %s: pip install %s (log: %s)" % (side, " ".join(reqs), os.path.relpath(install_log, REPO_DIR)))
            if _pip(py, reqs, logfh) != 0:
                raise RuntimeError("pip install failed for %s, see %s" % (side, install_log))
        mode = stamp.get("mode", "")
        if side == "ours" and need_repo:
            pth = os.path.join(_purelib(py), "bench_ours_checkout.pth")
            mode = "pth"
            if _repo_is_packaged():
                log("[setup] ours: pip install -e %s" % REPO_DIR)
                if _pip(py, reqs + ["-e", REPO_DIR], logfh) == 0:
                    mode = "editable"
                else:
                    log("[setup] ours: editable install failed (see %s); falling back to a .pth path entry" % install_log)
            if mode == "editable":
                if os.path.exists(pth):
                    os.remove(pth)
            else:
                # Same effect as PYTHONPATH=<repo> for this venv only.
                with open(pth, "w") as fh:
                    fh.write(REPO_DIR + "\n")
        stamp = {"reqs": reqs, "repo": REPO_DIR if side == "ours" else None, "mode": mode or "pypi"}
    with open(stamp_path, "w") as fh:
        json.dump(stamp, fh)
    return py, stamp["mode"]


# --------------------------------------------------------------------------
# running workers
# --------------------------------------------------------------------------


def worker_env():
    env = dict(os.environ)
    for k in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_worker(py, args, timeout):
    fd, out = tempfile.mkstemp(prefix="mailer-bench-", suffix=".json")
    os.close(fd)
    errfd, errpath = tempfile.mkstemp(prefix="mailer-bench-", suffix=".log")
    try:
        with os.fdopen(errfd, "w") as errfh:
            proc = subprocess.Popen(
                [py, WORKER] + args + ["--out", out],
                env=worker_env(),
                cwd=BENCH_DIR,
                stdin=subprocess.DEVNULL,
                stdout=errfh,
                stderr=subprocess.STDOUT,
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
                # SIGTERM lets the worker kill its own children and drop its DB.
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        with open(errpath, errors="replace") as fh:
            output = fh.read()
        try:
            with open(out) as fh:
                res = json.load(fh)
        except (OSError, ValueError):
            res = {
                "ok": False,
                "error": "worker produced no result (rc=%s)\n%s" % (rc, output[-3000:]),
                "metrics": {},
                "checks": [],
                "info": {},
            }
        if rc == "timeout":
            res["ok"] = False
            res["error"] = "worker timed out after %s s\n%s" % (timeout, output[-3000:])
            res["error_summary"] = "worker timed out after %s s" % timeout
        return res
    finally:
        for p in (out, errpath):
            try:
                os.remove(p)
            except OSError:
                pass


def side_info(side, py):
    res = run_worker(py, ["info", "--app", SIDES[side].get("app", "mailer")], 300)
    if not res.get("ok"):
        return None, _err_text(res)
    info = res["info"]
    mfile = os.path.realpath(info.get("app_file") or "")
    if side == "post_office":
        if info.get("app_version") != POST_OFFICE_VERSION or not mfile.startswith(
            os.path.realpath(os.path.join(VENVS_DIR, side))
        ):
            return info, "post_office venv imports post_office %s from %s" % (info.get("app_version"), mfile)
        return info, None
    if side == "ours":
        want = os.path.realpath(os.path.join(REPO_DIR, "mailer")) + os.sep
        if not mfile.startswith(want):
            return info, "imported mailer from %s, not from the checkout %s" % (mfile, want)
    else:
        if info.get("mailer_version") != "2.3.2" or not mfile.startswith(os.path.realpath(os.path.join(VENVS_DIR, side))):
            return info, "dm232 venv imports mailer %s from %s" % (info.get("mailer_version"), mfile)
    missing = [c for c, app in (info.get("commands") or {}).items() if app is None and c != "retry_deferred"]
    if missing:
        info["warning"] = "management commands missing: %s" % ", ".join(missing)
    return info, None


def _err_text(res):
    """'summary' + newline + traceback of a failed worker result."""
    full = (res.get("error") or "unknown error").strip()
    summary = res.get("error_summary")
    if not summary:
        lines = full.splitlines()
        summary = lines[-1] if lines else "?"
    return summary + "\n" + full


def postgres_reachable():
    host = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
    port = int(os.environ.get("BENCH_PG_PORT", "5432"))
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if unit == "msgs" or (isinstance(v, int) and not isinstance(v, bool)):
        return "%d" % v
    a = abs(v)
    if a >= 10000:
        return "{:,.0f}".format(v)
    if a >= 100:
        return "%.1f" % v
    if a >= 1:
        return "%.2f" % v
    return "%.3f" % v


def short_summary(scenario, res):
    if not res.get("ok"):
        return "ERROR: " + _err_text(res).splitlines()[0]
    m = res["metrics"]
    keys = {
        "enqueue": ["bulk_rows_per_s", "single_rows_per_s", "single_statements", "raw_insert_rows_per_s"],
        "drain": ["drain_msgs_per_s", "ceiling_msgs_per_s"],
        "dummy": ["msgs_per_s"],
        "memory": [k for k in m if k.startswith("rss_mb_")] + ["rss_ratio"],
        "runmailer_pg": ["latency_p50_ms", "latency_p99_ms", "burst_s"],
        "workers4": ["msgs_per_s", "duplicates", "lost"],
        "attachments": [k for k in m if k.startswith(("send_rss_mb_", "send_stored_vs"))],
        "provider": ["msgs_per_s", "delivered", "duplicates", "connections"],
        "latency": ["msgs_per_s", "delivered", "duplicates", "connections"],
        "routes": ["fast_alone_msgs_per_s", "fast_with_slow_msgs_per_s", "fast_ratio"],
        "quota": ["max_1s", "mean_rate", "delivered", "duplicates", "rejects_421", "paused_lines",
                  "quiet_after_421_median_s", "mails_in_pause", "drain_s"],
    }[scenario]
    parts = ["%s=%s" % (k, fmt(m.get(k))) for k in keys]
    bad = [c for c in res.get("checks", []) if not c["ok"]]
    if bad:
        parts.append("CORRECTNESS FAILED: " + "; ".join("%s (%s)" % (c["name"], c["detail"]) for c in bad))
    return ", ".join(parts)


def render_table(headers, rows, right=(4, 5, 6), group=True):
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = "-+-".join("-" * w for w in widths)

    def fmt_row(r):
        return " | ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r))

    out = [fmt_row(headers), line]
    prev = None
    for r in rows:
        key = (r[0], r[1])
        if group and prev is not None and key != prev:
            out.append(line)
        prev = key
        out.append(fmt_row(r))
    return "\n".join(out)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Benchmark django-mailer 2.3.2 against this checkout (see bench/README.md)."
    )
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help="comma list of: %s (default: all but %s)" % (",".join(SCENARIO_ORDER), ",".join(sorted(OPT_IN))))
    ap.add_argument("--db", default="sqlite,postgres", help="comma list of sqlite,postgres")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario, medians reported (default 3)")
    ap.add_argument("--mem-runs", type=int, default=None, help="runs of the memory scenario (default 1)")
    ap.add_argument("--quick", "--smoke", dest="quick", action="store_true", help="tiny sizes, 1 run")
    ap.add_argument("--only", choices=["ours", "dm232", "post_office"],
                    help="run one side only (post_office: the provider scenario's post_office row)")
    ap.add_argument("--json", dest="json_out", help="write raw results + summary as JSON to this file")
    ap.add_argument("--messages", type=int, help="messages for enqueue/drain/dummy/workers4 (default 10000)")
    ap.add_argument("--sizes", help="queue sizes of the memory scenario, e.g. 1000,10000,50000")
    ap.add_argument("--attachment-mb", help="attachments: attachment sizes in MB (default 20,100)")
    ap.add_argument("--singles", type=int, help="runmailer_pg: single messages (default 200)")
    ap.add_argument("--burst", type=int, help="runmailer_pg: burst size (default 2000)")
    ap.add_argument("--reinstall", action="store_true", help="delete and recreate the virtualenvs")
    ap.add_argument("--strict", action="store_true", help="exit non-zero when the ours side errors (n/a)")
    args = ap.parse_args(argv)
    conf = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        conf["runs"] = args.runs
        conf["quota_runs"] = args.runs
    if args.mem_runs is not None:
        conf["mem_runs"] = args.mem_runs
    if args.messages is not None:
        conf["n"] = args.messages
    if args.sizes:
        conf["sizes"] = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.attachment_mb:
        conf["att_mb"] = [int(s) for s in args.attachment_mb.split(",") if s.strip()]
    if args.singles is not None:
        conf["singles"] = args.singles
    if args.burst is not None:
        conf["burst"] = args.burst
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIO_DBS:
            ap.error("unknown scenario %r (choose from %s)" % (s, ", ".join(SCENARIO_ORDER)))
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    for d in dbs:
        if d not in ("sqlite", "postgres"):
            ap.error("unknown db %r" % d)
    if conf["runs"] < 1 or conf["mem_runs"] < 1:
        ap.error("--runs/--mem-runs must be >= 1")
    if len(conf["sizes"]) < 2 and "memory" in scenarios:
        ap.error("--sizes needs at least two sizes")
    return args, conf, scenarios, dbs


def scenario_params(scenario, conf):
    if scenario == "memory":
        return {"sizes": conf["sizes"]}
    if scenario == "runmailer_pg":
        return {"singles": conf["singles"], "burst": conf["burst"]}
    if scenario == "workers4":
        return {"n": conf["n"], "workers": 4}
    if scenario == "attachments":
        return {"att_mb": conf["att_mb"]}
    if scenario == "routes":
        # The slow route's mail lasts about as long as the fast route's alone.
        return {"n": conf["n"], "slow": max(10, conf["n"] // 100), "latency": PROVIDER_LATENCY}
    return {"n": conf["n"]}


def scenario_timeout(scenario, conf):
    if scenario == "memory":
        return 600 + sum(conf["sizes"]) / 5.0
    if scenario == "runmailer_pg":
        return 600 + conf["singles"] * 31 + conf["burst"] / 5.0
    if scenario == "attachments":
        return 600 + 60 * sum(conf["att_mb"])
    return 600 + conf["n"] / 5.0


def main(argv=None):
    args, conf, scenarios, dbs = parse_args(argv if argv is not None else sys.argv[1:])
    t_start = time.time()
    main_sides = [s for s in ([args.only] if args.only else SIDE_ORDER) if s in SIDE_ORDER]
    provider_variants = []
    if "provider" in scenarios:
        keys = PROVIDER_QUICK if args.quick else [v[0] for v in PROVIDER_VARIANTS]
        provider_variants = [v for v in PROVIDER_VARIANTS
                             if v[0] in keys and v[2] in dbs and (not args.only or v[1] == args.only)]
    latency_variants = []
    if "latency" in scenarios:
        keys = LATENCY_QUICK if args.quick else [v[0] for v in LATENCY_VARIANTS]
        latency_variants = [v for v in LATENCY_VARIANTS
                            if v[0] in keys and v[2] in dbs and (not args.only or v[1] == args.only)]
    quota_variants = []
    if "quota" in scenarios and args.only in (None, "ours"):
        quota_variants = [v for v in QUOTA_VARIANTS if v[1] in dbs]
    # 2.3.2 only for the scenarios it runs in (not for ours-only ones alone).
    if not any(sc not in OURS_ONLY and sc not in ("provider", "latency") for sc in scenarios):
        main_sides = [s for s in main_sides if s == "ours"]
    sides = list(main_sides)
    if quota_variants and "ours" not in sides:
        sides.append("ours")
    for v in provider_variants + latency_variants:
        if v[1] not in sides:
            sides.append(v[1])
    log("mailer benchmark: sides=%s scenarios=%s db=%s runs=%d (memory: %d, quota: %d) n=%d sizes=%s singles=%d"
        " burst=%d provider=%s"
        % (",".join(sides), ",".join(scenarios), ",".join(dbs), conf["runs"], conf["mem_runs"], conf["quota_runs"],
           conf["n"],
           ",".join(map(str, conf["sizes"])), conf["singles"], conf["burst"],
           "/".join("%s %d" % kv for kv in conf["provider"].items())))
    if sys.version_info[:2] != (3, 11):
        log("[warn] the venvs are meant to use Python 3.11; this is %s" % platform.python_version())

    # --- set up the sides ---
    side_state = {}
    for side in sides:
        st = {"python": None, "error": None, "info": None, "install_mode": None}
        try:
            py, mode = ensure_venv(side, reinstall=args.reinstall)
            st["python"], st["install_mode"] = py, mode
            info, err = side_info(side, py)
            st["info"], st["error"] = info, err
        except Exception as exc:
            st["error"] = "venv setup failed: %s" % exc
        if st["error"]:
            log("[%s] NOT AVAILABLE -> n/a: %s" % (side, st["error"].strip().splitlines()[0]))
            if side == "ours":
                log("      (details in the summary below)")
        else:
            info = st["info"]
            log("[%s] %s %s from %s (Django %s, Python %s, install: %s)%s"
                % (side, info.get("app", "mailer"), info.get("app_version"),
                   os.path.dirname(info.get("app_file") or "?"),
                   info.get("django"), info.get("python"), st["install_mode"],
                   ("  WARNING: " + info["warning"]) if info.get("warning") else ""))
        side_state[side] = st

    pg_ok = True
    if "postgres" in dbs:
        pg_ok = postgres_reachable()
        if not pg_ok:
            log("[warn] PostgreSQL is not reachable at 127.0.0.1:5432: postgres rows will be n/a")

    # --- plan ---
    plan = []
    for sc in SCENARIO_ORDER:
        if sc not in scenarios or sc in ("provider", "latency", "quota"):
            continue
        for db in ["sqlite", "postgres"]:
            if db in dbs and db in SCENARIO_DBS[sc]:
                plan.append((sc, db))
    if "quota" in scenarios and not quota_variants:
        log("quota: nothing to run (it measures ours only: 2.3.2 and post_office have no quotas)")
    if not plan and not provider_variants and not latency_variants and not quota_variants:
        log("nothing to run: no scenario applies to the selected databases")

    runs = []  # list of dicts
    for sc, db in plan:
        nruns = conf["mem_runs"] if sc in ("memory", "attachments") else conf["runs"]
        params = scenario_params(sc, conf)
        for i in range(nruns):
            for side in main_sides:
                if sc in OURS_ONLY and side != "ours":
                    continue
                st = side_state[side]
                label = "[%s] %s/%s run %d/%d" % (side, sc, db, i + 1, nruns)
                if st["error"]:
                    res = {"ok": False, "error": st["error"], "metrics": {}, "checks": [], "info": {},
                           "error_summary": "side not available: " + st["error"].splitlines()[0], "skipped": True}
                elif db == "postgres" and not pg_ok:
                    res = {"ok": False, "error": "PostgreSQL not reachable", "metrics": {}, "checks": [], "info": {},
                           "skipped": True}
                else:
                    t0 = time.time()
                    res = run_worker(st["python"],
                                     ["scenario", sc, "--db", db, "--params", json.dumps(params)],
                                     scenario_timeout(sc, conf))
                    log("%s: %s  (%.1f s)" % (label, short_summary(sc, res), time.time() - t0))
                runs.append({"side": side, "scenario": sc, "db": db, "run": i + 1, "result": res})
    provider_runs = run_provider(provider_variants, side_state, conf, pg_ok)
    provider_runs += run_provider(latency_variants, side_state, conf, pg_ok, scenario="latency")
    quota_runs = run_quota(quota_variants, side_state, conf, pg_ok)

    # --- aggregate ---
    summary, table_rows, failures, errors = aggregate(runs, plan, main_sides, conf)
    if plan:
        table = render_table(
            ["scenario", "db", "metric", "unit", "2.3.2", "ours", "ours/2.3.2", "better", "target", "status"],
            table_rows,
        )
        log("")
        log("=" * 100)
        log("RESULTS (median of runs; ratio = ours / 2.3.2; 'better' says which direction wins for that row)")
        log("=" * 100)
        log(table)
        log("")
        log("'!' after a figure: a correctness check failed in at least one run of that side (listed below).")
        log("Targets are judged on medians; a target whose 'ours' side failed a correctness check counts as missed.")
    if provider_variants:
        p_summary, p_rows, p_failures, p_errors = aggregate_provider(
            [r for r in provider_runs if r["scenario"] == "provider"], provider_variants)
        summary += p_summary
        failures += p_failures
        errors += p_errors
        lat = PROVIDER_LATENCY
        log("")
        log("=" * 100)
        log("PROVIDER: a provider 20 ms away (connect %d ms, %d ms before every reply, +%d ms at the end of DATA:"
            % (lat["connect"], lat["reply"], lat["data_end"]))
        log("at most %.1f msgs/s per connection). Medians of runs; msgs/s = delivered / (first connection ->"
            % PROVIDER_CONNECTION_LIMIT)
        log("last message) as the provider saw it; 'incl. start-up' counts from starting the command(s).")
        log("=" * 100)
        log(render_table(
            ["configuration", "db", "msgs", "delivered", "dupl.", "conns", "msgs/s", "incl. start-up", "target",
             "status"], p_rows, right=(2, 3, 4, 5, 6, 7), group=False))
        log("'!' after a figure: a run lost or duplicated a message or left the queue non-empty (listed below).")
    if latency_variants:
        l_summary, l_rows, l_failures, l_errors = aggregate_provider(
            [r for r in provider_runs if r["scenario"] == "latency"], latency_variants, _latency_targets,
            scenario="latency")
        summary += l_summary
        failures += l_failures
        errors += l_errors
        log("")
        log("=" * 100)
        log("LATENCY LINE: a relay holding every byte %d ms each way (a %d ms round trip) in front of a sink that"
            % (LATENCY_LINE["line"], 2 * LATENCY_LINE["line"]))
        log("offers PIPELINING and takes %d ms at the end of DATA: smtplib's 4 round trips make at most %.1f msgs/s"
            % (LATENCY_LINE["data_end"], LATENCY_CONNECTION_LIMIT))
        log("per connection. Medians of runs; msgs/s = delivered / (first connection -> last message).")
        log("=" * 100)
        log(render_table(
            ["configuration", "db", "msgs", "delivered", "dupl.", "conns", "msgs/s", "incl. start-up", "target",
             "status"], l_rows, right=(2, 3, 4, 5, 6, 7), group=False))
        log("'!' after a figure: a run lost or duplicated a message or left the queue non-empty (listed below).")
    if quota_variants:
        q_summary, q_rows, q_targets, q_failures, q_errors = aggregate_quota(quota_runs, quota_variants)
        summary += q_summary
        failures += q_failures
        errors += q_errors
        log("")
        log("=" * 100)
        log("QUOTA: route q limited to RATE %d/s, %d worker processes x %d connections (manage.py runmailer --route q"
            % (QUOTA_RATE, QUOTA_PROCESSES, QUOTA_CONCURRENCY))
        log("--concurrency %d) against the provider's sink (20 ms away, %.1f msgs/s a connection). Ours only:"
            % (QUOTA_CONCURRENCY, PROVIDER_CONNECTION_LIMIT))
        log("django-mailer 2.3.2 and django-post_office have no quotas. SQLite keeps MAILER_USE_FILE_LOCK = True")
        log("(as the docs say it must): one process sends at a time there, the others find the lock taken;")
        log("PostgreSQL (file lock off) is the main case. MariaDB: the bench has no MariaDB set-up.")
        log("max in 1 s = most arrivals at the sink in any sliding second [t, t+1); mean = msgs / (last - first")
        log("arrival); quiet after 421 = time from each 421 to the next MAIL FROM (min / median / max); begun in")
        log("pause = MAIL FROMs %.1f-%.1f s after a 421 (the shortest pause is 1 s - 20 %% jitter: should be 0)."
            % QUOTA_PAUSE_CHECK)
        log("Worst run shown (most in 1 s, lowest mean, most duplicates / missing).")
        log("=" * 100)
        log(render_table(
            ["run", "db", "msgs", "delivered", "dupl.", "missing", "max in 1 s", "mean msgs/s", "421s",
             "'paused' lines (WARNING)", "quiet after 421 s", "begun in pause", "drain s"], q_rows,
            right=tuple(range(2, 13)), group=False))
        log("")
        log(render_table(["target", "db", "figure", "status"], q_targets, right=(2,), group=False))
    if failures:
        log("")
        log("!" * 100)
        log("CORRECTNESS FAILURES (%d)" % len(failures))
        for f in failures:
            log("  [%s] %s/%s run %d: %s -- %s" % f)
        log("!" * 100)
    if errors:
        log("")
        log("ERRORS / n/a:")
        seen = set()
        for side, sc, db, run, err in errors:
            if (side, err) in seen:
                continue
            seen.add((side, err))
            lines = err.strip().splitlines() or ["?"]
            log("  [%s] %s/%s run %d: %s" % (side, sc, db, run, lines[0]))
            for ln in lines[1:][-15:]:
                log("      " + ln)
    elapsed = time.time() - t_start
    log("")
    log("total time %.1f s" % elapsed)

    doc = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
            "elapsed_s": elapsed,
            "argv": sys.argv[1:] if argv is None else argv,
            "config": conf,
            "scenarios": scenarios,
            "dbs": dbs,
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        },
        "sides": {s: {k: v for k, v in st.items()} for s, st in side_state.items()},
        "runs": runs + provider_runs + quota_runs,
        "summary": summary,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    latest = os.path.join(RESULTS_DIR, "latest.json")
    with open(latest, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        log("raw results written to %s" % args.json_out)
    else:
        log("raw results written to %s" % os.path.relpath(latest))

    rc = 0
    if failures:
        rc = 1
    if any(e[0] in ("dm232", "post_office") for e in errors):
        rc = 1
    if args.strict and any(e[0] == "ours" for e in errors):
        rc = 1
    return rc


def run_provider(variants, side_state, conf, pg_ok, scenario="provider"):
    """Every provider (or latency) configuration, run after run (so drift
    hits them all)."""
    runs = []
    latency = LATENCY_LINE if scenario == "latency" else PROVIDER_LATENCY
    for i in range(conf["runs"] if variants else 0):
        for key, side, db, _label, size, extra in variants:
            st = side_state[side]
            params = dict(extra, n=conf[scenario][size], latency=latency)
            if st["error"]:
                res = {"ok": False, "error": st["error"], "metrics": {}, "checks": [], "info": {},
                       "error_summary": "side not available: " + st["error"].splitlines()[0], "skipped": True}
            elif db == "postgres" and not pg_ok:
                res = {"ok": False, "error": "PostgreSQL not reachable", "metrics": {}, "checks": [], "info": {},
                       "skipped": True}
            else:
                t0 = time.time()
                res = run_worker(
                    st["python"],
                    ["scenario", scenario, "--db", db, "--params", json.dumps(params),
                     "--app", SIDES[side].get("app", "mailer")],
                    600 + params["n"],
                )
                log("[%s] %s/%s %s run %d/%d: %s  (%.1f s)"
                    % (side, scenario, db, key, i + 1, conf["runs"], short_summary("provider", res),
                       time.time() - t0))
            runs.append({"side": side, "scenario": scenario, "variant": key, "db": db, "run": i + 1,
                         "params": params, "result": res})
    return runs


def quota_params(variant, conf):
    key, _db, _label, extra = variant
    kind = key.split("_", 1)[0]
    params = dict(extra, n=conf["quota"][kind], rate="%d/s" % QUOTA_RATE, processes=QUOTA_PROCESSES,
                  concurrency=QUOTA_CONCURRENCY, latency=PROVIDER_LATENCY, pause_check=QUOTA_PAUSE_CHECK)
    # The drain at the quota, 3x, plus every pause the pushback run can take
    # (1 s doubling, +20 % jitter, at most 300 s each) and start-up.
    refused = params["n"] // (QUOTA_REJECT_EVERY - 1) + 1 if params.get("reject_every") else 0
    pauses = sum(min(300.0, 2.0 ** k) * 1.2 for k in range(refused))
    params["timeout"] = 120 + 3.0 * params["n"] / QUOTA_RATE + pauses
    return params


def run_quota(variants, side_state, conf, pg_ok):
    """The quota scenario's runs (ours only), run after run."""
    runs = []
    st = side_state.get("ours")
    for i in range(conf["quota_runs"] if variants else 0):
        for variant in variants:
            key, db = variant[0], variant[1]
            params = quota_params(variant, conf)
            if st is None or st["error"]:
                err = st["error"] if st else "ours side not set up"
                res = {"ok": False, "error": err, "metrics": {}, "checks": [], "info": {},
                       "error_summary": "side not available: " + err.splitlines()[0], "skipped": True}
            elif db == "postgres" and not pg_ok:
                res = {"ok": False, "error": "PostgreSQL not reachable", "metrics": {}, "checks": [], "info": {},
                       "skipped": True}
            else:
                t0 = time.time()
                res = run_worker(st["python"], ["scenario", "quota", "--db", db, "--params", json.dumps(params)],
                                 params["timeout"] + 300)
                log("[ours] quota/%s %s run %d/%d: %s  (%.1f s)"
                    % (db, key, i + 1, conf["quota_runs"], short_summary("quota", res), time.time() - t0))
            runs.append({"side": "ours", "scenario": "quota", "variant": key, "db": db, "run": i + 1,
                         "params": params, "result": res})
    return runs


def aggregate_quota(runs, variants):
    """Rows of the quota table (the worst run of each variant), its targets,
    the summary, failures and errors."""
    failures, errors = [], []
    by_key = {}
    for r in runs:
        by_key.setdefault(r["variant"], []).append(r)
        res = r["result"]
        if not res.get("ok"):
            errors.append((r["side"], "quota:" + r["variant"], r["db"], r["run"], _err_text(res)))
        for c in res.get("checks", []):
            if not c["ok"]:
                failures.append((r["side"], "quota:" + r["variant"], r["db"], r["run"], c["name"], c["detail"]))
    worst_of = {"max_1s": max, "mean_rate": min, "duplicates": max, "lost": max, "delivered": min,
                "rejects_421": max, "paused_lines": min, "quiet_after_421_min_s": min,
                "quiet_after_421_median_s": statistics.median, "quiet_after_421_max_s": max, "drain_s": max,
                "mails_in_pause": max, "paused_warnings": min,
                "n": max}
    summary, rows, targets = [], [], []
    limit = QUOTA_RATE + QUOTA_BURST
    floor = QUOTA_MEAN_FLOOR * QUOTA_RATE
    for key, db, label, _ in variants:
        rs = by_key.get(key, [])
        bad = any(not c["ok"] for r in rs for c in r["result"].get("checks", []))
        vals = {}
        for m, pick in worst_of.items():
            xs = [r["result"]["metrics"][m] for r in rs if r["result"].get("metrics", {}).get(m) is not None]
            vals[m] = pick(xs) if xs else None
        pushback = key.startswith("pushback")
        mark = "!" if bad else ""
        quiet = "-"
        if vals["quiet_after_421_min_s"] is not None:
            quiet = "%s / %s / %s" % tuple(fmt(vals[k]) for k in (
                "quiet_after_421_min_s", "quiet_after_421_median_s", "quiet_after_421_max_s"))
        rows.append([label, db, fmt(vals["n"], "msgs"), fmt(vals["delivered"], "msgs") + mark,
                     fmt(vals["duplicates"], "msgs") + mark, fmt(vals["lost"], "msgs") + mark,
                     fmt(vals["max_1s"], "msgs"), fmt(vals["mean_rate"]),
                     fmt(vals["rejects_421"], "msgs") if pushback else "-",
                     "%s (%s)" % (fmt(vals["paused_lines"], "msgs"), fmt(vals["paused_warnings"], "msgs")), quiet,
                     fmt(vals["mails_in_pause"], "msgs") if pushback else "-", fmt(vals["drain_s"])])

        once = None if vals["duplicates"] is None else (vals["duplicates"] == 0 and vals["lost"] == 0)
        once_fig = "n/a" if once is None else "%s dupl., %s missing" % (fmt(vals["duplicates"], "msgs"),
                                                                        fmt(vals["lost"], "msgs"))
        checks = []  # (target, figure, met?, is a correctness target)
        if not pushback:
            v = vals["max_1s"]
            checks.append(("no sliding 1 s holds more than %d + %d" % (QUOTA_RATE, QUOTA_BURST), fmt(v, "msgs"),
                           None if v is None else v <= limit, False))
            v = vals["mean_rate"]
            checks.append(("mean over the run >= %.2f x %d/s (%.0f)" % (QUOTA_MEAN_FLOOR, QUOTA_RATE, floor),
                           fmt(v), None if v is None else v >= floor, False))
            checks.append(("every message arrives once", once_fig, once, True))
        else:
            v, given = vals["paused_lines"], vals["rejects_421"]
            checks.append(("421 run: the route pauses ('paused' logged)",
                           "n/a" if v is None else "%s lines (%s WARNING) for %s 421s" % (
                               fmt(v, "msgs"), fmt(vals["paused_warnings"], "msgs"), fmt(given, "msgs")),
                           None if v is None else (v > 0 and bool(given)), True))
            checks.append(("421 run: every message arrives once", once_fig, once, True))
        for text, figure, met, correctness in checks:
            status = "n/a" if met is None else ("MET" if met else "MISSED")
            if met and bad and not correctness:
                status = "MISSED (correctness)"
            targets.append([text, db, figure, status])
            summary.append({"scenario": "quota", "variant": key, "side": "ours", "db": db, "label": label,
                            "target": text, "figure": figure, "status": status, "worst_run": vals,
                            "correctness_failed": bad})
    return summary, rows, targets, failures, errors


def _provider_targets(medians):
    """key -> (text, met?) for the provider scenario (None: no figure)."""
    po = medians.get("post_office_t10", {}).get("msgs_per_s")
    floor = 0.8 * 10 * PROVIDER_CONNECTION_LIMIT
    out = {}
    for key in ("ours_c10_sqlite", "ours_c10_pg"):
        v = medians.get(key, {}).get("msgs_per_s")
        text = ">= %.0f and >= 1.4x post_office" % floor
        out[key] = (text, None if v is None or po is None else (v >= floor and v >= 1.4 * po))
    v = medians.get("ours_3x5_pg", {}).get("msgs_per_s")
    out["ours_3x5_pg"] = (">= 92", None if v is None else v >= 92)
    return out


def _latency_targets(medians):
    """key -> (text, met?) for the latency scenario (None: no figure)."""
    def rate(key):
        return medians.get(key, {}).get("msgs_per_s")

    po, c1, c1_off, c10, c10_off = (rate(k) for k in (
        "lat_post_office_t10", "lat_ours_c1", "lat_ours_c1_nopipe", "lat_ours_c10", "lat_ours_c10_nopipe"))
    out = {}
    out["lat_ours_c1"] = (">= 1.6x ours without pipelining",
                          None if c1 is None or c1_off is None else c1 >= 1.6 * c1_off)
    out["lat_ours_c10"] = (">= 1.5x post_office and >= 1.3x ours without",
                           None if c10 is None or po is None or c10_off is None
                           else (c10 >= 1.5 * po and c10 >= 1.3 * c10_off))
    return out


def aggregate_provider(runs, variants, targets_of=None, scenario="provider"):
    by_key = {}
    failures = []
    errors = []
    for r in runs:
        by_key.setdefault(r["variant"], []).append(r)
        res = r["result"]
        if not res.get("ok"):
            errors.append((r["side"], scenario + ":" + r["variant"], r["db"], r["run"], _err_text(res)))
        for c in res.get("checks", []):
            if not c["ok"]:
                failures.append((r["side"], scenario + ":" + r["variant"], r["db"], r["run"], c["name"],
                                 c["detail"]))
    metric_keys = ["delivered", "duplicates", "lost", "connections", "max_open_connections", "msgs_per_s",
                   "msgs_per_s_wall", "send_window_s", "wall_s", "sender_cpu_ms_per_msg", "sink_cpu_ms_per_msg"]
    medians = {}
    bad = {}
    for key, *_ in variants:
        rs = by_key.get(key, [])
        bad[key] = any(not c["ok"] for r in rs for c in r["result"].get("checks", []))
        vals = {}
        for m in metric_keys:
            xs = [r["result"]["metrics"][m] for r in rs if m in r["result"].get("metrics", {})]
            vals[m] = statistics.median(xs) if xs else None
        # every run must deliver every message exactly once: report the worst run
        for m in ("duplicates", "lost"):
            xs = [r["result"]["metrics"][m] for r in rs if m in r["result"].get("metrics", {})]
            vals[m] = max(xs) if xs else None
        vals["n"] = rs[0]["params"]["n"] if rs else None
        medians[key] = vals
    targets = (targets_of or _provider_targets)(medians)
    summary = []
    rows = []
    for key, side, db, label, _, _ in variants:
        v = medians[key]
        ttext, met = targets.get(key, ("", None))
        status = ""
        if ttext:
            status = "n/a" if met is None else ("MISSED (correctness)" if bad[key] else ("MET" if met else "MISSED"))
        mark = "!" if bad[key] else ""
        summary.append({"scenario": scenario, "variant": key, "side": side, "db": db, "label": label,
                        "medians": v, "target": ttext or None, "status": status or None,
                        "correctness_failed": bad[key]})
        rows.append([label, "-" if key.startswith("ceiling") else db, fmt(v["n"]), fmt(v["delivered"], "msgs") + mark, fmt(v["duplicates"], "msgs") + mark,
                     fmt(v["connections"], "msgs"), fmt(v["msgs_per_s"]), fmt(v["msgs_per_s_wall"]), ttext, status])
    return summary, rows, failures, errors


def aggregate(runs, plan, sides, conf):
    summary = []
    table_rows = []
    failures = []
    errors = []
    by_key = {}
    for r in runs:
        by_key.setdefault((r["side"], r["scenario"], r["db"]), []).append(r)
        res = r["result"]
        if not res.get("ok"):
            errors.append((r["side"], r["scenario"], r["db"], r["run"], _err_text(res)))
        for c in res.get("checks", []):
            if not c["ok"]:
                failures.append((r["side"], r["scenario"], r["db"], r["run"], c["name"], c["detail"]))

    for sc, db in plan:
        if sc == "memory":
            metrics = memory_metrics(conf["sizes"])
        elif sc == "attachments":
            metrics = attachment_metrics(conf["att_mb"])
        else:
            metrics = METRICS[sc]
        med = {}
        bad = {}
        for side in sides:
            rs = by_key.get((side, sc, db), [])
            bad[side] = any(not c["ok"] for r in rs for c in r["result"].get("checks", []))
            vals = {}
            for key, _, _, _ in metrics:
                xs = [r["result"]["metrics"][key] for r in rs if key in r["result"].get("metrics", {})]
                vals[key] = statistics.median(xs) if xs else None
            med[side] = vals
        for key, label, unit, higher in metrics:
            d = med.get("dm232", {}).get(key)
            o = med.get("ours", {}).get(key)
            ratio = _ratio(d, o)
            target = TARGETS.get((sc, key))
            status = ""
            ttext = ""
            if target:
                ttext, needs_d, pred = target
                if o is None or (needs_d and d is None):
                    status = "n/a"
                elif bad.get("ours"):
                    status = "MISSED (correctness)"
                else:
                    status = "MET" if pred(d, o) else "MISSED"
            row = {
                "scenario": sc, "db": db, "metric": key, "label": label, "unit": unit,
                "higher_is_better": higher, "dm232": d, "ours": o, "ratio_ours_over_dm232": ratio,
                "target": ttext or None, "status": status or None,
                "correctness_failed": {s: bad[s] for s in sides},
            }
            summary.append(row)
            dcell = fmt(d, unit) + ("!" if bad.get("dm232") else "")
            ocell = fmt(o, unit) + ("!" if bad.get("ours") else "")
            if "dm232" not in sides:
                dcell = "-"
            if "ours" not in sides:
                ocell = "-"
            table_rows.append([
                sc, db, label, unit, dcell, ocell,
                ("%.2fx" % ratio) if ratio is not None else "-",
                "higher" if higher else "lower",
                ttext, status,
            ])
    return summary, table_rows, failures, errors


if __name__ == "__main__":
    sys.exit(main())
