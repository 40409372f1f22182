"""The Gradio app against a real server on 127.0.0.1, driven with gradio_client.

One server is started for the module (in a thread of this process, on a free port) with the
built-in model and `quick` settings, so a whole unlearning job takes seconds on a CPU. The tests
go through the same HTTP/SSE API a browser uses: a short ReTrack job streams progress and loss
points and returns both grids and scores; Cancel stops a running job and the next job runs; an
invalid upload or setting returns a readable message and the server keeps serving.

A few fast tests of the library the page calls (`retrack.forget_set`, `retrack.devices`) come first.
"""

from __future__ import annotations

import os
import re
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import folder_digest, follow, free_port, merged, wait_for_status
from retrack import paths
from retrack.devices import DeviceQueue
from retrack.forget_set import build_forget_set, gallery_items, parse_picks, split_items, toggle_pick
from retrack.models import ModelInfo, TrainingData

# ============================================================================ the library the page calls
def test_picks_parse_and_toggle():
    assert parse_picks("#17, 3 #17 x9") == [3, 9, 17]
    assert toggle_pick("#3, #17", 17) == "#3"
    assert toggle_pick("#3", 5) == "#3, #5"
    assert parse_picks("") == []


def _toy_data() -> TrainingData:
    """Ten distinct 4x4 images plus three extra copies of image 2."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
    images = np.concatenate([images, np.repeat(images[2:3], 3, axis=0)])
    return TrainingData(images=images, names=[f"item{i}" for i in range(13)], origin="toy")


def test_gallery_shows_duplicated_images_first():
    items = gallery_items(_toy_data(), limit=5)
    assert len(items) == 5
    assert items[0].index == 2 and items[0].copies == 4 and "×4 copies" in items[0].caption
    assert all(item.copies == 1 for item in items[1:])


def test_split_items_puts_the_picks_on_one_side_and_the_rest_on_the_other():
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(4, 1).repeat(4, 2)
    data = TrainingData(images, [f"{i:03d}.png" for i in range(6)], "test")
    forget_side, kept_side = split_items(data, [4, 1])
    assert [item.index for item in forget_side] == [1, 4] and [item.index for item in kept_side] == [0, 2, 3, 5]
    assert forget_side[0].caption == "#1 001.png" and int(forget_side[1].image.max()) == 4
    assert [len(side) for side in split_items(data, [], limit=3)] == [0, 3]


def test_forget_set_drops_every_copy_from_the_retain_set():
    data = _toy_data()
    model = ModelInfo(spec="toy", path=Path("toy"), family="pixel", image_size=4, channels=1, preset="mnist",
                      training_data=data, scorer="builtin")
    forget = build_forget_set(model, [2, 12])  # the same image picked twice: forgotten once
    assert len(forget) == 1
    assert len(forget.retain_index) == 9 and not set(forget.retain_index) & {2, 10, 11, 12}
    with pytest.raises(ValueError, match="empty"):
        build_forget_set(model, [])
    with pytest.raises(ValueError, match="do not exist"):
        build_forget_set(model, [99])


def test_live_curve_is_evaluated_every_few_steps_and_at_the_last_one():
    from retrack.job_settings import EvalSettings

    every_ten = EvalSettings(live_every=10)
    assert [step for step in range(1, 26) if every_ten.live_at(step, 25)] == [10, 20, 25]
    assert not any(EvalSettings(live_every=0).live_at(step, 25) for step in range(1, 26))
    live = every_ten.live_sampler_settings()
    assert (live.n_samples, live.steps, live.seed) == (32, 50, 0)  # the full set's first 32 seeds and its sampler steps
    with pytest.raises(ValueError, match="number of samples"):
        EvalSettings(n_samples=0).validate()
    with pytest.raises(ValueError, match="live curve"):
        EvalSettings(live_every=-1).validate()


def test_only_a_model_with_an_oracle_opens_with_its_most_copied_item_picked(tmp_path):
    from retrack.forget_set import default_picks

    data = _toy_data()
    model = ModelInfo(spec="toy", path=tmp_path, family="pixel", image_size=4, channels=1, preset="mnist",
                      training_data=data, scorer="builtin")
    assert default_picks(model) == ""  # no oracle beside it: nothing is picked for the user
    if (MODEL / "model_index.json").is_file():
        from retrack.models import open_model

        builtin = open_model(str(MODEL))
        assert default_picks(builtin) == f"#{gallery_items(builtin.training_data, limit=1)[0].index}"
        assert "t-shirt" in builtin.training_data.names[int(default_picks(builtin)[1:])]


def test_device_queue_is_first_come_first_served_and_cancellable():
    queue, order = DeviceQueue(), []
    first, second, third = object(), object(), object()
    never = threading.Event()
    assert queue.acquire(first, never)
    cancel_third = threading.Event()

    def wait(owner, cancel, name):
        if queue.acquire(owner, cancel):
            order.append(name)
            queue.release(owner)
        else:
            order.append(f"{name} cancelled")

    waiters = [threading.Thread(target=wait, args=(second, never, "second")),
               threading.Thread(target=wait, args=(third, cancel_third, "third"))]
    for thread in waiters:
        thread.start()
        time.sleep(0.1)
    cancel_third.set()
    waiters[1].join(5)
    assert order == ["third cancelled"]  # a waiting job leaves the line at once
    queue.release(first)
    waiters[0].join(5)
    assert order == ["third cancelled", "second"] and not queue.busy


# ============================================================================ the server
# The built-in model, or another with the same companions (dataset.json, clip/) beside it.
MODEL = Path(os.environ.get("RETRACK_APP_MODEL", paths.BUILTIN_MODEL))
pytestmark_server = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                       reason=f"the model {MODEL} is not built")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free 127.0.0.1 port with the built-in model and quick settings."""
    import app

    settings = app.AppSettings(model=str(MODEL), output_dir=tmp_path_factory.mktemp("app-output"), quick=True)
    _, url, _ = app.launch(settings, host="127.0.0.1", port=free_port(), block=False)
    yield url, settings
    import gradio as gr

    gr.close_all()


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def tshirt_pick(client) -> str:
    """The gallery's T-shirt item: the model opens with it already in the picks box."""
    loaded = client.predict(str(MODEL), "", api_name="/load_model")
    captions = [tile["caption"] for tile in loaded[1]]
    shirt = next(caption for caption in captions if "t-shirt" in caption)
    assert "copies" in shirt, "the T-shirt is copied many times and shown first"
    assert loaded[2] == re.match(r"#\d+", shirt).group(0), "the built-in model opens with its T-shirt picked"
    return loaded[2]


def run_args(picks: str, steps: int = 3, uploads: list | None = None, lr: float = 5e-5) -> list:
    """Inputs of /unlearn in page order: model, data, picks, uploads, prompt, training prompt, method,
    K, λ, lr, steps, batch, accumulation, weight decay, β1, β2, η, SISS C, seed, samples, DDIM steps,
    eval seed, trajectory points, guidance."""
    return [str(MODEL), "", picks, uploads or [], "", "", "retrack", 10, 0.005, lr, steps, 8, 1, 1e-6,
            0.95, 0.999, 1e-3, 5.0, 0, 4, 5, 0, 4, 7.5]


@pytestmark_server
def test_short_retrack_job_streams_progress_losses_grids_and_scores(client):
    started = time.monotonic()
    source_files = folder_digest(MODEL)
    job = client.submit(*run_args(tshirt_pick(client), steps=4), api_name="/unlearn")
    progress = follow(job)
    outputs = job.outputs()
    (status, plot, before, after, metrics, nearest, archive, note, trajectory, live, oracle, returns,
     nearest_paper, nearest_ddim, classes) = merged(outputs)
    assert status.startswith("Done"), status
    assert re.search(r"\(\+ \d+ s for the live memorisation curve\)", status), status
    assert progress, "progress updates reach the client while the job runs"

    # The loss plot grew step by step: one update per training step, three terms each.
    sizes = [len(update[1]["data"]) for update in outputs if isinstance(update[1], dict) and "data" in update[1]]
    assert sizes == sorted(sizes) and {3, 6, 9, 12} <= set(sizes)
    term = plot["columns"].index("term")
    assert {row[term] for row in plot["data"]} == {"total", "unlearning term", "retain term"}

    # The live memorisation curve (quick mode: every step) gained a point per step, step 0 first,
    # before the run ended, each read against the oracle for both measures.
    points = [len(update[9]["data"]) for update in outputs if isinstance(update[9], dict) and "data" in update[9]]
    assert points == sorted(points) and {2, 4, 6, 8, 10} <= set(points), points
    step, measure = live["columns"].index("step"), live["columns"].index("measure")
    assert sorted({row[step] for row in live["data"]}) == [0, 1, 2, 3, 4]
    assert {row[measure] for row in live["data"]} == {"pixel L2", "CLIP"}
    # Beside it, the noise-and-denoise curve: the T-shirt's noisy copies at both t at every live
    # point, and the oracle's level as a flat line over the same steps.
    step, curve, distance = (returns["columns"].index(name) for name in ("step", "curve", "distance"))
    by_curve = {}
    for row in returns["data"]:
        by_curve.setdefault(row[curve], []).append((row[step], row[distance]))
    assert sorted(by_curve) == ["oracle, t = 240", "oracle, t = 500", "t = 240", "t = 500"]
    assert [s for s, _ in by_curve["t = 500"]] == [0, 1, 2, 3, 4]
    oracle_line = by_curve["oracle, t = 500"]
    assert [s for s, _ in oracle_line] == [0, 4] and len({d for _, d in oracle_line}) == 1
    assert by_curve["t = 500"][0][1] < by_curve["oracle, t = 500"][0][1]  # the untrained model brings it back

    for picture in (before, after, nearest, trajectory, oracle, nearest_paper, nearest_ddim):
        assert Path(picture).is_file()
    # The share of each class before, after and the oracle's (the built-in classifier): shown once, as an
    # update that also makes the chart visible; 11 classes x 3 bars, each model's summing to 100 %.
    chart = [u[14] for u in outputs if isinstance(u[14], dict) and "value" in u[14]]
    assert len(chart) == 1 and chart[0]["visible"] is True and classes == {"__type__": "update"}
    bars = chart[0]["value"]["data"]
    assert len(bars) == 33 and sum(bar[1] for bar in bars) == pytest.approx(300.0)
    # The oracle's column: its own rate and each model's excess over it.
    assert "| | before | after | oracle |" in metrics and "excess over the oracle" in metrics
    assert "to the prompt" not in metrics  # the prompt score is for text-to-image models
    # before, after and the oracle under the paper's sampler, and again under DDIM-50 on the same seeds
    assert "memorisation rate" in metrics and len(re.findall(r"\d+% \(\d+ of 4\)", metrics)) == 6
    assert "Rates with the paper's sampler (DDPM" in metrics and "under DDIM-50" in metrics
    assert "Seed" in note
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
    assert any(name.endswith("model_index.json") for name in names)
    assert any(name.endswith("retrack.json") for name in names)
    assert folder_digest(MODEL) == source_files, "the source model folder must never be written"
    print(f"short job: {time.monotonic() - started:.1f} s")


@pytestmark_server
def test_cancel_stops_a_running_job_and_the_next_job_runs(client, server):
    from gradio_client import Client

    picks = tshirt_pick(client)
    long_job = client.submit(*run_args(picks, steps=2000), api_name="/unlearn")
    wait_for_status(long_job, "Training step")

    # Another visitor's job waits for the device (one training job per device at a time) and
    # can be cancelled while it waits.
    visitor = Client(server[0], verbose=False)
    waiting_job = visitor.submit(*run_args(picks, steps=2), api_name="/unlearn")
    wait_for_status(waiting_job, "Waiting for the device")
    assert any("1 job(s) ahead" in str(update[0]) for update in waiting_job.outputs())
    assert visitor.predict(api_name="/cancel") == "Cancelling..."
    follow(waiting_job, timeout=60)
    assert waiting_job.outputs()[-1][0].startswith("Cancelled before it started")
    assert not long_job.done()  # the visitor's Cancel only stopped the visitor's job

    assert client.predict(api_name="/cancel") == "Cancelling..."
    follow(long_job, timeout=60)
    final_status = long_job.outputs()[-1][0]
    assert re.match(r"Cancelled after \d+ of 2000 training steps", final_status), final_status

    next_job = client.submit(*run_args(picks, steps=2), api_name="/unlearn")
    follow(next_job)
    assert next_job.outputs()[-1][0].startswith("Done")
    assert client.predict(api_name="/cancel") == "Nothing is running."


@pytestmark_server
def test_bad_upload_and_bad_settings_give_messages_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG at all")
    summary, preview, _ = client.predict(str(MODEL), "", "", [handle_file(str(broken))],
                                      api_name="/preview_forget")
    assert summary.startswith("⚠") and "broken.png" in summary and preview is None

    job = client.submit(*run_args("", uploads=[handle_file(str(broken))]), api_name="/unlearn")
    follow(job, timeout=60)
    status = job.outputs()[-1][0]
    assert status.startswith("⚠") and "broken.png" in status and "Traceback" not in status

    job = client.submit(*run_args(tshirt_pick(client), lr=-1.0), api_name="/unlearn")
    follow(job, timeout=60)
    assert "learning rate" in job.outputs()[-1][0]

    # Models that cannot be opened say why (offline here: a Hub id cannot be fetched).
    for spec, reason in (("someone/some-ddpm", "Hub"), ("/no/such/model", "no such folder")):
        info = client.predict(spec, "", api_name="/load_model")[0]
        assert info.startswith("⚠") and reason in info, info

    # Still serving: a good upload is converted, with a note on what was changed.
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    summary, preview, _ = client.predict(str(MODEL), "", "", [handle_file(str(photo))],
                                      api_name="/preview_forget")
    assert "1 image(s) to forget" in summary and "resized" in summary and Path(preview).is_file()


@pytestmark_server
def test_two_methods_side_by_side_share_before_and_the_oracle_and_each_has_a_column_curve_grid_and_zip(client):
    from ui.compare import COMPARE_OUTPUTS

    source_files = folder_digest(MODEL)
    job = client.submit(["retrack", "vanilla"], *run_args(tshirt_pick(client), steps=2), api_name="/compare")
    follow(job, timeout=600)
    page = dict(zip(COMPARE_OUTPUTS, merged(job.outputs())))
    lines = page["status"].splitlines()
    assert len(lines) == 2 and lines[0].startswith("ReTrack: Done") and lines[1].startswith("Vanilla: Done"), lines
    # A column per method between "before" and the oracle, under both samplers, and each one's training.
    table = page["table"]
    assert "| | before | ReTrack | Vanilla | oracle |" in table and "under DDIM-50" in table
    assert len(re.findall(r"\d+% \(\d+ of 4\)", table)) == 8  # 4 columns x 2 samplers
    assert "Training: ReTrack: 2 steps in" in table and "Vanilla: 2 steps in" in table
    # The live curves overlay: each method from step 0 to 2, and the oracle's level beside them.
    for plot, x in (("memorisation_plot", "percent"), ("return_plot", "distance")):
        frame = page[plot]
        model, step = frame["columns"].index("model"), frame["columns"].index("step")
        steps = {}
        for row in frame["data"]:
            steps.setdefault(row[model], []).append(row[step])
        assert steps["ReTrack"] == steps["Vanilla"] == [0, 1, 2], steps
    assert "oracle" in {row[page["return_plot"]["columns"].index("model")] for row in page["return_plot"]["data"]}
    # The grids side by side (each an update that names its method; the third place hidden), the
    # nearest samples, a zip per method.
    grids = [[u[COMPARE_OUTPUTS.index(f"grid_{i}")] for u in job.outputs()] for i in range(3)]
    for i, method in enumerate(("ReTrack", "Vanilla")):
        shown = [u for u in grids[i] if isinstance(u, dict) and u.get("value") is not None]
        assert len(shown) == 1 and shown[0]["label"] == f"After: {method}", grids[i]
        assert Path(shown[0]["value"] if isinstance(shown[0]["value"], str) else shown[0]["value"]["path"]).is_file()
    assert any(isinstance(u, dict) and u.get("visible") is False for u in grids[2])
    assert Path(page["nearest_paper"]).is_file() and Path(page["nearest_ddim"]).is_file()
    zips = [Path(f) for f in page["downloads"]]
    assert len(zips) == 2 and zips[0].name.endswith("-retrack.zip") and zips[1].name.endswith("-vanilla.zip")
    assert folder_digest(MODEL) == source_files, "the source model folder must never be written"

    refused = client.predict(["retrack", "siss", "vanilla", "neggrad"], *run_args(tshirt_pick(client)),
                             api_name="/compare")
    assert refused[0] == "⚠ pick one to 3 methods to run side by side (got 4)", refused[0]


@pytestmark_server
def test_a_dimmed_tshirt_upload_lists_its_near_duplicates_and_names_every_bad_file(client, tmp_path):
    """The preview lists the 50 T-shirt copies a 90 %-brightness T-shirt upload leaves out of the
    retain set (one tile, ×50), keeps them when the box is ticked, and names each unusable file of
    the batch while using the good one (files named as images: gradio itself refuses a batch
    holding another type, and the page's file picker offers images only)."""
    from gradio_client import handle_file
    from PIL import Image

    from retrack.builtin import builtin_dataset

    dim = tmp_path / "dim-tshirt.png"
    Image.fromarray((builtin_dataset().tshirt * 0.9).round().astype(np.uint8)).save(dim)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    files = [handle_file(str(tmp_path / name)) for name in ("notes.png", "dim-tshirt.png", "empty.png")]
    summary, preview, near = client.predict(str(MODEL), "", "", files, api_name="/preview_forget")
    assert "**1 image(s) to forget**; 5,000 training images kept" in summary and Path(preview).is_file(), summary
    assert "50 near-duplicate(s)" in summary and "left out of the retain set" in summary
    assert "notes.png: not an image" in summary and "empty.png: the file is empty" in summary
    assert len(near) == 1 and "t-shirt ×50" in near[0]["caption"] and "(left out)" in near[0]["caption"]

    summary, _, near = client.predict(str(MODEL), "", "", files, True, api_name="/preview_forget")
    assert "5,050 training images kept" in summary and "(kept)" in near[0]["caption"], summary


@pytest.fixture(scope="module")
def tiny_text_to_image(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Stable Diffusion folder laid out as the built-in model is (a `clip/` scorer
    beside it), and a folder of 12 images standing for the data to keep."""
    import open_clip
    import torch
    from PIL import Image

    from retrack.metrics import save_open_clip_folder
    from retrack.testing import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(seed=0, image_size=32, save_to=root / "model")
    clip_config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                   "head_width": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    save_open_clip_folder(open_clip.CLIP(**clip_config), clip_config, root / "clip",
                          preprocess_cfg={"mean": [0.5] * 3, "std": [0.5] * 3})
    data = root / "keep"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    return root / "model", data


@pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"the model {MODEL} is not built")
def test_text_to_image_model_with_a_folder_to_keep(client, tiny_text_to_image):
    model, data = tiny_text_to_image
    info = client.predict(str(model), str(data), api_name="/load_model")[0]
    assert "latent" in info and "12 images" in info
    args = run_args("#0, #1", steps=2)
    args[:2], args[4:6] = [str(model), str(data)], ["a photo of a cat", "a photo of an animal"]
    args[7] = 5  # K: the folder keeps only 10 images
    job = client.submit(*args, api_name="/unlearn")
    follow(job)
    page = merged(job.outputs())
    assert page[0].startswith("Done"), page[0]
    assert Path(page[3]).is_file() and "memorisation rate" in page[4]
    # Collateral damage for a text-to-image model: the non-copies' CLIP score to the prompt, before and after.
    assert re.search(r"\| collateral damage: CLIP score of the non-copies to the prompt [^|]*\| -?\d\.\d{3} \| -?\d\.\d{3} \|",
                     page[4]), page[4]

    args[4] = ""  # the prompt is required for a text-to-image model
    assert "prompt" in client.predict(*args, api_name="/unlearn")[0]


@pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"the model {MODEL} is not built")
def test_text_to_image_model_generate_split_and_unlearn(client, tiny_text_to_image):
    model, _ = tiny_text_to_image
    prompt = "a photo of a cat"
    outputs = client.predict(str(model), prompt, [], 8, 3, 7.5, api_name="/generate_split")
    folder, note, info, gallery, picks = outputs[:5]
    assert len(list(Path(folder).glob("*.png"))) == 8 and len(gallery) == 8
    assert "generations look memorised" in note and parse_picks(picks)
    again = client.predict(str(model), prompt, [], 8, 3, 7.5, api_name="/generate_split")
    assert again[0] == folder and again[4] == picks  # the same request is answered from disk

    # The split as two galleries: the picks on one side, every other generation on the other.
    forget_side, kept_side = client.predict(str(model), folder, picks, api_name="/split_view")
    assert len(forget_side) == len(parse_picks(picks)) and len(forget_side) + len(kept_side) == 8
    assert [int(tile["caption"].split()[0][1:]) for tile in forget_side] == parse_picks(picks)
    # Clicking a kept image forgets it too (the click toggles it in the picks, as here).
    moved = int(kept_side[0]["caption"].split()[0][1:])
    picks = toggle_pick(picks, moved)
    forget_side, kept_side = client.predict(str(model), folder, picks, api_name="/split_view")
    assert moved in [int(tile["caption"].split()[0][1:]) for tile in forget_side]
    assert len(forget_side) == len(parse_picks(picks)) and len(forget_side) + len(kept_side) == 8

    args = run_args(picks, steps=2)
    args[:2], args[4] = [str(model), folder], prompt
    args[7] = 1  # K: a split of 8 keeps only a few images
    job = client.submit(*args, api_name="/unlearn")
    follow(job)
    assert merged(job.outputs())[0].startswith("Done")
