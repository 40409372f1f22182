"""The app's result view beyond the first grids (issue 21, items 2 and 5): the samples nearest the
forget images under both samplers (before / after / oracle rows) and the share of each class
among the samples for a model with a classifier."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from retrack import paths
from retrack.evaluation import Evaluation, Reference
from retrack.metrics import class_shares
from retrack.sampling import Samples


def test_class_shares_count_each_sample_in_its_most_probable_class():
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    assert class_shares(probabilities).tolist() == [0.5, 0.25, 0.25]
    assert class_shares(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]

    class Fixed:  # a classifier whose answer is known: class = the sample's mean pixel > 0
        def probabilities(self, images):
            positive = (images.flatten(1).mean(1) > 0).float().numpy()
            return np.stack([1 - positive, positive], axis=1)

    images = torch.cat([torch.full((3, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.5)])
    reference = Reference(forget=images[:1], retain=images[:0], l2_threshold=None, l2_rule="none")
    evaluation = Evaluation(samples=Samples(images=images, seeds=[0, 1, 2, 3]), l2=np.zeros(4), reference=reference)
    assert evaluation.class_shares() is None  # no classifier in the reference, none given
    assert evaluation.class_shares(Fixed()).tolist() == [0.25, 0.75]
    evaluation.class_probabilities = Fixed().probabilities(images)  # as evaluate_samples keeps the reference's
    assert evaluation.class_shares().tolist() == [0.25, 0.75]


def run_job(model_folder: Path, data_folder: str, picks: list[int], tmp_path: Path, samples: int):
    from retrack.engine import UnlearnConfig
    from retrack.job_settings import EvalSettings
    from retrack.forget_set import build_forget_set
    from retrack.jobs import Job
    from retrack.models import open_model

    model = open_model(str(model_folder), data_folder)
    evaluation = EvalSettings(n_samples=samples, grid_samples=samples, sampling_steps=2, trajectory_points=2,
                              live_every=0)
    job = Job(model, build_forget_set(model, picks), UnlearnConfig(k=3, steps=1, batch_size=4), evaluation,
              tmp_path / "app-output").start()
    state = job.wait(timeout=600)
    assert state.phase == "done", state.message
    return state


def rendered(state) -> dict:
    from ui.results import JOB_OUTPUTS, render

    return dict(zip(JOB_OUTPUTS, render(state, {})))


def test_a_job_without_a_classifier_shows_the_nearest_samples_and_hides_the_class_chart(tiny_app_model, tmp_path):
    from PIL import Image

    state = run_job(tiny_app_model[0], str(tiny_app_model[1]), [0, 1], tmp_path, samples=3)
    assert state.class_shares == {} and state.deterministic["after"] is not None
    shown = rendered(state)
    for name in ("nearest_paper", "nearest_ddim"):  # rows before / after (no oracle): 3 tiles each
        assert isinstance(shown[name], Image.Image) and shown[name].width > shown[name].height > 0
    assert shown["class_plot"]["visible"] is False


@pytest.mark.skipif(not (paths.BUILTIN_MODEL / "model_index.json").is_file(), reason="the built-in model is not built")
def test_the_builtin_model_job_shows_the_nearest_samples_and_the_share_of_each_class(tmp_path):
    from PIL import Image

    from retrack.data import CLASS_NAMES, TSHIRT_LABEL
    from retrack.forget_set import default_picks, parse_picks
    from retrack.models import open_model

    model = open_model(str(paths.BUILTIN_MODEL))
    picks = parse_picks(default_picks(model))
    assert model.training_data.names[picks[0]] == CLASS_NAMES[TSHIRT_LABEL]
    state = run_job(paths.BUILTIN_MODEL, "", picks, tmp_path, samples=4)
    assert sorted(state.class_shares) == ["after", "before", "oracle"] and state.class_names == CLASS_NAMES
    for shares in state.class_shares.values():
        assert shares.shape == (11,) and shares.sum() == pytest.approx(1.0)
        assert np.allclose(shares * 4, np.round(shares * 4))  # shares of 4 samples
    shown = rendered(state)
    for name in ("nearest_paper", "nearest_ddim"):  # three rows: before, after, the oracle
        assert isinstance(shown[name], Image.Image) and shown[name].height > 2 * 28
    plot = shown["class_plot"]
    assert plot.visible is True and plot.value["mark"] == "bar"
    table = pd.DataFrame(plot.value["data"], columns=plot.value["columns"])
    assert len(table) == 33 and set(table["model"]) == {"before", "after", "oracle"}
    assert table.groupby("model")["percent"].sum().round(6).tolist() == [100.0] * 3
