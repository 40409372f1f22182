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
from retrack.evaluation import noise_and_denoise_return
from retrack.grids import renoise_grid
from retrack.sampling import nearest_renoise_t, pixel_l2, renoise


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


# ============================================================================ the live curve's return
def test_return_of_a_memorising_model_is_every_copy_at_distance_zero(backend):
    """`noise_and_denoise_return` in closed form: a model that memorised image a brings each of a's
    16 noisy copies back exactly (16 of 16, distance 0); the copies of another image b come back as
    a too, each at distance L2(a, b) from b, so over both images 16 of 32 and the mean L2(a, b) / 2."""
    a, b = images(0), images(1)
    memorised_a = PointMassModel(backend, a)
    alone = noise_and_denoise_return(memorised_a, a, threshold=1.0)
    assert list(alone) == [240, 500]
    for result in alone.values():
        assert (result.copies, result.returned, result.share) == (16, 16, 1.0) and result.distance < 1e-4
    both = noise_and_denoise_return(memorised_a, torch.cat([a, b]), threshold=1.0, timesteps=(700,), copies=4)
    apart = float(pixel_l2(a, b)[0])
    assert apart > 1.0 and (both[700].copies, both[700].returned) == (8, 4)
    assert both[700].distance == pytest.approx(apart / 2, abs=1e-4)
    unthresholded = noise_and_denoise_return(memorised_a, a, threshold=None, timesteps=(500,))[500]
    assert unthresholded.returned is None and unthresholded.share is None


def test_app_job_live_points_carry_the_return(tiny_app_model, tmp_path):
    """Every live point of a job (step 0, then every step here) carries the return at both t, for
    16 noisy copies of each of the 2 forget images; the status names it in words while training."""
    from retrack.engine import UnlearnConfig
    from retrack.job_settings import EvalSettings
    from retrack.forget_set import build_forget_set
    from retrack.jobs import Job
    from retrack.models import open_model

    model = open_model(*map(str, tiny_app_model))
    evaluation = EvalSettings(n_samples=2, sampling_steps=2, trajectory_points=2, live_every=1, live_samples=2,
                              deterministic=False)
    job = Job(model, build_forget_set(model, [0, 1]), UnlearnConfig(k=3, steps=2, batch_size=4), evaluation,
              tmp_path / "app-output").start()
    messages = [state.message for state in job.watch(timeout=300)]
    state = job.snapshot()
    assert state.phase == "done", state.message
    assert [point.step for point in state.live] == [0, 1, 2]
    for point in state.live:
        assert sorted(point.returns) == [240, 500]
        assert all(r.copies == 32 and 0 <= r.returned <= 32 and r.distance >= 0 for r in point.returns.values())
    assert state.oracle_returns == {}  # the tiny model has no oracle beside it
    assert any("of 32 noisy copies of the 2 forget images" in message for message in messages), messages
