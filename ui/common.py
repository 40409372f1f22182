"""What every section of the page uses: the shared `Page` state, readable errors, number boxes.

A handler never shows a stack trace: `readable_errors` turns a user's mistake (USER_ERRORS)
into a short message in the page and anything else into one line that points to the server log.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Union

import gradio as gr

from retrack.forget_set import GalleryItem
from retrack.comparison import Comparison
from retrack.jobs import Job
from retrack.models import ModelInfo, open_model

from .settings import AppSettings

log = logging.getLogger("retrack.app")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


@functools.lru_cache(maxsize=4)
def cached_model(spec: str, data_folder: str) -> ModelInfo:
    """Opened models, so each click does not rebuild the training data (the Load button clears it)."""
    return open_model(spec, data_folder)


@dataclass
class Page:
    """What the handlers of one page share: the server's settings and, per visitor (browser
    session), the running job or comparison (so Cancel finds it) and the last unlearned model (the teaching
    views' "after")."""

    settings: AppSettings
    running: dict[str, Union[Job, Comparison]] = field(default_factory=dict)
    unlearned: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards `running`

    def open_model(self, spec: str, data_folder: str) -> ModelInfo:
        """cached_model, for what a visitor typed: only folders the server allows."""
        spec, data_folder = spec.strip(), data_folder.strip()
        self.settings.check_folders(spec, data_folder)
        return cached_model(spec, data_folder)


def readable_errors(handler: Callable) -> Callable:
    """Show failures as a short message in the page, never a stack trace (which goes to the log)."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}); details are in the server log",
                           print_exception=False) from None
    return wrapper


def number(value) -> float:
    """A number from a number box; an empty box (None, possible through the API) is refused."""
    if value is None:
        raise ValueError("a number box is empty")
    return float(value)


def whole(value) -> int:
    """A whole number from a number box (which may send 3.0); refuses 2.5."""
    if not number(value).is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(number(value))


def tiles(items: list[GalleryItem]) -> list[tuple]:
    """Gallery tiles (image, caption); grey images as 2-D arrays."""
    return [(item.image[..., 0] if item.image.shape[-1] == 1 else item.image, item.caption) for item in items]
