"""scripts/build_builtin.py's resumable DDPM training: a run stopped at a checkpoint and continued
ends with exactly the weights of an uninterrupted run (optimiser, generator and step restored)."""

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from retrack import paths


@pytest.fixture(scope="module")
def build_builtin():
    spec = importlib.util.spec_from_file_location("build_builtin", paths.REPO / "scripts" / "build_builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
