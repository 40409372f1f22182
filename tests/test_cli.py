"""The CLI end to end on a tiny model in a temp dir, and its one-line errors."""

import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from sd_fixtures import tiny_sd_model, write_images  # noqa: F401  (fixture)

from retrack.backends.latent import LatentBackend
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


class EncodedHere(Exception):
    """Raised by the recording encoder once it has seen the device (the run need not go on)."""


def record_vae_device(monkeypatch, seen: list, stop: bool):
    real_encode = LatentBackend.encode

    def recording_encode(self, images, *args, **kwargs):
        seen.append(self.vae.device)
        if stop:
            raise EncodedHere
        return real_encode(self, images, *args, **kwargs)

    monkeypatch.setattr(LatentBackend, "encode", recording_encode)


def sd_unlearn_args(tiny_sd_model, tmp_path, device: str) -> list[str]:
    forget, retain = write_images(tmp_path / "forget", 1, seed=1), write_images(tmp_path / "retain", 3, seed=2)
    return ["unlearn", "--model", str(tiny_sd_model), "--forget", str(forget), "--retain", str(retain),
            "--prompt", "a lighthouse", "--k", "2", "--steps", "1", "--accum", "1", "--device", device,
            "--out", str(tmp_path / "out")]


def test_stable_diffusion_images_are_encoded_on_the_training_device(tiny_sd_model, tmp_path, monkeypatch):
    """The CLI puts the model on the device training will use before the VAE encodes the images
    (it used to encode on the CPU and move only the UNet). No GPU here, so the training device
    is made PyTorch's 'meta' device, which no CPU-only path can reach by accident: the VAE must
    encode there. (On a GPU machine the next test checks the same with the real device.)"""
    import retrack.devices

    monkeypatch.setattr(retrack.devices, "training_device", lambda requested: "meta")
    seen = []
    record_vae_device(monkeypatch, seen, stop=True)
    with pytest.raises(EncodedHere):
        main(sd_unlearn_args(tiny_sd_model, tmp_path, "auto"))
    assert [d.type for d in seen] == ["meta"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_stable_diffusion_images_are_encoded_on_the_gpu(tiny_sd_model, tmp_path, monkeypatch):
    seen = []
    record_vae_device(monkeypatch, seen, stop=False)
    assert main(sd_unlearn_args(tiny_sd_model, tmp_path, "cuda")) == 0
    assert seen and all(d.type == "cuda" for d in seen)
