"""Which device a job uses, and one job at a time on it.

`describe_device` names the device for people; `device_queue` is the one first-come,
first-served line of a device, shared by every job (and "Generate & split") in this process.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional

import torch

from .engine import resolve_device


def describe_device(device: str = "auto") -> str:
    """'NVIDIA H100 80GB HBM3 (cuda:0)' or 'CPU (2 threads)': what the page shows."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(index)} ({device})"
    return f"CPU ({torch.get_num_threads()} threads)"


class DeviceQueue:
    """First come, first served use of one device: one job at a time, the others wait in line.

    The app's page stays responsive because waiting happens in each job's own worker thread; a
    waiting job can be cancelled and leaves the line at once.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: deque[object] = deque()
        self._holder: Optional[object] = None

    def acquire(self, owner: object, cancel: threading.Event, on_wait: Callable[[int], None] = lambda ahead: None) -> bool:
        """Block until `owner` holds the device (True) or `cancel` is set (False).
        `on_wait(jobs_ahead)` is called whenever the position in the line changes."""
        with self._changed:
            self._line.append(owner)
            last_reported = -1
            try:
                while True:
                    if cancel.is_set():
                        return False
                    if self._holder is None and self._line[0] is owner:
                        self._line.popleft()
                        self._holder = owner
                        return True
                    ahead = list(self._line).index(owner) + (self._holder is not None)
                    if ahead != last_reported:
                        on_wait(ahead)
                        last_reported = ahead
                    self._changed.wait(timeout=0.2)  # wake up regularly to see `cancel`
            finally:
                if self._holder is not owner and owner in self._line:
                    self._line.remove(owner)
                    self._changed.notify_all()

    def release(self, owner: object) -> None:
        with self._changed:
            if self._holder is owner:
                self._holder = None
                self._changed.notify_all()

    @property
    def busy(self) -> bool:
        return self._holder is not None


_DEVICE_QUEUES: dict[str, DeviceQueue] = {}
_DEVICE_QUEUES_LOCK = threading.Lock()


def device_queue(device: str) -> DeviceQueue:
    """The one queue of a device ("cpu", "cuda:0", ...), shared by every job in this process."""
    key = "cuda:0" if device == "cuda" else device
    with _DEVICE_QUEUES_LOCK:
        return _DEVICE_QUEUES.setdefault(key, DeviceQueue())

