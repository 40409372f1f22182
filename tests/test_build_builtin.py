"""scripts/build_builtin.py's resumable DDPM training: a run stopped at a checkpoint and continued
ends with exactly the weights of an uninterrupted run (optimiser, generator and step restored)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from retrack import paths


@pytest.fixture(scope="module")
def build_builtin():
    spec = importlib.util.spec_from_file_location("build_builtin", paths.REPO / "scripts" / "build_builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_setting_builds_what_assets_builtin_holds(build_builtin):
    from builtin_build.data import BUILDERS

    shipped = json.loads(paths.BUILTIN_DATASET.read_text())["builder"]
    assert BUILDERS[build_builtin.parse_args([]).setting] == shipped == "retrack.data.build_mnist_tshirt"


def _train(build_builtin, out, checkpoints, steps: int, part: str = "oracle") -> None:
    assert build_builtin.main(["--setting", "v2", "--what", part, "--out", str(out), "--checkpoint-dir", str(checkpoints),
                               "--steps", str(steps), "--batch", "2", "--warmup-steps", "2", "--threads", "1",
                               "--device", "cpu", "--no-eval", "--log-seconds", "1000"]) == 0


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_resumed_training_matches_an_uninterrupted_one(build_builtin, tmp_path):
    _train(build_builtin, tmp_path / "whole", tmp_path / "whole-ckpt", steps=3)
    _train(build_builtin, tmp_path / "split", tmp_path / "split-ckpt", steps=1)
    first = _weights(tmp_path / "split" / "oracle")
    _train(build_builtin, tmp_path / "split", tmp_path / "split-ckpt", steps=3)

    whole, split = _weights(tmp_path / "whole" / "oracle"), _weights(tmp_path / "split" / "oracle")
    assert all((whole[name] == split[name]).all() for name in whole)
    assert any((first[name] != split[name]).any() for name in first)  # the second run did train
    info = json.loads((tmp_path / "split" / "oracle" / "retrack.json").read_text())
    assert info["start_step"] == 1 and info["steps"] == 2 and info["total_steps"] == 3
    assert [stage["steps"] for stage in info["earlier_stages"]] == [1]
    assert info["dataset"]["builder"] == "retrack.data.build_mnist_tshirt"
    assert (tmp_path / "split-ckpt" / "oracle" / build_builtin.TRAINING_STATE).is_file()


def test_a_checkpoint_of_another_part_is_refused(build_builtin, tmp_path):
    _train(build_builtin, tmp_path / "out", tmp_path / "ckpt", steps=1)
    (tmp_path / "ckpt" / "model").symlink_to(tmp_path / "ckpt" / "oracle")
    with pytest.raises(SystemExit, match="not of model"):
        _train(build_builtin, tmp_path / "out", tmp_path / "ckpt", steps=2, part="model")


def test_snapshot_copies_a_checkpoint_as_an_evaluated_intermediate_model(build_builtin, tmp_path):
    _train(build_builtin, tmp_path / "out", tmp_path / "ckpt", steps=1)
    assert build_builtin.main(["--setting", "v2", "--what", "snapshot", "--checkpoint-dir", str(tmp_path / "ckpt"),
                               "--out", str(tmp_path / "wip"), "--eval-samples", "4", "--eval-steps", "2",
                               "--threads", "1", "--device", "cpu"]) == 0
    folder = tmp_path / "wip" / "oracle-wip"
    assert not (folder / build_builtin.TRAINING_STATE).exists() and not (tmp_path / "wip" / "model-wip").exists()
    evaluation = json.loads((folder / "retrack.json").read_text())["evaluation"]
    assert evaluation["samples"] == 4 and 0.0 <= evaluation["tshirt_rate_paper_l2"] <= 1.0
    assert evaluation["retain_distance_to_tshirt_quantiles"]["0.0"] == pytest.approx(10.586, abs=1e-3)
    assert (folder / "samples.png").is_file()
    assert "**Intermediate, 1 training steps: not yet the built-in model.**" in (folder / "README.md").read_text()

    assert build_builtin.main(["--what", "describe", "--out", str(folder), "--observed", "grey noise."]) == 0
    assert "- Seen by eye in the grid: grey noise." in (folder / "README.md").read_text()


def test_clip_scorer_fine_tunes_on_degraded_images_from_a_given_scorer(build_builtin, tmp_path):
    start = paths.BUILTIN / "clip"
    assert build_builtin.main(["--setting", "v2", "--what", "clip", "--out", str(tmp_path), "--steps", "1",
                               "--clip-augment", "--clip-init", str(start), "--warmup-steps", "1", "--threads", "1",
                               "--device", "cpu", "--no-eval", "--log-seconds", "1000"]) == 0
    info = json.loads((tmp_path / "clip" / "retrack.json").read_text())
    assert info["initialised_from"] == str(start) and "noise up to 0.3" in info["augmentation"]
    assert info["batch"] == 144  # 128 digits + 16 T-shirts, whatever --batch says
    before, after = load_file(start / "open_clip_model.safetensors"), load_file(tmp_path / "clip" / "open_clip_model.safetensors")
    assert before.keys() == after.keys()
    changed = [name for name in before if not (before[name] == after[name]).all()]
    # One step from the given weights: they moved, but only a step's worth (not a fresh initialisation).
    assert changed and all((before[n].float() - after[n].float()).abs().max() < 0.05 for n in before)


def test_augmented_batch_degrades_digits_and_tshirts_within_the_pixel_range(build_builtin):  # (puts builtin_build on the path)
    from builtin_build.augment import DIGITS_PER_BATCH, TSHIRTS_PER_BATCH, augmented_batch

    digits = torch.zeros(5, 1, 28, 28)
    digits[:, :, 10:18, 12:16] = 1.0
    tshirt = torch.zeros(1, 1, 28, 28)
    tshirt[:, :, 6:24, 6:22] = 1.0
    images, labels = augmented_batch(digits, torch.arange(5), tshirt, torch.Generator().manual_seed(0), max_noise=0.3)
    assert images.shape == (DIGITS_PER_BATCH + TSHIRTS_PER_BATCH, 1, 28, 28)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert (labels[DIGITS_PER_BATCH:] == 10).all() and (labels[:DIGITS_PER_BATCH] < 5).all()
    shirts = images[DIGITS_PER_BATCH:]
    assert not torch.equal(shirts[0], shirts[1])  # each copy degraded its own way
    assert (shirts - tshirt).abs().flatten(1).mean(1).min() > 0.005  # none left exact
