"""Devices and precision: where work runs, in which precision, and one job at a time there.

`resolve_device` checks a device name ('auto', 'cpu', 'cuda:1', ...) and `training_device` says
where a run trains (under `accelerate launch`, each process's own GPU); `resolve_precision` and
`AUTOCAST_DTYPES` are a training run's mixed precision. `describe_device` names the device for
people; `device_queue` is the one first-come, first-served line of a device, shared by every job
(and "Generate & split") in this process.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional

import torch
from accelerate import PartialState
from accelerate.utils import parse_choice_from_env

# Mixed precision: the autocast dtype of each mode ("no" = fp32 throughout, the published setting).
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; other names are checked (ValueError)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("an Apple GPU (mps) was asked for but is not available here")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("a CUDA device was asked for but no GPU is available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"there is no {device} here: {torch.cuda.device_count()} GPU(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
    return device


def training_device(requested: str) -> str:
    """The device a run trains on: `requested` ('auto', 'cpu', 'cuda:1', ...) resolved, or under
    `accelerate launch` with several GPU processes, this process's own GPU. Load the model there
    before encoding images, so the VAE encodes on the device the UNet trains on."""
    device = resolve_device(requested)
    state = PartialState(cpu=device == "cpu")
    if device != "cpu" and state.num_processes > 1:
        return str(state.device)
    return device


def resolve_precision(requested: Optional[str]) -> str:
    """The mixed precision of a training run: 'no' (fp32), 'bf16' or 'fp16'. (Sampling has its
    own, `sampling.resolve_precision`.)

    None (not set) takes what `accelerate launch --mixed_precision` or `accelerate config` chose:
    accelerate hands it to the processes it starts as ACCELERATE_MIXED_PRECISION. Read from there,
    not from an `Accelerator`: accelerate's state fixes the precision once per process, and the
    app runs jobs with different settings in one process.
    """
    mode = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no") if requested is None else requested
    if mode not in AUTOCAST_DTYPES:
        where = " (set by accelerate launch or accelerate config)" if requested is None else ""
        raise ValueError(f"mixed precision must be 'no', 'bf16' or 'fp16', got {mode!r}{where}")
    return mode


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

