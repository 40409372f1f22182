"""Helpers shared by the tests that drive a real app server with gradio_client (test_app.py,
test_load.py) and the ones that check folders on disk. Plain functions, no fixtures."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path


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
