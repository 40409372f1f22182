"""Every relative link in the project's Markdown points at a file, and at a heading, that exists.

README.md, docs/ and the result files link to each other and to committed results by path and
heading; a renamed result or a retitled section (as when "Likelihood of the forget image (setting
v1 only)" lost its last words) would otherwise leave a dead link that no other test reads.
Headings become anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.*)$", flags=re.MULTILINE)
CODE = re.compile(r"```.*?```", flags=re.DOTALL)  # links and headings inside code blocks are not links


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / name for name in listed.stdout.split()]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def links(path: Path) -> list[str]:
    return LINK.findall(CODE.sub("", path.read_text()))


def anchors(path: Path) -> set[str]:
    return {anchor(heading) for heading in HEADING.findall(CODE.sub("", path.read_text()))}


def test_anchor_follows_github():
    assert anchor("Is it the ODE or the 50 steps? The sampler study") == "is-it-the-ode-or-the-50-steps-the-sampler-study"
    assert anchor("What an app job costs") == "what-an-app-job-costs"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_every_relative_link_resolves():
    files = markdown_files()
    assert REPO / "README.md" in files and REPO / "docs" / "RESULTS.md" in files
    dead = []
    for path in files:
        for target in links(path):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            name, _, heading = target.partition("#")
            destination = (path.parent / name).resolve() if name else path
            if not destination.exists():
                dead.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif heading and destination.suffix == ".md" and heading not in anchors(destination):
                dead.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not dead, "\n".join(dead)
