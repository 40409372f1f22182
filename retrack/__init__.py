"""retrack: make a diffusion model forget specific training images (ReTrack and baselines).

    from retrack import UnlearnConfig, load_backend, sample, save_model, unlearn

    backend = load_backend("my-ddpm")                       # a diffusers folder: pixel DDPM or Stable Diffusion
    forget, retain = backend.encode(bad), backend.encode(kept)  # images: NCHW tensors in [-1, 1]
    result = unlearn(backend, forget, retain, UnlearnConfig.preset("cifar"))
    save_model(backend, "my-ddpm-clean", result.metadata())  # a new folder, written atomically
    images = sample(backend, 16, seed=0).images              # seeded samples of the unlearned model

A started run that cannot finish raises `Cancelled`, `Diverged` or `OutOfMemory` (nothing is
saved; the message says what to try); a request refused before any work raises ValueError.

The names load on first use (PEP 562), so `import retrack` stays instant: torch and diffusers
are imported only when one of them is used. The rest lives in the submodules: `engine` (the
loop; around it `checks`, `devices`, `gradients`, `errors` and `reports`), `objectives` (the
methods), `presets` (the published settings), `cli`, `split` (Stable Diffusion), `bench`, and for
front ends `models`, `forget_set`, `jobs` (background runs) and `teaching`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_PUBLIC = {
    "unlearn": "engine",
    "UnlearnConfig": "engine",
    "save_model": "engine",
    "Cancelled": "errors",
    "Diverged": "errors",
    "OutOfMemory": "errors",
    "load_backend": "backends",
    "sample": "sampling",
}
__all__ = ["Cancelled", "Diverged", "OutOfMemory", "UnlearnConfig", "load_backend", "sample", "save_model", "unlearn"]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily
    from .backends import load_backend
    from .engine import UnlearnConfig, save_model, unlearn
    from .errors import Cancelled, Diverged, OutOfMemory
    from .sampling import sample


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'retrack' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
