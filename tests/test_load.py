"""The app under load, on a real server: several visitors at once, each through its own
gradio_client session, against the tiny 8x8 model (a job takes about a second).

- Three visitors submit jobs at the same moment: the device runs one training job at a time,
  the others wait with their place in line shown, and every visitor gets back exactly the run
  it asked for (method, seed, steps), nobody else's.
- A visitor who cancels while waiting, or sends a broken upload, gets a readable answer and
  disturbs no one; the next job runs.
- The server's own safety defaults: it listens on 127.0.0.1 only, refuses uploads over the cap
  and serves no file outside its output folder (and gradio's own upload cache).

Every wait is bounded; everything is on the loopback interface.
"""

from __future__ import annotations

import json
import re
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from helpers import follow, free_port, merged, wait_for_status

TIMEOUT = 120  # seconds any one job may take, however busy the machine


@pytest.fixture(scope="module")
def server(tiny_app_model, tmp_path_factory):
    """The app, started as `app.launch` starts it with its default host, on a free port, with the
    tiny model and its 16 training images. Torch runs on one thread meanwhile: the tensors are
    tiny, and on a busy 2-core machine a second OpenMP thread only spins."""
    import gradio as gr

    import app

    model, data = tiny_app_model
    settings = app.AppSettings(model=str(model), data=str(data), output_dir=tmp_path_factory.mktemp("load-output"),
                               quick=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = free_port()
    _, url, _ = app.launch(settings, port=port, block=False)  # host: the default
    yield url, port, settings
    gr.close_all()
    torch.set_num_threads(threads)


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def run_args(settings, method: str = "retrack", seed: int = 0, steps: int = 3, uploads: list | None = None) -> list:
    """Inputs of /unlearn in page order (see test_app.run_args), for the tiny model: forget
    training items #0 and #1, K 3, batch 4, 2 samples of 2 DDIM steps before and after."""
    return [settings.model, settings.data, "#0, #1", uploads or [], "", "", method, 3, 0.005, 5e-5, steps, 4, 1,
            1e-6, 0.95, 0.999, 1e-3, 5.0, seed, 2, 2, 0, 2, 7.5, False, False]  # keep near-duplicates, stop when forgotten


def statuses(job) -> list[str]:
    """Every status-box text the job has streamed so far."""
    return [update[0] for update in job.outputs() if isinstance(update[0], str)]


def made_by(page: list) -> dict:
    """retrack.json from the zip the visitor downloaded: how its model was made."""
    with zipfile.ZipFile(page[6]) as bundle:
        name = next(entry for entry in bundle.namelist() if entry.endswith("retrack.json"))
        return json.loads(bundle.read(name))


def test_visitors_at_once_wait_their_turn_in_view_and_each_gets_their_own_run(server):
    url, _, settings = server
    asked = [("retrack", 11, 3), ("vanilla", 22, 4), ("neggrad", 33, 5)]
    visitors = [client(url) for _ in asked]
    jobs: dict[int, object] = {}
    together = threading.Barrier(len(asked), timeout=60)

    def submit(index: int) -> None:
        method, seed, steps = asked[index]
        together.wait()
        jobs[index] = visitors[index].submit(*run_args(settings, method, seed, steps), api_name="/unlearn")

    senders = [threading.Thread(target=submit, args=(i,)) for i in range(len(asked))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    assert sorted(jobs) == [0, 1, 2]
    for job in jobs.values():
        follow(job, timeout=TIMEOUT)

    waited = 0
    folders = set()
    for index, (method, seed, steps) in enumerate(asked):
        page, seen = merged(jobs[index].outputs()), statuses(jobs[index])
        assert page[0].startswith("Done"), page[0]
        record = made_by(page)
        assert (record["method"], record["config"]["seed"], record["steps_done"]) == (method, seed, steps)
        assert len(page[1]["data"]) == 3 * steps  # its own loss curve: three terms per step it asked for
        folders.add(re.search(r"saved to (\S+)", page[0]).group(1))
        positions = [int(n) for n in re.findall(r"Waiting for the device \(cpu\): (\d+) job\(s\) ahead", " ".join(seen))]
        if positions:
            waited += 1
            assert positions == sorted(positions, reverse=True) and positions[-1] >= 1  # the line only moves forward
            assert seen.index(next(s for s in seen if s.startswith("Waiting"))) < seen.index(
                next(s for s in seen if s.startswith("Training step")))
    assert waited >= len(asked) - 1, "one job trains at a time: the others are shown their place in line"
    assert len(folders) == len(asked)


def test_a_visitor_cancelling_or_sending_junk_disturbs_no_one(server, tmp_path):
    from gradio_client import handle_file

    url, _, settings = server
    worker, canceller, prankster = client(url), client(url), client(url)
    long_job = worker.submit(*run_args(settings, "retrack", seed=5, steps=5000), api_name="/unlearn")
    wait_for_status(long_job, "Training step", timeout=TIMEOUT)

    waiting = canceller.submit(*run_args(settings, "vanilla", seed=6), api_name="/unlearn")
    wait_for_status(waiting, "Waiting for the device", timeout=TIMEOUT)
    junk = tmp_path / "holiday.png"
    junk.write_bytes(b"MZ\x90\x00 definitely not a picture")
    answer = prankster.predict(*run_args(settings, uploads=[handle_file(str(junk))]), api_name="/unlearn")
    assert answer[0].startswith("⚠ holiday.png: not an image file"), answer[0]
    assert canceller.predict(api_name="/cancel") == "Cancelling..."
    follow(waiting, timeout=TIMEOUT)
    assert statuses(waiting)[-1].startswith("Cancelled before it started")
    assert not long_job.done() and statuses(long_job)[-1].startswith("Training step")  # still training

    assert worker.predict(api_name="/cancel") == "Cancelling..."
    follow(long_job, timeout=TIMEOUT)
    assert re.match(r"Cancelled after \d+ of 5000 training steps", statuses(long_job)[-1]), statuses(long_job)[-1]
    again = canceller.submit(*run_args(settings, "vanilla", seed=6), api_name="/unlearn")
    follow(again, timeout=TIMEOUT)
    assert merged(again.outputs())[0].startswith("Done")  # the app is ready after both cancels


@pytest.mark.parametrize("position, value, message", [
    (9, None, "a number box is empty"),  # learning rate: an empty box, possible through the API
    (10, 10**7, "steps must lie in [1, 1000000]"),
    (7, 100, "K = 100 neighbours asked for, but the retain set has only 14"),
    (21, 2**40, "the first sample seed must lie in [0, 2**32)"),
])
def test_bad_settings_through_the_page_are_refused_before_any_job(server, position, value, message):
    url, _, settings = server
    args = run_args(settings)
    args[position] = value
    job = client(url).submit(*args, api_name="/unlearn")
    follow(job, timeout=TIMEOUT)
    seen = statuses(job)
    assert seen == [f"⚠ {seen[0][2:]}"] and message in seen[0], seen  # one answer; no job was queued or started


def test_nan_and_inf_sent_by_hand_are_refused_before_any_job(server):
    """gradio_client (like a browser) cannot send NaN or inf: JSON has no such numbers. A
    hand-written request can (Python's JSON reader accepts them), so send one."""
    url, _, settings = server
    for value in ("NaN", "Infinity", "-Infinity"):
        args = run_args(settings)
        args[9] = "@"  # the learning rate, replaced by the bare token below
        body = json.dumps({"data": args}).replace('"@"', value)
        start = httpx.post(f"{url}gradio_api/call/unlearn", content=body, timeout=30,
                           headers={"content-type": "application/json"})
        assert start.status_code == 200, start.text
        with httpx.stream("GET", f"{url}gradio_api/call/unlearn/{start.json()['event_id']}", timeout=TIMEOUT) as events:
            payloads = [json.loads(line[len("data: "):]) for line in events.iter_lines() if line.startswith("data: ")]
        answers = [payload[0] for payload in payloads if isinstance(payload, list)]  # (heartbeats carry null)
        assert answers and set(answers) == {answers[0]}, answers
        assert answers[0].startswith("⚠ lr must be a finite number"), answers[0]


# ============================================================================ the server's safety defaults
def test_the_server_listens_on_this_machine_only(server):
    import psutil

    _, port, _ = server
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)


def test_uploads_over_the_cap_are_refused_by_the_server(server):
    url, _, settings = server
    cap = 20 * 2**20
    assert settings.max_file_size == "20mb"
    too_big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", bytes(cap + 1))}, timeout=60)
    assert too_big.status_code == 413 and "maximum allowed size" in too_big.text
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.png", bytes(100))}, timeout=60)
    assert small.status_code == 200


def test_only_the_output_folder_is_served(server, tiny_app_model):
    url, _, settings = server
    ours = settings.output_dir / "note.txt"
    ours.write_text("made by the app")
    assert httpx.get(f"{url}gradio_api/file={ours}", timeout=30).text == "made by the app"
    repo_file = Path(__file__).resolve().parent.parent / "app.py"
    for outside in ("/etc/passwd", repo_file, tiny_app_model[1] / "00.png", tiny_app_model[0] / "model_index.json"):
        response = httpx.get(f"{url}gradio_api/file={outside}", timeout=30)
        assert response.status_code == 403, outside
