"""The retrack web app: make a diffusion model forget images, in the browser.

    python app.py                          # the built-in digits + T-shirt model, http://127.0.0.1:7860
    python app.py --model path/to/ddpm     # your own pixel DDPM folder (or a Hub id, when online)
    python app.py --model m --data train/  # ... with the folder of images it was trained on
    python app.py --quick                  # tiny settings: a run takes seconds (for tests, demos)

    python app.py --host 0.0.0.0 --folders /srv/models --auth USER:PASSWORD   # before sharing it
    python app.py --space                  # as on a Hugging Face Space: job limits, queue size

Every option also reads an environment variable (RETRACK_APP_MODEL, RETRACK_APP_DATA,
RETRACK_APP_HOST, RETRACK_APP_PORT, RETRACK_APP_OUTPUT, RETRACK_APP_QUICK, RETRACK_APP_FOLDERS,
RETRACK_APP_AUTH; the variable keeps a password out of the process list). On a Hugging Face Space
(SPACE_ID is set there) `--space` is on by default: see `SpaceLimits`. When the `spaces` package is
installed (ZeroGPU Spaces come with it; this project does not depend on it), the GPU-bound
handlers carry its ZeroGPU decorator, which on ZeroGPU hardware attaches a GPU for each call and
elsewhere does nothing.

This file is the entry point only. The page is the `ui` package, one module per section in the
order a user works (model, forget set, method and run, results, teaching view); what the page
does (open a model and its training data, build the forget set, run a job in the background,
sample, score) lives in the library (`retrack.models`, `retrack.forget_set`, `retrack.jobs`,
`retrack.teaching`), which never imports gradio.
"""

from __future__ import annotations

import logging

from ui import AppSettings, SpaceLimits, build_app, launch, settings_from_args

__all__ = ["AppSettings", "SpaceLimits", "build_app", "launch", "settings_from_args"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    app_settings, app_host, app_port = settings_from_args()
    launch(app_settings, app_host, app_port)
