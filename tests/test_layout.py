"""The package's layout: no import cycles, no module too long, every module says its concern.

Static checks over the source of ``mailer/``, and each module imported
first in a fresh interpreter: a
newcomer finds one concern per module, each short enough to read, and the
modules stand in layers, so any of them can be imported alone.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mailer"

#: Longest a module may be (the guideline is ~600 lines).
MAX_LINES = 650



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {
    _module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))
}
#: Django writes the migrations; they are imported by its loader only.
OWN_MODULES = sorted(name for name in MODULES if ".migrations" not in name)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node inside an ``if TYPE_CHECKING:`` block (never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def _imports(name: str, path: Path) -> set[str]:
    """The mailer modules ``name`` imports, at the top or inside functions.

    ``from mailer import x`` counts as an import of ``mailer.x`` when that is
    a module, else of ``mailer`` itself. The package every submodule's import
    runs first (Python's doing) is not counted.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    found.add(f"{source}.{alias.name}")
                elif source in MODULES:
                    found.add(source)
    found.discard(name)
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_graph_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mailer.engine import send_all\n"
        "def f():\n    from mailer.models import Message\n    from mailer import conf, x\n"
    )
    assert _imports("mailer.m", source) == {"mailer.models", "mailer.conf", "mailer"}


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", OWN_MODULES)
def test_module_is_short_enough(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it"


@pytest.mark.parametrize("name", OWN_MODULES)
def test_module_says_its_concern(name: str) -> None:
    source = MODULES[name].read_text(encoding="utf-8")
    if name.endswith(("management", "commands")) and not source.strip():
        pytest.skip("an empty package marker")
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{name} has no module docstring saying its concern"


#: Run in a fresh interpreter: each module of ours imported first, in a child
#: forked before anything of ours is loaded. A cycle shows as an ImportError
#: ("partially initialized module"); a module that needs the app registry may
#: say so (AppRegistryNotReady) and is then imported after ``django.setup()``.
_IMPORT_ALONE = """
import importlib, os, sys, traceback
import django
from django.core.exceptions import AppRegistryNotReady

# Django's own modules, loaded once before the forks (they are not ours).
for preload in ("django.db.models", "django.core.mail", "django.core.management.base",
                "django.contrib.admin", "django.test"):
    try:
        importlib.import_module(preload)
    except Exception:
        pass

def child(name, setup):
    try:
        if setup:
            django.setup()
        importlib.import_module(name)
    except AppRegistryNotReady:
        os._exit(3)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)

failed = []
for name in sys.argv[1:]:
    for setup in (False, True):
        pid = os.fork()
        if pid == 0:
            child(name, setup)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if status != 3:
            break
    if status != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [name for name in OWN_MODULES if ".migrations." not in name]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALONE, *names],
        cwd=PACKAGE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
