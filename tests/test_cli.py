"""The CLI end to end on a tiny model in a temp dir, and its one-line errors."""

import subprocess
import sys

import pytest
from diffusers import DDPMPipeline
from PIL import Image

from retrack.cli import main


def test_unlearn_then_sample_end_to_end(tiny_pixel_model, image_folders, tmp_path, capsys):
    forget, retain = image_folders
    out = tmp_path / "clean"
    code = main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(forget), "--retain", str(retain),
                 "--k", "3", "--steps", "2", "--batch", "4", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0
    assert "big-colour.png: RGB -> grayscale, resized 16x16 -> 8x8" in err  # conversions are shown
    assert "2/2" in err  # the tqdm bar ran to the end
    DDPMPipeline.from_pretrained(out, local_files_only=True)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--n", "3", "--steps", "2", "--device", "cpu", "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > 3 * 8


@pytest.mark.parametrize("extra, message", [
    (["--lam", "2"], "lambda must lie in [0, 1]"),
    (["--k", "50"], "K = 50"),
    (["--steps", "0"], "steps must lie"),
])
def test_bad_arguments_give_one_line(tiny_pixel_model, image_folders, tmp_path, capsys, extra, message):
    forget, retain = image_folders
    code = main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(forget), "--retain", str(retain),
                 "--device", "cpu", "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("retrack: error:") and message in err[-1]
    assert not (tmp_path / "x").exists()


def test_missing_model_and_bad_image(tmp_path, tiny_pixel_model, image_folders, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sample", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "g.png")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    code = main(["unlearn", "--model", str(tiny_pixel_model), "--forget", str(bad), "--retain", str(image_folders[1]),
                 "--device", "cpu", "--out", str(tmp_path / "y")])
    assert code == 2 and "bad.png: not an image" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "retrack", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "unlearn" in result.stdout
