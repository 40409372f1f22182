"""Methods side by side (issue 21, item 4): one model, forget set and seeds, a job per method, one
after another; "before" and the oracle shared, an "after" per method, each saved; the page's view
of it (a column, a curve and a grid per method)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from retrack.comparison import MAX_METHODS, Comparison, check_methods
from retrack.engine import UnlearnConfig
from retrack.job_settings import EvalSettings
from retrack.forget_set import build_forget_set
from retrack.models import open_model


def test_one_to_three_different_known_methods():
    check_methods(("retrack",))
    check_methods(("retrack", "siss", "vanilla"))
    for methods, message in (((), "pick one to 3"), (("retrack", "siss", "vanilla", "neggrad"), "pick one to 3"),
                             (("retrack", "retrack"), "once"), (("retrack", "forget-me"), "unknown method")):
        with pytest.raises(ValueError, match=message):
            check_methods(methods)
    assert MAX_METHODS == 3


def comparison(tiny_app_model, tmp_path: Path, methods: tuple[str, ...], steps: int) -> Comparison:
    model = open_model(str(tiny_app_model[0]), str(tiny_app_model[1]))
    evaluation = EvalSettings(n_samples=3, grid_samples=3, sampling_steps=2, trajectory_points=2, live_every=1,
                              live_samples=2, live_steps=2, live_return_copies=2)
    return Comparison(model, build_forget_set(model, [0, 1]), UnlearnConfig(k=3, steps=steps, batch_size=4, lr=1e-3),
                      methods, evaluation, tmp_path / "app-output")


def test_two_methods_run_one_after_another_from_the_same_model_and_seeds(tiny_app_model, tmp_path):
    from PIL import Image

    from ui.compare import COMPARE_OUTPUTS, memorisation_frame, render_comparison, return_frame
    from ui.results import nearest_picture

    run = comparison(tiny_app_model, tmp_path, ("retrack", "vanilla"), steps=2).start()
    seen = list(run.watch(timeout=600))
    final = seen[-1]
    assert final.finished and [s.phase for s in final.states] == ["done", "done"], final.message
    # The second job started only once the first had ended.
    assert all(s.states[1].phase == "queued" for s in seen if not s.states[0].finished)
    first, second = final.states
    # The same seeds: "before" is the same samples for both, and each method trained its own model.
    assert torch.equal(first.before.samples.images, second.before.samples.images)
    assert first.before.samples.seeds == second.before.samples.seeds == first.after.samples.seeds
    assert not torch.equal(first.after.samples.images, second.after.samples.images)
    methods = [json.loads((s.model_dir / "retrack.json").read_text())["method"] for s in final.states]
    assert methods == ["retrack", "vanilla"]
    assert first.archive != second.archive and first.archive.is_file() and second.archive.is_file()
    assert final.message.splitlines()[0].startswith("ReTrack: Done")
    assert final.message.splitlines()[1].startswith("Vanilla: Done")

    shown = dict(zip(COMPARE_OUTPUTS, render_comparison(final, {})))
    assert "| | before | ReTrack | Vanilla |" in shown["table"]  # the tiny model has no oracle
    assert "under DDIM-50" in shown["table"] and "Training: ReTrack: 2 steps in" in shown["table"]
    for i in range(2):
        assert isinstance(shown[f"grid_{i}"]["value"], Image.Image) and shown[f"grid_{i}"]["visible"] is True
    assert shown["grid_0"]["label"] == "After: ReTrack" and shown["grid_1"]["label"] == "After: Vanilla"
    assert shown["grid_2"]["visible"] is False
    two_rows = nearest_picture(("before", first.before), ("after", first.after))
    for name in ("nearest_paper", "nearest_ddim"):  # rows: before, ReTrack, Vanilla (3 tiles each)
        assert isinstance(shown[name], Image.Image) and shown[name].width == two_rows.width
        assert shown[name].height > two_rows.height
    assert shown["downloads"] == [str(first.archive), str(second.archive)]
    # The live curves overlay: a curve per method, steps 0, 1, 2 each.
    for frame in (memorisation_frame(final), return_frame(final)):
        assert frame.groupby("model")["step"].apply(list).to_dict() == {"ReTrack": [0, 1, 2], "Vanilla": [0, 1, 2]}


def test_cancel_stops_the_running_method_and_skips_the_rest(tiny_app_model, tmp_path):
    run = comparison(tiny_app_model, tmp_path, ("retrack", "siss", "vanilla"), steps=2000).start()
    deadline = time.monotonic() + 300
    for state in run.watch(timeout=300):
        if len(state.states[0].losses) >= 2:
            run.cancel()
            break
        assert time.monotonic() < deadline
    final = list(run.watch(timeout=120))[-1]
    assert [s.phase for s in final.states] == ["cancelled", "cancelled", "cancelled"]
    assert final.states[0].message.startswith("Cancelled after")
    assert all(s.message == "Not run: the comparison was cancelled" for s in final.states[1:])
    assert not any((tmp_path / "app-output").glob("*/model-*"))  # nothing was saved


def test_a_method_that_fails_does_not_stop_the_next(tiny_app_model, tmp_path):
    run = comparison(tiny_app_model, tmp_path, ("retrack", "vanilla"), steps=1)

    def fail() -> None:
        raise ValueError("this method's settings are refused")

    run.jobs[0]._work = fail  # the job's whole run, phase by phase (its errors are caught by the job)
    final = list(run.start().watch(timeout=600))[-1]
    assert [s.phase for s in final.states] == ["failed", "done"], final.message
    assert final.message.splitlines()[0] == "ReTrack: Stopped: this method's settings are refused"
