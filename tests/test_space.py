"""The app as a Hugging Face Space: it starts and serves with and without the `spaces` package.

Both servers are `app.py --quick` in a subprocess, started as a user (or a Space) starts it:
- with a stand-in `spaces` package on PYTHONPATH (Hugging Face's ZeroGPU package cannot run
  outside a ZeroGPU Space anyway: there its decorator is a no-op) whose `GPU(duration=...)` writes
  down each function it decorates and each call, and with SPACE_ID set as on a Space: the page
  shows the Space's limits, a job within them runs through the decorated handler, a job over them
  is refused with a reason, and folders outside the built-in assets cannot be opened;
- with `spaces` made unimportable and no SPACE_ID: the page serves without limits and a job runs.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import app_server, follow, merged
from test_app import MODEL, run_args, tshirt_pick

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"the model {MODEL} is not built")

STUB_SPACES = '''"""Stand-in for Hugging Face's `spaces`: GPU(duration=...) records what it decorates and each call."""
import functools, inspect, json, os


def _record(*entry):
    with open(os.environ["STUB_SPACES_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\\n")


def GPU(task=None, *, duration=None, size=None):
    def decorate(function):
        _record("decorated", function.__name__, duration)
        if inspect.isgeneratorfunction(function):
            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                _record("called", function.__name__)
                yield from function(*args, **kwargs)
        else:
            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                _record("called", function.__name__)
                return function(*args, **kwargs)
        return wrapper
    return decorate if task is None else decorate(task)
'''

# `python -c` with `spaces` unimportable (a None entry in sys.modules makes `import spaces` raise
# ImportError, whether or not the package is installed), then app.py as its own __main__.
WITHOUT_SPACES = [sys.executable, "-c", "import runpy, sys; sys.modules['spaces'] = None; "
                  "sys.argv[0] = 'app.py'; runpy.run_path('app.py', run_name='__main__')"]


def page_component(url: str, elem_id: str):
    """The props of the page's component with this elem_id (None if absent), from gradio's config."""
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.load(response)
    return next((c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id), None)


def run_job(url: str, args: list) -> str:
    """Submit /unlearn and return the final status line."""
    from gradio_client import Client

    job = Client(url, verbose=False).submit(*args, api_name="/unlearn")
    follow(job, timeout=300)
    return merged(job.outputs())[0]


def serves_the_page(url: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200 and "retrack" in response.read().decode()


@pytest.mark.parametrize("on_gpu", [False, True])
def test_every_published_preset_fits_the_space_limits(on_gpu):
    import app
    from retrack.engine import UnlearnConfig
    from retrack.presets import PRESETS

    settings = app.AppSettings(limits=app.SpaceLimits.for_hardware(on_gpu))
    for preset in PRESETS:
        defaults = settings.run_defaults(preset)
        settings.limits.check(UnlearnConfig.preset(preset), defaults["n_samples"], defaults["sampling_steps"])
    with pytest.raises(ValueError, match=r"on this Space, steps must lie in \[1, \d+\], got 1000"):
        settings.limits.check(UnlearnConfig.preset("mnist", steps=1000), 1, 1)


def test_on_a_space_with_spaces_installed(tmp_path):
    from gradio_client import Client

    (tmp_path / "stub" / "spaces").mkdir(parents=True)
    (tmp_path / "stub" / "spaces" / "__init__.py").write_text(STUB_SPACES)
    record = tmp_path / "spaces.log"
    env = {"PYTHONPATH": str(tmp_path / "stub"), "STUB_SPACES_LOG": str(record), "SPACE_ID": "someone/retrack"}
    args = ["--quick", "--host", "127.0.0.1", "--output-dir", str(tmp_path / "out")]
    with app_server(args, tmp_path / "server.log", env=env) as url:
        serves_the_page(url)
        limits = page_component(url, "space-limits")
        assert limits is not None and "up to 60 steps of 128 rows" in limits["value"], limits
        assert page_component(url, "steps")["maximum"] == 60

        client = Client(url, verbose=False)
        picks = tshirt_pick(client)
        status = run_job(url, run_args(picks, steps=2))
        assert status.startswith("Done"), status
        too_many_rows = run_args(picks, steps=2)
        too_many_rows[12] = 100  # gradient accumulation: 8 x 100 rows per step
        status = run_job(url, too_many_rows)
        assert status.startswith("⚠") and "on this Space, batch size × gradient accumulation must lie in [1, 128], " \
                                          "got 800" in status, status
        with pytest.raises(Exception, match="61 is greater than maximum value 60"):  # the steps box's limit
            client.predict(*run_args(picks, steps=61), api_name="/unlearn")
        # Visitors open the start-up model and the built-in assets only, not the Space's disk.
        info = client.predict(str(tmp_path), "", api_name="/load_model")[0]
        assert info.startswith("⚠") and "opens folders under" in info, info

    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert ["decorated", "run", 120] in entries and ["decorated", "generate", 60] in entries
    assert entries.count(["called", "run"]) == 2  # the job that ran and the one refused inside the handler


def test_without_spaces_and_off_a_space(tmp_path):
    args = ["--quick", "--output-dir", str(tmp_path / "out")]
    with app_server(args, tmp_path / "server.log", env={"SPACE_ID": ""}, python=WITHOUT_SPACES) as url:
        serves_the_page(url)
        assert page_component(url, "space-limits") is None
        assert page_component(url, "steps").get("maximum") is None
        from gradio_client import Client

        status = run_job(url, run_args(tshirt_pick(Client(url, verbose=False)), steps=2))
        assert status.startswith("Done"), status
    assert "ModuleNotFoundError" not in (tmp_path / "server.log").read_text()
