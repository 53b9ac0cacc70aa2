"""Sphinx configuration for the django-mailer documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html``. The version is
read from ``mailer/__init__.py`` without importing the package (importing it
would need configured Django settings).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_init = (ROOT / "mailer" / "__init__.py").read_text(encoding="utf-8")
release = re.search(r'^__version__ = "([^"]+)"', _init, re.MULTILINE).group(1)
version = ".".join(release.split(".")[:2])

project = "django-mailer"
author = "django-mailer developers"
copyright = "2026, django-mailer developers"

extensions: list[str] = []
templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"
highlight_language = "python"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"django-mailer {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Queue outgoing email in the database; send it later.",
    "fixed_sidebar": True,
}
