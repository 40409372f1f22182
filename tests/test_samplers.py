"""The sampling schedulers of `retrack.sampling.sample`, DPM-Solver++ above all, on a closed form.

For Gaussian data x0 ~ N(mu, s^2) (per pixel) the exact noise predictor is known,

    eps*(x_t, t) = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t),   a_t = alpha_bar_t,

and the deterministic (probability-flow) sampler maps the starting noise x_T to a known image: it
keeps the standardised value z = (x_t - sqrt(a_t) mu) / sqrt(a_t s^2 + 1 - a_t) fixed, so it ends at
x0 = mu + s z_T. A sampler given eps* must land there, sample by sample.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor

from retrack.backends.base import Backend
from retrack.sampling import make_scheduler, sample


class ExactGaussianEps(torch.nn.Module):
    """The exact noise predictor of N(mu, s^2) data under a DDPM schedule (see the module docstring)."""

    def __init__(self, alphas_cumprod: Tensor, mu: float, s: float) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.mu = torch.nn.Parameter(torch.tensor(mu), requires_grad=False)
        self.s = s

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)


class GaussianBackend(Backend):
    """A pixel 'model' of 1x4x4 images whose network is the exact Gaussian noise predictor."""

    family = "pixel"

    def __init__(self, mu: float = 0.3, s: float = 0.2) -> None:
        # the built-in model's schedule, without x0 clipping (the Gaussian reaches past [-1, 1] rarely, but
        # the closed form assumes no clip)
        self.scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=False)
        self.unet = ExactGaussianEps(self.scheduler.alphas_cumprod, mu, s)
        self.mu, self.s, self.source = mu, s, "closed form"
        self.image_size, self.channels = 4, 1

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        return (1, 4, 4)

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def denoise(self, x_t: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        return self.unet(x_t, t)


def exact_endpoint(backend: GaussianBackend, noise: Tensor, first_t: int) -> Tensor:
    """Where the probability-flow ODE from x_{first_t} = noise ends: mu + s z."""
    a = backend.scheduler.alphas_cumprod[first_t]
    z = (noise - a.sqrt() * backend.mu) / (a * backend.s ** 2 + 1 - a).sqrt()
    return backend.mu + backend.s * z


def first_timestep(backend: Backend, scheduler: str, steps: int) -> int:
    sched = make_scheduler(scheduler, backend.scheduler.config)
    sched.set_timesteps(steps)
    return int(sched.timesteps[0])


def test_dpm_solver_lands_on_the_closed_form_and_beats_ddim_at_equal_steps():
    backend = GaussianBackend()
    from retrack.sampling import initial_noise

    noise = initial_noise(backend.x0_shape, range(0, 64))
    errors = {}
    for scheduler in ("dpm++", "ddim"):
        images = sample(backend, 64, seed=0, steps=20, scheduler=scheduler).images
        target = exact_endpoint(backend, noise, first_timestep(backend, scheduler, 20))
        errors[scheduler] = float((images - target).abs().max())
    # second-order DPM-Solver++ on log-SNR steps is within 0.01 of the exact image at 20 steps (pixel
    # range [-1, 1]; measured 0.0065, and 0.14 with the schedule's own "leading" timesteps)...
    assert errors["dpm++"] < 1e-2, errors
    # ...and many times closer than first-order DDIM at the same 20 steps (measured 0.14)
    assert errors["dpm++"] * 5 < errors["ddim"], errors
    images = sample(backend, 256, seed=100, steps=20, scheduler="dpm++").images
    assert abs(float(images.mean()) - backend.mu) < 0.01
    assert abs(float(images.std()) - backend.s) < 0.01


def test_dpm_solver_is_deterministic_and_sample_i_starts_from_seed_plus_i(tiny_pixel_model):
    from retrack.backends import load_backend

    backend = load_backend(tiny_pixel_model)
    whole = sample(backend, 5, seed=3, steps=6, scheduler="dpm++", batch_size=5).images
    again = sample(backend, 5, seed=3, steps=6, scheduler="dpm++", batch_size=2).images
    tail = sample(backend, 3, seed=5, steps=6, scheduler="dpm++").images
    torch.testing.assert_close(whole, again, atol=1e-4, rtol=0)  # batched convolutions round differently
    torch.testing.assert_close(whole[2:], tail, atol=1e-4, rtol=0)
    assert sample(backend, 2, seed=4, steps=6, scheduler="dpm++").images.sub(whole[:2]).abs().max() > 1e-2


def test_dpm_solver_trajectory_is_the_predicted_clean_image(tiny_pixel_model):
    from retrack.backends import load_backend

    backend = load_backend(tiny_pixel_model)
    result = sample(backend, 2, seed=0, steps=5, scheduler="dpm++", trajectory_points=2)
    assert len(result.trajectory) == 2
    last = min(result.trajectory)  # the final step's x0 prediction is (close to) the sample itself
    assert float((result.trajectory[last] - result.images).abs().max()) < 0.05


def test_unknown_sampler_is_refused_by_name(tiny_pixel_model):
    from retrack.backends import load_backend

    with pytest.raises(ValueError, match="dpm\\+\\+"):
        sample(load_backend(tiny_pixel_model), 1, scheduler="euler")


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close_to_fp32(tiny_pixel_model):
    """precision="bf16" autocasts the network call only: the samples are float32, not identical to
    fp32's (the autocast took effect) and, under deterministic DDIM, close to them. (The tiny model
    has random weights; how close on the real built-in model: benchmarks/results/eval_sampler.md.)"""
    from retrack.backends import load_backend

    backend = load_backend(tiny_pixel_model)
    full = sample(backend, 3, seed=0, steps=4).images
    half = sample(backend, 3, seed=0, steps=4, precision="bf16").images
    assert half.dtype == torch.float32
    assert 0 < float((half - full).abs().max()) < 0.1
    with pytest.raises(ValueError, match="bf16"):
        sample(backend, 1, precision="fp16")


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    """"auto" (the evaluation's default) takes bf16 on a CPU with AVX512-BF16 or AMX and float32 on
    one without, where bf16 is emulated and slower; the evaluation's description says which ran."""
    from retrack import sampling
    from retrack.evaluation import SamplerSettings

    monkeypatch.setattr(sampling, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert sampling.resolve_precision("auto", "cpu") == "bf16"
    assert SamplerSettings(n_samples=4, precision="auto").describe("cpu") == "DDPM, 50 steps, seeds 0..3, bf16"
    monkeypatch.setattr(sampling, "cpu_flags", lambda: {"avx2"})
    assert sampling.resolve_precision("auto", "cpu") == "fp32"
    assert SamplerSettings(n_samples=4, precision="auto").describe("cpu") == "DDPM, 50 steps, seeds 0..3"
    assert sampling.resolve_precision("fp32", "cpu") == "fp32" and sampling.resolve_precision("bf16", "cpu") == "bf16"


def test_the_evaluation_samples_by_the_papers_protocol():
    """The evaluation's default is the released code's sampler: ancestral DDPM, 50 steps for the
    MNIST family (the built-in model), 1,000 for CIFAR-10; DDIM-50 is the second, deterministic one."""
    from retrack.evaluation import SamplerSettings

    default = SamplerSettings()
    assert (default.sampler, default.steps) == ("ddpm", 50)
    assert SamplerSettings.paper("mnist") == default
    assert (SamplerSettings.paper("cifar").sampler, SamplerSettings.paper("cifar").steps) == ("ddpm", 1000)
    assert [SamplerSettings.paper(family).steps for family in ("celeba", "sd")] == [50, 50]
    second = SamplerSettings(n_samples=7, seed=3).deterministic()
    assert (second.sampler, second.steps, second.n_samples, second.seed) == ("ddim", 50, 7, 3)


def test_ancestral_samples_are_diffusers_ddpm_pipeline_and_independent_of_the_batch(tiny_pixel_model):
    """Sample i under the paper's sampler is exactly what diffusers' DDPMPipeline (the released
    code's sampler) draws with `torch.Generator().manual_seed(i)`, fresh noise included, and the
    same alone, in another batch size, or among other seeds."""
    from diffusers import DDPMPipeline

    from retrack.backends import load_backend

    backend = load_backend(tiny_pixel_model, device="cpu")
    ours = sample(backend, 5, seed=10, steps=6, scheduler="ddpm", batch_size=2).images
    pipeline = DDPMPipeline.from_pretrained(tiny_pixel_model)
    theirs = pipeline(batch_size=5, generator=[torch.Generator().manual_seed(s) for s in range(10, 15)],
                      num_inference_steps=6, output_type="np").images  # (N, H, W, C) in [0, 1]
    assert torch.allclose((ours.permute(0, 2, 3, 1) + 1) / 2, torch.from_numpy(theirs), atol=1e-5)
    alone = sample(backend, 1, seed=13, steps=6, scheduler="ddpm").images
    assert torch.allclose(alone[0], ours[3], atol=1e-5)  # (batched convolutions round differently)
    # the ancestral samples are not the deterministic ones from the same starting noise
    ddim = sample(backend, 5, seed=10, steps=6, scheduler="ddim", batch_size=2).images
    assert not torch.allclose(ddim, ours, atol=1e-3)
