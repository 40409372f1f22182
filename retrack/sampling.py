"""Seeded sampling, denoising trajectories and noise-and-denoise (pictures of them: `retrack.grids`).

Sample i always starts from the noise of `torch.Generator().manual_seed(seed + i)`, whatever the
batch size or device, so "before" and "after" grids of an unlearning run use the same noise and
can be compared tile by tile. Ancestral DDPM sampling (the paper's evaluation sampler: diffusers'
`DDPMScheduler`, fresh noise at every step) draws that fresh noise from the same per-sample
generator, after the starting noise, so sample i is the same alone or in any batch. DDIM with
eta = 0 and DPM-Solver++ are deterministic given the starting noise. DPM-Solver++ (second order, multistep) solves the same ODE in fewer steps: on an exact
Gaussian model its 20 steps land 20x closer to the true end point than DDIM's 20. On the built-in
model its rates differ from DDIM-50's by more than sampling noise (so does DDIM-25), which is why
the evaluation keeps DDIM-50 (benchmarks/results/eval_sampler.md).

`renoise` is the paper's check for one memorised image: noise it to timestep t, then denoise it
with deterministic DDIM from t. A model that memorised the image brings it back; after
unlearning, from the same noise, it should not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from .backends.base import Backend
from .compiled import compiled_backend


@dataclass
class Samples:
    images: Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    seeds: list[int]
    # predicted clean image at chosen timesteps: {timestep: (N, C, H, W) in [-1, 1]}
    trajectory: dict[int, Tensor] = field(default_factory=dict)


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One noise tensor per seed, drawn on the CPU so every device sees the same numbers."""
    return seeded_noise(shape, sample_generators(seeds))


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: its first draw is the sample's starting noise, later draws
    (ancestral sampling) its fresh noise at each step, so a sample never depends on its batch."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def seeded_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> Tensor:
    """The next noise tensor of `shape` from each generator, stacked (N, *shape), on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


SAMPLERS = ("ddim", "ddpm", "dpm++")
PRECISIONS = ("fp32", "bf16", "auto")  # of the network call while sampling; auto: bf16 where native


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (read from /proc/cpuinfo; False where there is none). Elsewhere bf16 is
    emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """"fp32" or "bf16": "auto" is bf16 where `device` has it natively (`native_bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown sampling precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def make_scheduler(name: str, training_config) -> Union[DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler]:
    """A sampling scheduler built from the model's training scheduler config.

    "dpm++" is DPM-Solver++ (2nd order, multistep) with its steps uniform in log-SNR
    (`use_lu_lambdas`, as the DPM-Solver papers place them): with the training schedule's
    "leading" timesteps it is no more accurate than DDIM at equal steps on the closed-form Gaussian
    case of tests/test_samplers.py, with log-SNR steps it is within 0.01 at 10 steps. DDIM clips its x0 prediction to
    [-clip_sample_range, clip_sample_range] when the config says clip_sample; DPM-Solver++ has no
    such option, but its dynamic thresholding with the threshold capped at that range is the same
    clip, so both samplers see the same x0.
    """
    if name == "ddim":
        return DDIMScheduler.from_config(training_config)
    if name == "ddpm":
        return DDPMScheduler.from_config(training_config)
    if name == "dpm++":
        clip = bool(training_config.get("clip_sample", False))
        return DPMSolverMultistepScheduler.from_config(
            training_config, algorithm_type="dpmsolver++", solver_order=2, use_lu_lambdas=True, thresholding=clip,
            sample_max_value=float(training_config.get("clip_sample_range", 1.0)))
    raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")


def _predicted_x0(sched, out, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The sampler's prediction of the clean image at step t: DDIM and DDPM return it; for
    DPM-Solver++ it is x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    if getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample
    alpha_bar = sched.alphas_cumprod[int(t)].to(x.device, x.dtype)
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


@torch.no_grad()
def sample(
    backend: Backend,
    n: int,
    seed: int = 0,
    steps: int = 50,
    scheduler: str = "ddim",
    cond: Optional[Tensor] = None,
    guidance: float = 1.0,
    batch_size: int = 64,
    trajectory_points: int = 0,
    on_batch: Optional[Callable[[int, int], None]] = None,
    precision: str = "fp32",
    compiled: bool = False,
) -> Samples:
    """Draw n samples with seeds seed, seed+1, ...; `scheduler` is one of SAMPLERS. Optionally
    record predicted x0 at `trajectory_points` evenly spaced timesteps (for the teaching view).
    `precision` "bf16" runs the network under bf16 autocast (the scheduler's arithmetic stays
    float32): on a CPU with AVX512-BF16 it nearly halves the time for a small change in the
    samples (benchmarks/results/cpu_speed.md); "auto" takes it where the device has bf16 natively.
    `compiled` draws with a compiled copy of the network (`retrack.compiled`), which is built for
    one batch shape: a last, smaller batch is filled up with the next seeds and those samples are
    dropped, so the kept ones are exactly those of a full batch (every sample has its own noise)."""
    if n < 1 or steps < 1:
        raise ValueError("need at least one sample and one step")
    if compiled:
        backend = compiled_backend(backend)  # the caller's model is left as it is
    device = backend.device
    precision = resolve_precision(precision, device)
    sched = make_scheduler(scheduler, backend.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = list(sched.timesteps)
    record = set()
    if trajectory_points > 0:
        picks = np.linspace(0, len(timesteps) - 1, trajectory_points).round().astype(int)
        record = {int(timesteps[i]) for i in picks}
    was_training = backend.unet.training
    backend.unet.eval()
    denoise = backend.sampling_denoiser(cond, guidance)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    images, trajectory = [], {t: [] for t in sorted(record, reverse=True)}
    seeds = list(range(seed, seed + n))
    try:
        for start in range(0, n, batch_size):
            chunk = seeds[start:start + batch_size]
            kept = len(chunk)
            if compiled and n > batch_size:  # one batch shape: fill up the last batch (see above)
                chunk = chunk + list(range(chunk[-1] + 1, chunk[-1] + 1 + batch_size - kept))
            sched.set_timesteps(steps)  # DPM-Solver++ keeps earlier steps' outputs: each chunk starts afresh
            generators = sample_generators(chunk)
            x = seeded_noise(backend.x0_shape, generators).to(device) * sched.init_noise_sigma
            for t in timesteps:
                t_in = t.to(device).reshape(1)
                with autocast:
                    eps = denoise(sched.scale_model_input(x, t), t_in)
                if precision == "bf16":
                    eps = eps.to(x.dtype)  # the scheduler steps in the samples' own precision
                # ancestral steps draw each sample's fresh noise from its own generator (diffusers'
                # randn_tensor takes one generator per batch row, on the CPU, and moves the noise)
                kwargs = {"generator": generators} if scheduler == "ddpm" else {}
                x_in = x
                out = sched.step(eps, t, x, **kwargs)
                x = out.prev_sample
                if int(t) in record:
                    trajectory[int(t)].append(backend.decode(_predicted_x0(sched, out, eps, x_in, t)[:kept]).float().cpu().clamp(-1, 1))
            images.append(backend.decode(x[:kept]).float().cpu().clamp(-1, 1))
            if on_batch is not None:
                on_batch(min(start + batch_size, n), n)
    finally:
        backend.unet.train(was_training)
    return Samples(torch.cat(images), seeds, {t: torch.cat(v) for t, v in trajectory.items()})


@dataclass
class Renoised:
    """Images noised to one timestep and denoised back by one model."""

    t: int  # the timestep used: 0 (no noise) or one of the DDIM sampler's timesteps
    noised: Tensor  # (N, C, H, W) x_t, decoded, in [-1, 1] (clamped for display)
    denoised: Tensor  # (N, C, H, W) in [-1, 1], on the CPU


def ddim_grid(backend: Backend, steps: int) -> list[int]:
    """The timesteps deterministic DDIM with `steps` steps visits, highest first."""
    sched = DDIMScheduler.from_config(backend.scheduler.config)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def nearest_renoise_t(backend: Backend, t: int, steps: int = 50) -> int:
    """0, or the DDIM timestep nearest t: noise-and-denoise starts exactly on the sampler's grid."""
    if not 0 <= t < backend.scheduler.config.num_train_timesteps:
        raise ValueError(f"t = {t} is outside 0..{backend.scheduler.config.num_train_timesteps - 1}")
    return min([0, *ddim_grid(backend, steps)], key=lambda s: (abs(s - t), s))


@torch.no_grad()
def renoise(backend: Backend, x0: Tensor, t: int, seed: int = 0, steps: int = 50) -> Renoised:
    """Noise x0 (N, C, H, W) to timestep t, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps with
    eps the noise of seed + i for row i (as `sample` draws it), then denoise with DDIM (eta = 0)
    through the sampler's timesteps from t down. t = 0 is no noise: the images come back unchanged.
    t is moved to the nearest timestep of the `steps`-step DDIM grid (`Renoised.t` says which).

    The same seed gives the same eps under every model, so before and after start from one x_t.
    """
    if steps < 1:
        raise ValueError("need at least one DDIM step")
    t = nearest_renoise_t(backend, int(t), steps)
    x0 = x0.to(backend.device, torch.float32)
    if t == 0:
        return Renoised(0, backend.decode(x0).float().cpu().clamp(-1, 1), backend.decode(x0).float().cpu().clamp(-1, 1))
    sched = DDIMScheduler.from_config(backend.scheduler.config)
    sched.set_timesteps(steps)
    eps = initial_noise(tuple(x0.shape[1:]), [seed + i for i in range(len(x0))]).to(x0.device)
    x_t = sched.add_noise(x0, eps, torch.tensor([t]))
    denoise = backend.sampling_denoiser()
    was_training = backend.unet.training
    backend.unet.eval()
    try:
        x = x_t
        for step_t in (s for s in sched.timesteps if int(s) <= t):
            x = sched.step(denoise(x, step_t.to(x.device).reshape(1)), step_t, x, eta=0.0).prev_sample
    finally:
        backend.unet.train(was_training)
    return Renoised(t, backend.decode(x_t).float().cpu().clamp(-1, 1), backend.decode(x).float().cpu().clamp(-1, 1))


def pixel_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-image L2 distance with pixels in [0, 1] (the paper's memorisation scale), (N,)."""
    return ((a.float() - b.float()) / 2).flatten(1).norm(dim=1)
