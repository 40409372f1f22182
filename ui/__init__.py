"""The retrack web app's page (gradio): one module per section of the page, with its handlers.

    settings.py    AppSettings, settings_from_args, SpaceLimits, gpu_task (ZeroGPU)
    common.py      Page (what every handler shares), readable errors, number boxes
    model.py       1 · the model and its training data
    forget_set.py  2 · what to forget: gallery picks, uploads, generate & split
    run.py         3-4 · method settings (RunForm) and the run
    results.py     5 · before/after grids and scores; how a job's state is drawn
    compare.py     6 · methods side by side: overlaid live curves, a column and a grid per method
    teaching.py    7 · trajectory, noise and denoise, likelihood
    page.py        build_app (the sections laid out and wired), launch

What the page does lives in the library (`retrack.models`, `retrack.forget_set`,
`retrack.jobs`, `retrack.comparison`, `retrack.teaching`), which never imports gradio.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outside look-ups at launch

# settings first: it imports ZeroGPU's `spaces` (when installed) before anything imports torch.
from .settings import AppSettings, SpaceLimits, settings_from_args  # noqa: E402
from .page import build_app, launch  # noqa: E402

__all__ = ["AppSettings", "SpaceLimits", "build_app", "launch", "settings_from_args"]
