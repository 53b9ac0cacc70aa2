#!/usr/bin/env python3
"""Set up and run the whole test suite: ``python3 runtests.py``.

Creates ``.venv-tox`` with tox in it, then runs the tox matrix (Python 3.11 +
Django 4.2, 3.12 + 5.2, 3.13 + 6.1; SQLite, plus PostgreSQL when
``MAILER_TEST_POSTGRES=1``, plus MariaDB/MySQL when ``MAILER_TEST_MARIADB=1``;
docs; lint; typing). Interpreters are found on PATH or under pyenv. Missing
interpreters are reported and skipped, unless ``MAILER_TEST_STRICT=1`` (CI),
where they are an error.

Extra arguments go to tox, e.g. ``python3 runtests.py -e py313-django61-sqlite
-- -k engine``.
"""

import glob
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv-tox"
PYTHONS = {"py311": "3.11", "py312": "3.12", "py313": "3.13"}
MATRIX = [("py311", "django42"), ("py312", "django52"), ("py313", "django61")]
# Database servers beyond SQLite: tox factor, name, the variable that enables them.
SERVERS = [
    ("postgres", "PostgreSQL", "MAILER_TEST_POSTGRES"),
    ("mariadb", "MariaDB/MySQL", "MAILER_TEST_MARIADB"),
]


def tox_python() -> Path:
    bindir = VENV / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    if not python.exists():
        print(f"Creating {VENV.name} ...", flush=True)
        venv.create(VENV, with_pip=True)
    probe = subprocess.run([python, "-c", "import tox"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "tox>=4.11"], check=True)
    return python


def find_interpreters() -> dict[str, str]:
    """Directories holding each wanted interpreter (PATH first, then pyenv)."""
    found = {}
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for env, version in PYTHONS.items():
        exe = shutil.which(f"python{version}")
        if exe and subprocess.run([exe, "-V"], capture_output=True).returncode == 0:
            found[env] = str(Path(exe).resolve().parent)
            continue
        candidates = sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin")))
        if candidates:
            found[env] = candidates[-1]
    return found


def main(argv: list[str]) -> int:
    strict = os.environ.get("MAILER_TEST_STRICT") == "1"
    enabled = [factor for factor, _, variable in SERVERS if os.environ.get(variable) == "1"]
    interpreters = find_interpreters()
    path = os.pathsep.join([*dict.fromkeys(interpreters.values()), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path}
    if "-e" in argv:
        envs = None
    else:
        databases = ["sqlite", *enabled]
        envs = []
        for py, dj in MATRIX:
            if py not in interpreters:
                message = f"Python {PYTHONS[py]} not found: skipping {py}-{dj}"
                if strict:
                    print(f"ERROR: {message} (MAILER_TEST_STRICT=1)", file=sys.stderr)
                    return 2
                print(f"WARNING: {message}", file=sys.stderr)
                continue
            envs += [f"{py}-{dj}-{db}" for db in databases]
        envs += ["docs", "lint", "typing"]
        for factor, label, variable in SERVERS:
            if factor not in enabled:
                print(f"Note: {label} environments skipped; set {variable}=1 to run them.")
    python = tox_python()
    command = [str(python), "-m", "tox", "run-parallel" if envs else "run"]
    if envs:
        command += ["-e", ",".join(envs), "--parallel", os.environ.get("MAILER_TEST_PARALLEL", "2"),
                    "--parallel-no-spinner"]
    command += argv
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
