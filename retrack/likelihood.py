"""Likelihood of images under a pixel DDPM, in bits per dimension (Song et al., ICLR 2021, sec. D.2).

A DDPM with a linear beta schedule is the discretisation of the variance-preserving SDE

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,   beta(t) = beta_min + t (beta_max - beta_min),  t in [0, 1],

with beta_min = N * beta_start and beta_max = N * beta_end (diffusers' defaults 1e-4, 0.02 and N = 1000
give Song et al.'s 0.1 and 20; the discrete betas are beta(i / (N - 1)) / N exactly). Its marginal is
x_t = gamma(t) x0 + sigma(t) eps with gamma(t)^2 = alpha_bar(t) = exp(-beta_min t - 1/2 (beta_max - beta_min) t^2)
and sigma(t)^2 = 1 - alpha_bar(t). The probability-flow ODE has the same marginals:

    dx/dt = f(x, t) = -1/2 beta(t) [x + score(x, t)] = -1/2 beta(t) [x - eps_theta(x, t) / sigma(t)],

because an epsilon-predicting network estimates score = -eps / sigma. Along the flow,
d log p_t(x_t) / dt = -div f, so integrating from t_min to 1

    log p_{t_min}(x) = log N(x_1; 0, I) + integral_{t_min}^{1} div f(x_t, t) dt,

where N(0, I) stands in for the marginal at t = 1 (alpha_bar(1) = 4.3e-5). The divergence is the
Hutchinson estimate v^T (df/dx) v with one probe v per solve, fixed along the whole trajectory
(Rademacher by default; Gaussian on request), computed with one vector-Jacobian product per
function evaluation. The ODE is solved by torchdiffeq's adaptive Dormand-Prince (dopri5, the
method of scipy's RK45 that Song et al. use) with their rtol = atol = 1e-5 and t_min = 1e-5.

Network input (the choice Song et al. make for DDPM-trained VP models in their likelihood code,
`get_score_fn(..., continuous=True)`): the timestep label is t * (N - 1) as a float, and sigma(t)
is the continuous one. The discrete noise levels the network was trained on agree with the
continuous ones to within 1 % of sigma from t = 0.05 (label 50) on; below, the discrete ones lead
by about one step (label 0 was trained at sigma = 0.010, where sigma(0) = 0).

Data (Song et al.'s `uniform_dequantization`): an 8-bit value k in {0, ..., 255} becomes
y = k + u, u ~ U[0, 1), scaled to x = 2 y / 256 - 1 in [-1, 1). Then
  -log2 p_y(y) = -log2 p_x(x) + D log2(128)   (the Jacobian of y -> x is (2/256)^D),
so bits/dim = -log p_x(x) / (D ln 2) + 7 (the same as their "+8 bits for [0, 1) data, -1 bit for the
scaling to [-1, 1)"). By Jensen, E_u of it is an upper bound on the discrete model's -log2 P(k) / D.

Estimator noise: each repeat draws its own dequantisation u and its own probe v, so the repeats are
independent unbiased estimates; the result is their mean with the standard error std / sqrt(R).
The ODE solver's own error is not in that figure; at rtol = atol = 1e-5 it is far smaller.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .backends.base import Backend
from .images import tensor_to_levels

EpsFn = Callable[[Tensor, Tensor], Tensor]  # eps_theta(x, timestep labels (B,)) -> predicted noise
PROBES = ("rademacher", "gaussian")
BITS_OFFSET_8BIT = 7.0  # log2(256 / 2): from density on [-1, 1) to density on the 8-bit scale [0, 256)


# ----------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class VPSchedule:
    """The continuous variance-preserving schedule matching a DDPM's linear betas."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPSchedule":
        """From a diffusers scheduler config; linear betas only (the SDE above is their limit)."""
        config = scheduler.config
        if config.get("trained_betas") is not None or config.get("beta_schedule", "linear") != "linear":
            raise ValueError(f"the likelihood needs a linear beta schedule; this model uses "
                             f"{config.get('beta_schedule')!r}{' with trained betas' if config.get('trained_betas') is not None else ''}")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"the likelihood needs a model that predicts the noise (epsilon); this one predicts "
                             f"{config.get('prediction_type')!r}")
        n = int(config["num_train_timesteps"])
        return cls(beta_min=n * float(config["beta_start"]), beta_max=n * float(config["beta_end"]), num_train_timesteps=n)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.exp(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t))

    def label(self, t: Tensor) -> Tensor:
        """The network's timestep input for continuous time t (Song et al.: t * (N - 1))."""
        return t * (self.num_train_timesteps - 1)


# ----------------------------------------------------------------------------- settings and results
@dataclass(frozen=True)
class NLLSettings:
    """How the likelihood is estimated. The defaults are Song et al.'s; `cheap()` is the app's."""

    rtol: float = 1e-5
    atol: float = 1e-5
    repeats: int = 4  # independent (dequantisation, probe) draws per image: they give the standard error
    probe: str = "rademacher"
    t_min: float = 1e-5
    method: str = "dopri5"
    seed: int = 0

    @classmethod
    def cheap(cls) -> "NLLSettings":
        """Looser tolerances and fewer repeats: several times faster, less accurate (see
        benchmarks/results/nll_timing.json for what it costs and how far it moves the figure)."""
        return cls(rtol=1e-3, atol=1e-3, repeats=2)

    @classmethod
    def rough(cls) -> "NLLSettings":
        """Rougher still (rtol = atol = 1e-2, 2 repeats): the app's --quick mode, for tests and demos."""
        return cls(rtol=1e-2, atol=1e-2, repeats=2)

    def validate(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; use one of {', '.join(PROBES)}")
        if self.repeats < 2:
            raise ValueError("need at least 2 repeats to state the estimator's noise")
        if not (0 < self.rtol < 1 and 0 < self.atol < 1):
            raise ValueError("rtol and atol must lie in (0, 1)")
        if not 0 < self.t_min < 0.1:
            raise ValueError("t_min must lie in (0, 0.1)")


@dataclass
class Likelihood:
    """The estimate for one image."""

    bits_per_dim: float  # mean over the repeats
    std_error: float  # standard error of that mean (estimator noise: dequantisation and probes)
    repeats: list[float] = field(default_factory=list)  # bits/dim of each repeat
    evaluations: int = 0  # network evaluations (each one forward and one vector-Jacobian product)
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.bits_per_dim:.3f} ± {self.std_error:.3f} bits/dim"


@dataclass
class FlowResult:
    """What one batched probability-flow solve returns."""

    log_p: Tensor  # (B,) log density at t_min of each starting point, in nats
    latent: Tensor  # (B, ...) the end point x_1 of the flow
    evaluations: int


# ----------------------------------------------------------------------------- the estimator
def draw_probes(shape: tuple[int, ...], kind: str, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Hutchinson probes with E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1
    return torch.randn(shape, generator=generator, dtype=dtype)


def flow_log_likelihood(eps_fn: EpsFn, x: Tensor, schedule: VPSchedule, settings: NLLSettings,
                        probes: Tensor) -> FlowResult:
    """log p_{t_min}(x) of each row of x by the probability-flow ODE, one Hutchinson probe per row.

    `eps_fn(x_t, labels)` is the noise prediction at timestep labels (B,) (float, t * (N - 1)).
    The rows share one adaptive solve (the solver's error norm is taken over the whole batch).
    """
    from torchdiffeq import odeint

    dims = x[0].numel()
    calls = 0

    def drift_and_divergence(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal calls
        calls += 1
        x_t = state[0]
        t_batch = t.to(x_t.dtype).expand(x_t.shape[0])
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            eps = eps_fn(x_t, schedule.label(t_batch)).to(x_t.dtype)
            drift = -0.5 * schedule.beta(t_batch).view(shape) * (x_t - eps / schedule.sigma(t_batch).view(shape))
            # v^T (d drift / dx) v from one vector-Jacobian product
            vjp, = torch.autograd.grad((drift * probes).sum(), x_t)
        return drift.detach(), (vjp * probes).flatten(1).sum(1)

    span = torch.tensor([settings.t_min, 1.0], dtype=x.dtype, device=x.device)
    start = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    with torch.no_grad():
        path, integral = odeint(drift_and_divergence, start, span, rtol=settings.rtol, atol=settings.atol,
                                method=settings.method)
    latent = path[-1]
    prior = -0.5 * dims * math.log(2 * math.pi) - 0.5 * latent.flatten(1).pow(2).sum(1)
    return FlowResult(log_p=prior + integral[-1], latent=latent, evaluations=calls)


def dequantise(levels: Tensor, repeats: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """8-bit values (C, H, W) -> `repeats` rows (k + u) / 128 - 1 with u ~ U[0, 1): the model's [-1, 1) scale."""
    noise = torch.rand((repeats, *levels.shape), generator=generator, dtype=torch.float64)
    return ((levels.double() + noise) / 128.0 - 1.0).to(dtype)


def bits_per_dim(log_p: Tensor, dims: int) -> Tensor:
    """Bits/dim on the 8-bit scale from log densities (nats) of dequantised data on [-1, 1)."""
    return -log_p / (dims * math.log(2)) + BITS_OFFSET_8BIT


def image_likelihood(eps_fn: EpsFn, schedule: VPSchedule, image: Tensor, settings: NLLSettings = NLLSettings(),
                     seed: Optional[int] = None) -> Likelihood:
    """Bits/dim of one image (C, H, W) in [-1, 1] with its estimator noise.

    The repeats are solved together; seed (default settings.seed) fixes the dequantisation and probes.
    """
    settings.validate()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed if seed is None else seed)
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    x = dequantise(tensor_to_levels(image), settings.repeats, generator, dtype)
    probes = draw_probes(tuple(x.shape), settings.probe, generator, dtype)
    device = image.device
    flow = flow_log_likelihood(eps_fn, x.to(device), schedule, settings, probes.to(device))
    bits = bits_per_dim(flow.log_p.double().cpu(), image.numel())
    return Likelihood(bits_per_dim=float(bits.mean()), std_error=float(bits.std() / math.sqrt(len(bits))),
                      repeats=[float(b) for b in bits], evaluations=flow.evaluations,
                      seconds=time.perf_counter() - started)


def model_likelihoods(backend: Backend, images: Tensor, settings: NLLSettings = NLLSettings(),
                      on_image: Optional[Callable[[int, int], None]] = None) -> list[Likelihood]:
    """Bits/dim of each image (N, C, H, W) in [-1, 1] under a pixel model (an unconditional DDPM).

    Image i uses seed settings.seed + i, so the same images get the same draws under every model
    (before and after unlearning are compared with the same dequantisation and probes).
    """
    if backend.family != "pixel":
        raise ValueError("the likelihood in bits/dim is defined for pixel models (this one works on latents)")
    if tuple(images.shape[1:]) != backend.x0_shape:
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit this model, which expects "
                         f"{backend.x0_shape}")
    schedule = VPSchedule.from_scheduler(backend.scheduler)
    eps_fn = backend.sampling_denoiser()
    was_training = backend.unet.training
    backend.unet.eval()
    results = []
    try:
        for i, image in enumerate(images.to(backend.device, torch.float32)):
            results.append(image_likelihood(eps_fn, schedule, image, settings, seed=settings.seed + i))
            if on_image is not None:
                on_image(i + 1, len(images))
    finally:
        backend.unet.train(was_training)
    return results


# ----------------------------------------------------------------------------- tables
@dataclass
class LikelihoodRow:
    """One image under one model, for the before / after / oracle tables."""

    model: str
    image: str
    role: str  # "forget" or "retain"
    result: Likelihood


def likelihood_table(rows: Sequence[LikelihoodRow]) -> str:
    """Markdown: one line per image, one column per model, cells 'bits/dim ± standard error'."""
    models = list(dict.fromkeys(row.model for row in rows))
    images = list(dict.fromkeys((row.image, row.role) for row in rows))
    cell = {(row.model, row.image): row.result for row in rows}
    lines = ["| image | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for image, role in images:
        values = [f"{cell[(m, image)].bits_per_dim:.3f} ± {cell[(m, image)].std_error:.3f}" if (m, image) in cell
                  else "–" for m in models]
        lines.append(f"| {image} ({role}) | " + " | ".join(values) + " |")
    return "\n".join(lines)
