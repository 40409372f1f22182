"""Noise-and-denoise (`sampling.renoise`) against closed forms, through a real UNet, and its CLI.

The known answer: a model whose noise prediction is exact for a single image y (a point mass,
the extreme of memorisation) predicts eps = (x_t - sqrt(alpha_bar_t) y) / sqrt(1 - alpha_bar_t), so
deterministic DDIM brings back y exactly from any t. Noising x0 and denoising with the model that
memorised x0 returns x0; with a model that memorised another image, from the same noise, it
returns that other image.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from retrack.backends import load_backend
from retrack.backends.pixel import PixelBackend
from retrack.cli import main
from retrack.sampling import nearest_renoise_t, pixel_l2, renoise, renoise_grid


class PointMassModel(PixelBackend):
    """The real tiny pixel backend, with the noise prediction that is exact for data = {target}."""

    def __init__(self, backend: PixelBackend, target: torch.Tensor):
        super().__init__(backend.unet, backend.scheduler, "point mass")
        self.target = target

    def denoise(self, x_t, t, cond):
        abar = self.scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.target) / (1 - abar).sqrt()


@pytest.fixture(scope="module")
def backend(tiny_pixel_model) -> PixelBackend:
    return load_backend(tiny_pixel_model)


def images(seed: int) -> torch.Tensor:
    return torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_t_zero_returns_the_image_and_the_noised_point_is_the_forward_process(backend):
    x0 = images(0)
    assert torch.equal(renoise(backend, x0, 0).denoised, x0)
    result = renoise(backend, x0, 500, seed=3, steps=50)
    abar = backend.scheduler.alphas_cumprod[500]
    eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert result.t == 500
    assert torch.allclose(result.noised, (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).clamp(-1, 1), atol=1e-6)


@pytest.mark.parametrize("t", [20, 500, 980])
def test_a_memorising_model_returns_its_image_and_another_model_its_own(backend, t):
    x0, other = images(0), images(1)
    before = renoise(PointMassModel(backend, x0), x0, t, seed=0)
    after = renoise(PointMassModel(backend, other), x0, t, seed=0)
    assert torch.equal(before.noised, after.noised), "before and after start from the same x_t"
    assert float(pixel_l2(before.denoised, x0)[0]) < 1e-4
    assert float(pixel_l2(after.denoised, other)[0]) < 1e-4 and float(pixel_l2(after.denoised, x0)[0]) > 1.0


def test_t_moves_to_the_ddim_grid_and_bad_t_is_refused(backend):
    assert nearest_renoise_t(backend, 509, steps=50) == 500 and nearest_renoise_t(backend, 9, steps=50) == 0
    assert nearest_renoise_t(backend, 999, steps=50) == 980
    with pytest.raises(ValueError, match="outside 0..999"):
        renoise(backend, images(0), 1000)


def test_real_unet_grid_and_cli(backend, tiny_pixel_model, tmp_path, capsys):
    x0 = images(0)
    rows = [[(name, renoise(backend, x0, t, seed=0, steps=10)) for name in ("before", "after")] for t in (300, 700)]
    assert rows[0][0][1].t == 300 and torch.isfinite(rows[1][1][1].denoised).all()
    grid = renoise_grid(x0, rows)
    assert grid.size[0] > 4 * 8 and grid.size[1] > 2 * 8  # 4 tiles a row, 2 rows

    picture = tmp_path / "x.png"
    Image.fromarray(((x0[0, 0] + 1) * 127.5).round().byte().numpy()).save(picture)
    out = tmp_path / "renoise.png"
    code = main(["renoise", "--model", str(tiny_pixel_model), str(tiny_pixel_model), "--image", str(picture),
                 "--t", "300", "505", "--steps", "10", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0 and Image.open(out).size == (4 * (96 + 2) + 2, 2 * (96 + 14 + 2) + 2)
    assert "t=500 (nearest DDIM timestep to 505)" in printed.err
    assert printed.out.count("L2") == 4
    assert main(["renoise", "--model", str(tiny_pixel_model), "--t", "300", "--out", str(out)]) == 2
    assert "--image is required" in capsys.readouterr().err
