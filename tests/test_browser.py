"""The app in a real browser: headless Chromium opens the page, which opens with the built-in
model's T-shirt picked, starts a short run, watches the live memorisation curve gain points while
the run goes on, waits for the after-grid (and the oracle's), checks the live loss plot drew
points and the live noise-and-denoise curve rose from the T-shirt towards the oracle's level
(the image comes back less and less), and saves a screenshot (tmp folder; also to
$RETRACK_SCREENSHOT when set, e.g. docs/app.png).

The server is `python app.py --quick` in a subprocess, exactly as a user starts it. Needs
/usr/bin/chromium (`apt-get install -y chromium`; CI installs it) and is skipped without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import app_server
from retrack import paths
from ui.compare import METHOD_COLOURS
from ui.run import RETURN_COLOURS

# The built-in model, or another with the same companions (dataset.json, clip/) beside it; the
# app reads the same variable.
MODEL = Path(os.environ.get("RETRACK_APP_MODEL", paths.BUILTIN_MODEL))
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is not installed"),
    pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"the model {MODEL} is not built"),
]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


SERVER_LOG: list[Path] = []  # the running server's log, for failure messages


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py --quick` on a free port; yields its URL, stops it afterwards."""
    quick = [] if os.environ.get("RETRACK_BROWSER_FULL") else ["--quick"]  # full: published settings
    log = tmp_path_factory.mktemp("server") / "server.log"
    SERVER_LOG[:] = [log]
    with app_server([*quick, "--output-dir", str(tmp_path_factory.mktemp("app-output"))], log) as url:
        yield url


def server_log_tail(lines: int = 40) -> str:
    return "\n".join(SERVER_LOG[0].read_text().splitlines()[-lines:]) if SERVER_LOG else "(no server log)"


@contextlib.contextmanager
def open_page(app_url: str) -> Iterator:
    """A headless Chromium page showing the app; the browser closes afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            yield page
        finally:
            browser.close()


def test_pick_the_tshirt_run_and_see_results(app_url, tmp_path):
    full = bool(os.environ.get("RETRACK_BROWSER_FULL"))
    with open_page(app_url) as page:
        # The page opens with the memorised T-shirt (the gallery's first tile) already picked.
        page.wait_for_selector("#training-gallery img", timeout=120_000)
        shirt = page.locator("#training-gallery button.thumbnail-item").first.inner_text()
        assert "t-shirt" in shirt and "copies" in shirt, shirt
        picks = page.locator("#forget-picks textarea, #forget-picks input").first
        page.wait_for_function("el => /#\\d+/.test(el.value)", arg=picks.element_handle(), timeout=60_000)
        assert picks.input_value() == shirt.split()[0], (picks.input_value(), shirt)  # caption: "#<index> t-shirt"
        page.wait_for_selector("#forget-preview img", timeout=30_000)
        assert "1 image(s) to forget" in page.locator("#forget-summary").inner_text()

        steps = int(float(page.locator("#steps input").input_value()))
        page.click("#run")
        # The live memorisation curve gains points while the job trains (one per evaluation,
        # step 0 first), before the after-grid arrives; two measures (pixel L2, CLIP).
        live = page.locator("#memorisation-plot [aria-roledescription='line mark']")
        seen, deadline = [], time.monotonic() + (900 if full else 240)
        while page.locator("#after-grid img").count() == 0:
            assert time.monotonic() < deadline, f"the run did not finish; live curve sizes seen {seen}"
            sizes = [line.get_attribute("d").count("L") + 1 for line in live.all()]
            if sizes and (not seen or sizes != seen[-1]):
                seen.append(sizes)
            page.wait_for_timeout(100)
        growing = [max(sizes) for sizes in seen]
        assert len(set(growing)) >= 2 and growing == sorted(growing), seen
        assert growing[0] < steps + 1, seen  # a partial curve was drawn before the run ended
        # The loss plot filled in while the job ran: three curves (total, unlearning, retain).
        lines = page.locator("#loss-plot [aria-roledescription='line mark']")
        lines.first.wait_for(timeout=60_000)
        page.wait_for_selector("#oracle-grid img", timeout=60_000)
        # (lazy images load near the viewport only, and the results above it have grown)
        page.locator("#trajectory").scroll_into_view_if_needed()
        page.wait_for_selector("#trajectory img", timeout=60_000)
        # the after grid comes before the DDIM-50 reading of the same seeds; the job ends after it
        status_box, done_by = page.locator("#status textarea"), time.monotonic() + 240
        while not status_box.input_value().startswith("Done") and time.monotonic() < done_by:
            page.wait_for_timeout(200)
        status = status_box.input_value()
        assert status.startswith("Done") and "under DDIM-50" in status, status
        # The samples nearest the T-shirt under both samplers (rows before / after / oracle) and, with
        # the built-in classifier, the share of each class: 11 classes, a bar each for before, after, oracle.
        page.locator("#nearest-paper").scroll_into_view_if_needed()
        page.wait_for_selector("#nearest-paper img", timeout=30_000)
        page.wait_for_selector("#nearest-ddim img", timeout=30_000)
        page.locator("#class-plot").scroll_into_view_if_needed()
        bars = page.locator("#class-plot [aria-roledescription='bar']")
        bars.first.wait_for(state="attached", timeout=30_000)  # a class with no sample has a bar of height 0
        assert bars.count() == 33, bars.count()

        # ... and in the end holds one point per training step on each curve.
        assert lines.count() == 3
        for line in lines.all():
            assert line.get_attribute("d").count("L") + 1 == steps
        assert "memorisation rate" in page.locator("#metrics").inner_text()
        assert "excess over the oracle" in page.locator("#metrics").inner_text()
        # The live curve ends with one point per evaluation: steps 0..steps in quick mode.
        if not full:
            assert [line.get_attribute("d").count("L") + 1 for line in live.all()] == [steps + 1] * 2
        # The noise-and-denoise curve: the T-shirt's noisy copies at two t, one point per live
        # evaluation, and the oracle's level as a flat grey line at each t. The copies land
        # farther from the T-shirt as training goes on (SVG y grows downwards: up is farther).
        returns = {line.get_attribute("stroke"): path_points(line.get_attribute("d"))
                   for line in page.locator("#return-plot [aria-roledescription='line mark']").all()}
        assert set(returns) == set(RETURN_COLOURS.values()), returns
        high, oracle_high = returns[RETURN_COLOURS["t = 500"]], returns[RETURN_COLOURS["oracle, t = 500"]]
        if not full:
            assert len(high) == steps + 1 and len(returns[RETURN_COLOURS["t = 240"]]) == steps + 1, returns
        assert len({y for _, y in oracle_high}) == 1, oracle_high
        first, last, oracle_level = high[0][1], high[-1][1], oracle_high[0][1]
        assert oracle_level < first and last < first, (high, oracle_high)  # the return fell as it trained
        if full:  # the published 50 steps: most of the way to the oracle's level
            assert first - last > (first - oracle_level) / 3, (high, oracle_high)
        assert "noisy copies of the forget image" in status, status
        # The teaching views now compare against the model this run saved.
        after = page.locator("#teach-after-model textarea, #teach-after-model input").first
        page.wait_for_function("el => /-retrack$/.test(el.value)", arg=after.element_handle(), timeout=30_000)

        page.set_viewport_size({"width": 1400, "height": 2400})
        page.wait_for_timeout(500)
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("RETRACK_SCREENSHOT"):
            shutil.copy(shot, os.environ["RETRACK_SCREENSHOT"])


def path_points(d: str) -> list[tuple[float, float]]:
    """The (x, y) points of an SVG line path as Vega writes it ('M1,2L3,4L5,6')."""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", d)]
    return list(zip(numbers[::2], numbers[1::2]))


def test_text_to_image_split_shows_two_galleries_and_a_click_moves_an_image(app_url, tmp_path):
    """A Stable Diffusion model (tiny, random) typed into the page: Generate & split fills the two
    galleries, and clicking a kept image moves it to the forget side."""
    from retrack.testing import build_tiny_clip, build_tiny_sd_pipeline

    model = tmp_path / "model"
    build_tiny_sd_pipeline(seed=0, image_size=32, save_to=model)
    build_tiny_clip(tmp_path / "clip")  # the scorer the split embeds with, found beside the model
    with open_page(app_url) as page:
        page.wait_for_selector("#training-gallery img", timeout=120_000)  # the built-in model first
        page.locator("#model-path textarea, #model-path input").first.fill(str(model))
        page.click("#load-model")
        # The prompt box is shown for text-to-image models only; a model that cannot be opened
        # says why in the summary instead.
        prompt = page.locator("#prompt textarea, #prompt input").first
        try:
            page.wait_for_function(
                "() => { const p = document.querySelector('#prompt textarea, #prompt input');"
                " return (p && p.offsetParent !== null)"
                " || document.querySelector('#model-info').innerText.includes('⚠'); }", timeout=120_000)
        except Exception as exc:  # a timeout: say what the page and the server showed
            raise AssertionError(f"no prompt box after Load: model box "
                                 f"{page.locator('#model-path textarea, #model-path input').first.input_value()!r}, "
                                 f"summary {page.locator('#model-info').inner_text()!r}\n"
                                 f"server log:\n{server_log_tail()}") from exc
        assert prompt.is_visible(), page.locator("#model-info").inner_text()
        prompt.fill("a photo of a cat")
        page.locator("#n-generations input").first.fill("8")
        page.click("#generate-split")

        forget_tiles = page.locator("#split-forget button.thumbnail-item")
        kept_tiles = page.locator("#split-retain button.thumbnail-item")
        page.wait_for_function(
            "() => document.querySelectorAll('#split-forget button.thumbnail-item').length"
            " + document.querySelectorAll('#split-retain button.thumbnail-item').length == 8", timeout=180_000)
        before = forget_tiles.count()
        assert before >= 1 and kept_tiles.count() == 8 - before
        moved = kept_tiles.first.inner_text().split()[0]  # its caption starts with "#<index>"
        kept_tiles.first.click()
        page.wait_for_function(
            f"() => document.querySelectorAll('#split-forget button.thumbnail-item').length == {before + 1}",
            timeout=30_000)
        assert moved in page.locator("#forget-picks textarea, #forget-picks input").first.input_value()
        assert kept_tiles.count() == 7 - before


def test_noise_and_denoise_view_shows_before_and_after_for_a_chosen_t(app_url, tmp_path):
    """The teaching view: an unlearned model typed as "after", t set to 300 on the slider; the
    picture shows the image, its noised version and the results of before, after and the oracle."""
    from retrack.cli import main

    after = tmp_path / "after"  # one unlearning step is enough to be a different model
    assert main(["unlearn", "--model", "builtin", "--steps", "1", "--batch", "4", "--device", "cpu",
                 "--out", str(after)]) == 0
    with open_page(app_url) as page:
        page.wait_for_selector("#training-gallery img", timeout=120_000)
        page.locator("#teach-after-model textarea, #teach-after-model input").first.fill(str(after))
        t_box = page.locator("#renoise-t input[type='number']").first
        t_box.fill("300")
        t_box.press("Enter")
        page.click("#renoise-run")
        page.wait_for_selector("#renoise-grid img", timeout=180_000)
        note = page.locator("#renoise-note").inner_text()
        assert "t = 300" in note, note
        assert all(f"{name} " in note for name in ("before", "after", "oracle")), note
        width = page.locator("#renoise-grid img").first.evaluate("img => img.naturalWidth")
        assert width == 5 * (3 * 28 + 2) + 2  # image, noised, before, after, oracle: 28 px tiles x 3


def test_a_dimmed_tshirt_upload_lists_and_excludes_the_50_copies(app_url, tmp_path):
    """A T-shirt uploaded at 90 % brightness is no byte copy of the training T-shirt, yet its 50
    copies are listed (one tile, ×50) and leave the retain set; ticking "keep near-duplicates"
    keeps them."""
    import numpy as np
    from PIL import Image

    from retrack.builtin import builtin_dataset

    dim = tmp_path / "dim-tshirt.png"
    Image.fromarray((builtin_dataset().tshirt * 0.9).round().astype(np.uint8)).save(dim)
    with open_page(app_url) as page:
        page.wait_for_selector("#training-gallery img", timeout=120_000)
        picks = page.locator("#forget-picks textarea, #forget-picks input").first
        page.wait_for_function("el => /#\\d+/.test(el.value)", arg=picks.element_handle(), timeout=60_000)
        page.wait_for_selector("#forget-preview img", timeout=60_000)  # the opening pick's preview first
        picks.fill("")  # forget the upload alone
        page.wait_for_function("() => document.querySelector('#forget-summary').innerText.includes('Nothing picked')",
                               timeout=60_000)
        page.locator("#forget-upload input[type='file']").set_input_files(str(dim))
        summary = page.locator("#forget-summary")
        page.wait_for_function("() => document.querySelector('#forget-summary').innerText.includes('near-duplicate')",
                               timeout=120_000)
        text = summary.inner_text()
        assert "1 image(s) to forget" in text and "5,000 training images kept" in text, text
        assert "50 near-duplicate(s)" in text and "left out of the retain set" in text, text
        tiles = page.locator("#near-duplicates button.thumbnail-item")
        assert tiles.count() == 1 and "t-shirt ×50" in tiles.first.inner_text()

        page.locator("#keep-near-duplicates input[type='checkbox']").check()
        page.wait_for_function("() => document.querySelector('#forget-summary').innerText.includes('5,050 training')",
                               timeout=60_000)
        assert "kept in the retain set" in summary.inner_text()


def test_stop_when_forgotten_stops_and_says_at_which_step(app_url):
    """The oracle (retrained without the T-shirt) opened as the model, its training set's T-shirt
    picked and "Stop when forgotten" on: the T-shirt's noisy copies already land as far from it as
    the model's own training digits' do, with no copies and quality held, so the run stops at the
    first check (step 1 of the quick run's 3) and the status says so."""
    with open_page(app_url) as page:
        page.wait_for_selector("#training-gallery img", timeout=120_000)
        picks = page.locator("#forget-picks textarea, #forget-picks input").first
        page.wait_for_function("el => /#\\d+/.test(el.value)", arg=picks.element_handle(), timeout=60_000)
        page.locator("#model-path textarea, #model-path input").first.fill(str(paths.BUILTIN_ORACLE))
        page.click("#load-model")
        # A model without an oracle beside it opens with nothing picked: the oracle is loaded.
        page.wait_for_function("el => el.value === ''", arg=picks.element_handle(), timeout=120_000)
        shirt = page.locator("#training-gallery button.thumbnail-item").first
        shirt.wait_for(timeout=60_000)
        assert "t-shirt" in shirt.inner_text(), shirt.inner_text()
        picks.fill(shirt.inner_text().split()[0])  # caption: "#<index> t-shirt ×50"
        picks.press("Enter")
        page.wait_for_function("() => document.querySelector('#forget-summary').innerText.includes('1 image(s)')",
                               timeout=60_000)
        page.locator("#until-forgotten input[type='checkbox']").check()
        page.click("#run")
        status_box, done_by = page.locator("#status textarea"), time.monotonic() + 300
        while not status_box.input_value().startswith(("Done", "Stopped", "Unexpected")) and time.monotonic() < done_by:
            page.wait_for_timeout(300)
        status = status_box.input_value()
        assert status.startswith("Done"), f"{status}\nserver log:\n{server_log_tail()}"
        assert "Stop when forgotten: forgotten at step 1 of at most 3" in status, status


def test_two_methods_side_by_side_with_overlaid_curves(app_url):
    """Methods side by side: ReTrack and Vanilla picked (SISS unticked) run one after another on the
    T-shirt; each live curve has a line per method (and the oracle's level on the noise-and-denoise
    one), the table a column per method, and the after-grids and zips sit side by side."""
    with open_page(app_url) as page:
        picks = page.locator("#forget-picks textarea, #forget-picks input").first
        page.wait_for_function("el => /#\\d+/.test(el.value)", arg=picks.element_handle(), timeout=120_000)
        page.locator("#compare-methods").scroll_into_view_if_needed()
        page.locator("#compare-methods label", has_text="SISS").locator("input").uncheck()
        page.click("#compare-run")
        status_box, done_by = page.locator("#compare-status textarea"), time.monotonic() + 600
        while time.monotonic() < done_by:
            lines = status_box.input_value().splitlines()
            if len(lines) == 2 and all(": Done" in line or ": Stopped" in line for line in lines):
                break
            page.wait_for_timeout(300)
        lines = status_box.input_value().splitlines()
        assert [line.split(": ")[0] for line in lines] == ["ReTrack", "Vanilla"], lines
        assert all(": Done" in line for line in lines), f"{lines}\nserver log:\n{server_log_tail()}"
        # One line per method on each overlaid plot, in the method's colour; the oracle's level in grey.
        for plot, expected in (("#compare-memorisation", {"ReTrack", "Vanilla"}),
                               ("#compare-return", {"ReTrack", "Vanilla", "oracle"})):
            page.locator(plot).scroll_into_view_if_needed()
            marks = page.locator(f"{plot} [aria-roledescription='line mark']")
            marks.first.wait_for(state="attached", timeout=30_000)
            strokes = {line.get_attribute("stroke") for line in marks.all()}
            assert strokes == {METHOD_COLOURS[m] for m in expected}, [mark.get_attribute("aria-label") for mark in marks.all()]
        table = page.locator("#compare-table").inner_text()
        assert "ReTrack" in table and "Vanilla" in table and "oracle" in table and "under DDIM-50" in table
        for i in range(2):
            page.locator(f"#compare-grid-{i}").scroll_into_view_if_needed()
            page.wait_for_selector(f"#compare-grid-{i} img", timeout=30_000)
        assert not page.locator("#compare-grid-2").is_visible()
        page.locator("#compare-downloads").scroll_into_view_if_needed()
        downloads = page.locator("#compare-downloads a")
        downloads.first.wait_for(timeout=30_000)
        names = sorted(link.get_attribute("href").split("/")[-1] for link in downloads.all())
        assert len(names) == 2 and names[0].endswith("-retrack.zip") and names[1].endswith("-vanilla.zip"), names
