"""The errors an unlearning run raises once it has started, and how running out of memory is told.

    try:
        result = unlearn(backend, forget, retain, config)
    except (Cancelled, Diverged, OutOfMemory) as exc:
        print(exc)  # nothing was saved; the message says what to try

A request refused before any work starts raises ValueError instead (`checks`). Running out of
memory reaches Python as several different exceptions depending on the allocator;
`is_out_of_memory` recognises them all, and `out_of_memory_reported` turns them into one
`OutOfMemory` with what to try. All three errors are exported from `retrack`.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Iterator

import torch


class Cancelled(Exception):
    """The run was cancelled from another thread; nothing was saved."""


class Diverged(RuntimeError):
    """A loss or gradient became NaN/inf; the run stopped and nothing was saved."""


class OutOfMemory(RuntimeError):
    """The device (GPU or CPU) ran out of memory; the run stopped and nothing was saved."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory: torch's OutOfMemoryError (CUDA),
    MemoryError, or the RuntimeError other allocators raise ("DefaultCPUAllocator: can't
    allocate memory", "MPS backend out of memory", cuBLAS failing to allocate its workspace)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and not isinstance(exc, (Diverged, OutOfMemory)) and any(
        sign in message for sign in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


@contextmanager
def out_of_memory_reported(device: str, batch_size: int) -> Iterator[None]:
    """Turn the device running out of memory inside the block into OutOfMemory, with what to try.

    The failed run's tensors are released first (the frames the error passed through are
    cleared and the CUDA cache emptied), so the process can go on with other work.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        traceback.clear_frames(exc.__traceback__)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        hint = ("lower the batch size and raise gradient accumulation to keep the same effective batch"
                + ("" if device == "cpu" else ", or use mixed precision (bf16/fp16)"))
        where = "the CPU" if device == "cpu" else f"the GPU ({device})"
        raise OutOfMemory(f"{where} ran out of memory with batch size {batch_size} "
                          f"({type(exc).__name__}); {hint}") from None
