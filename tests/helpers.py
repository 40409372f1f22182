"""Helpers shared by the tests (plain functions, no fixtures): the repository root, free ports,
digests of folders on disk, and driving a real app server with gradio_client (test_app.py,
test_load.py, test_space.py, test_browser.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parent.parent


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merged(outputs: list) -> list:
    """The page as it ends up: each output's last real value (the app skips unchanged pictures,
    which reach the client as {'__type__': 'update'})."""
    page = list(outputs[0])
    for update in outputs[1:]:
        for i, value in enumerate(update):
            if not (isinstance(value, dict) and value.get("__type__") == "update"):
                page[i] = value
    return page


def wait_for_status(job, text: str, timeout: float = 120) -> None:
    """Wait until the job's status box has shown `text`."""
    deadline = time.monotonic() + timeout
    while not any(str(update[0]).startswith(text) for update in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), f"the status never showed {text!r}"
        time.sleep(0.05)


def follow(job, timeout: float = 300) -> list:
    """Poll a submitted job until it ends; return every progress description seen."""
    progress, deadline = [], time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish in time"
        status = job.status()
        if status.progress_data:
            progress += [unit.desc for unit in status.progress_data if unit.desc]
        time.sleep(0.01)
    return progress


@contextmanager
def app_server(args: list[str], log: Path, env: Optional[dict] = None,
               python: Optional[list[str]] = None) -> Iterator[str]:
    """`python app.py ARGS --port FREE` in a subprocess, exactly as a user starts it (offline, no
    analytics); yields its URL once it serves and stops it afterwards. `python` replaces
    `[sys.executable, "app.py"]`, e.g. to start it with `-c` and a prelude; `env` adds variables."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    command = [*(python or [sys.executable, str(REPO / "app.py")]), *args, "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "Running on local URL" not in log.read_text():
            assert server.poll() is None, f"the app exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the app did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
