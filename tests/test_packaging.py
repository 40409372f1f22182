"""retrack as an installed package: every package the code imports is declared, and the package
builds, installs into a fresh virtual environment and runs there from outside the checkout.

The install test copies what the build reads into a temporary folder (the build writes build/ and
an egg-info folder beside its source, which must not land in the checkout), makes a virtual
environment with --system-site-packages (torch and the rest are not installed again) and installs
the package there with pip, offline: --no-deps (the dependencies come from the system
site-packages) and --no-build-isolation (setuptools from requirements-test.txt builds it).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

# What `pip install .` reads from the checkout: pyproject.toml and the files it names.
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "requirements.txt", "requirements-test.txt", "retrack", "assets"]
# Imported when present, not a dependency: Hugging Face's ZeroGPU package (ui/settings.py).
OPTIONAL = {"spaces"}


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ("torch==2.14.1" -> "torch")."""
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group())


def declared(*files: str) -> set[str]:
    """The distribution names that these requirements files list."""
    lines = [line.strip() for f in files for line in (REPO / f).read_text().splitlines()]
    return {requirement_name(line) for line in lines if line and not line.startswith("#")}


def local_modules() -> set[str]:
    """Top-level names the project's own files provide (packages, app.py, test and script helpers)."""
    folders = [REPO, REPO / "tests", REPO / "scripts", REPO / "benchmarks"]
    return ({path.stem for folder in folders for path in folder.glob("*.py")}
            | {path.parent.name for folder in folders for path in folder.glob("*/__init__.py")})


def imported(*sources: str) -> set[str]:
    """The top-level module names that the Python files under these paths import."""
    files = [path for source in sources for path in ([REPO / source] if source.endswith(".py")
                                                     else sorted((REPO / source).rglob("*.py")))]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - local_modules() - OPTIONAL


@pytest.mark.parametrize("sources, requirements", [
    (["retrack", "ui", "app.py"], ["requirements.txt"]),
    (["tests", "scripts", "benchmarks"], ["requirements.txt", "requirements-test.txt"]),
], ids=["library-and-app", "tests-and-scripts"])
def test_every_imported_package_is_declared(sources, requirements):
    distributions = importlib.metadata.packages_distributions()
    wanted = declared(*requirements)
    undeclared = {module: sorted(distributions.get(module, [])) or "not installed"
                  for module in sorted(imported(*sources))
                  if not {normalise(d) for d in distributions.get(module, [])} & wanted}
    assert not undeclared, f"imported by {sources} but not in {requirements}: {undeclared}"


def run(command: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_package_installs_into_a_fresh_environment_and_runs_outside_the_checkout(tmp_path):
    source, environment, elsewhere = tmp_path / "source", tmp_path / "venv", tmp_path / "elsewhere"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    elsewhere.mkdir()
    # Nothing may reach the checkout: no PYTHONPATH, and every command runs in an unrelated folder.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    bin_dir = environment / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"

    # --without-pip: the system site-packages' pip (visible through --system-site-packages)
    # installs into the environment it runs in, so ensurepip is not needed. When the tests
    # themselves run in a virtual environment, a .pth file makes its packages visible instead.
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", environment], elsewhere, env)
    if sys.prefix != sys.base_prefix:  # the tests run in a virtual environment: its packages are the "system" ones
        purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], elsewhere, env)
        (Path(purelib.stdout.strip()) / "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--quiet", source], elsewhere, env)

    usage = run([bin_dir / "retrack", "--help"], elsewhere, env).stdout
    assert "unlearn" in usage and "sample" in usage
    assert run([python, "-m", "retrack", "--help"], elsewhere, env).stdout == usage  # the command is `python -m retrack`
    run([python, "-c", "import retrack; retrack.unlearn"], elsewhere, env)

    # The installed copy is the one imported, with the built-in assets inside it, and its
    # dependencies are requirements.txt's.
    facts = json.loads(run([python, "-c", "import importlib.metadata as m, json, retrack; from retrack import paths; "
                                          "print(json.dumps([retrack.__file__, str(paths.BUILTIN_MODEL), "
                                          "m.requires('retrack'), m.version('retrack'), retrack.__version__]))"],
                           elsewhere, env).stdout)
    module, model, requires, version, module_version = facts
    assert Path(module).resolve().is_relative_to(environment.resolve())
    assert Path(model).resolve().is_relative_to(environment.resolve()) and (Path(model) / "model_index.json").is_file()
    runtime = [r for r in requires if "extra ==" not in r]
    assert {requirement_name(r) for r in runtime} == declared("requirements.txt")
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(runtime)  # pinned together, as requirements.txt says
    assert version == module_version

    # The shipped built-in model loads and samples from the installed copy (2 DDIM steps: seconds).
    run([bin_dir / "retrack", "sample", "--model", "builtin", "--n", "2", "--steps", "2", "--device", "cpu",
         "--out", "grid.png"], elsewhere, env)
    assert (elsewhere / "grid.png").is_file()
