"""The benchmark and build scripts import what the library still has.

They run rarely (by hand, on a quiet machine or a GPU) and no other test runs them, so a renamed
or removed library name would otherwise break them silently, as happened to
benchmarks/eval_sampler.py when `retrack.session` went away. Read statically: every
`from retrack... import name` (and `from ui...`) of every script must resolve, without running
the scripts' own work.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from helpers import REPO

SCRIPTS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/**/*.py")])


def project_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for each `from retrack.x import name` / `from ui.x import name` in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in ("retrack", "ui"):
            out += [(node.module, alias.name) for alias in node.names]
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_imports_resolve(script):
    for module_name, name in project_imports(script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):  # `from retrack import metrics` names a submodule
            importlib.import_module(f"{module_name}.{name}")
