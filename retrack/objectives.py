"""Unlearning objectives: ReTrack and the baselines, one short function each.

Every objective takes the same inputs and returns named loss terms:

    terms = objective(denoise, batch, schedule, generator, params)

- `denoise(x_t, t, cond) -> predicted noise` is the network call (the backend builds it);
- `batch` holds forget rows, their K nearest retain neighbours and an independent retain batch;
- `schedule` gives gamma_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t);
- `generator` draws every t and epsilon, so runs are reproducible.

Losses follow docs/METHOD.md exactly: squared errors are SUMMED over the entries of one
sample and averaged over samples (`sum_sq`). Methods with one objective return `Terms.loss` and
the engine back-propagates it. EraseDiff and SISS combine two gradients nonlinearly; they return
`loss=None` and the engine (`gradients.StepGradients`) calls `METHODS[name].combine(g_retain,
g_unlearn, params)` on the gradients accumulated over the whole step (so gradient accumulation
stays exact).

The pure tensor formulas (`retrack_unlearn_loss`, `siss_weights`, `erasediff_combine`,
`siss_combine`) are separate functions so tests can check them against closed forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from .presets import DEFAULTS

Denoiser = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


# ----------------------------------------------------------------------------- inputs
@dataclass
class NoiseSchedule:
    """The DDPM forward process x_t = gamma_t * x0 + sigma_t * eps, from a scheduler's alpha_bar."""

    alphas_cumprod: Tensor  # (T,), float64 on the CPU

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        return cls(scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone())

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def gamma_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """gamma_t and sigma_t for integer timesteps t, shaped to broadcast against `like`."""
        abar = self.alphas_cumprod[t.cpu()].to(device=like.device, dtype=like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """t ~ U{0, ..., T-1}, drawn on the CPU generator."""
        return torch.randint(0, self.num_steps, (n,), generator=generator)


@dataclass
class Batch:
    """One micro-batch of an unlearning step (all x0 tensors: pixels in [-1, 1] or latents)."""

    forget: Tensor  # (B_u, C, H, W)
    neighbours: Tensor  # (B_u, K, C, H, W): the K nearest retain items of each forget row
    retain: Tensor  # (B_r, C, H, W), drawn independently of the forget rows
    forget_cond: Optional[Tensor] = None  # conditioning (text embeddings) or None
    retain_cond: Optional[Tensor] = None


@dataclass
class Params:
    """Method hyper-parameters that enter the loss (optimiser settings live in the engine)."""

    lam: float = DEFAULTS["lam"]  # ReTrack: weight of the unlearning term
    eta: float = DEFAULTS["eta"]  # EraseDiff: projection margin
    siss_lambda: float = DEFAULTS["siss_lambda"]  # SISS: mixture probability of the forget row
    siss_c: float = DEFAULTS["siss_c"]  # SISS: fixed norm of the rescaled NegGrad term


@dataclass
class Terms:
    """Named loss terms of one micro-batch (scalars)."""

    unlearn: Tensor
    retain: Tensor
    loss: Optional[Tensor]  # what to back-propagate; None for two-gradient methods
    total: Tensor  # what to display as "loss"


# ----------------------------------------------------------------------------- formulas
def _wide(x: Tensor) -> Tensor:
    """At least float32: half-precision network outputs are summed in float32 (sums of many
    squared entries overflow float16)."""
    return x.float() if x.element_size() < 4 else x


def sum_sq(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample squared error summed over all non-batch dimensions: shape (B,)."""
    return (_wide(a) - _wide(b)).pow(2).flatten(1).sum(1)


def noise_to(x_t: Tensor, x0: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """The noise that takes x0 to x_t: (x_t - gamma * x0) / sigma."""
    return (x_t - gamma * x0) / sigma


def retrack_targets(x_t: Tensor, neighbours: Tensor, gamma: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """v_k = (x_t - gamma n_k) / sigma and pi = softmax_k(-|v_k|^2 / 2), pi without gradient.

    x_t: (B, C, H, W); neighbours: (B, K, C, H, W); gamma, sigma: (B, 1, 1, 1).
    Returns v: (B, K, C, H, W) and pi: (B, K).
    """
    v = (x_t.unsqueeze(1) - gamma.unsqueeze(1) * neighbours) / sigma.unsqueeze(1)
    # pi is the posterior over the K neighbours given x_t: a fixed weighting, never trained through.
    pi = torch.softmax(-0.5 * _wide(v.detach()).pow(2).flatten(2).sum(2), dim=1)
    return v, pi


def retrack_unlearn_loss(eps_pred: Tensor, v: Tensor, pi: Tensor) -> Tensor:
    """Per-sample sum_k pi_k |eps_pred - v_k|^2: shape (B,)."""
    err = (_wide(eps_pred).unsqueeze(1) - _wide(v)).pow(2).flatten(2).sum(2)  # (B, K)
    return (pi * err).sum(1)


def siss_weights(z_t: Tensor, x_r: Tensor, a_u: Tensor, gamma: Tensor, sigma: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Importance weights of the defensive mixture (1 - lam) q(z | x_r) + lam q(z | a_u).

    w_r = 1 / ((1 - lam) + lam e^{d_r - d_u}),  w_u = 1 / ((1 - lam) e^{d_u - d_r} + lam),
    d = |z - gamma x|^2 / (2 sigma^2). Computed in log space so large distances cannot overflow.
    """
    d_r = (z_t - gamma * x_r).double().pow(2).flatten(1).sum(1) / (2 * sigma.double().flatten() ** 2)
    d_u = (z_t - gamma * a_u).double().pow(2).flatten(1).sum(1) / (2 * sigma.double().flatten() ** 2)
    log_keep, log_lam = math.log1p(-lam), math.log(lam)
    w_r = torch.exp(-torch.logaddexp(torch.full_like(d_r, log_keep), log_lam + d_r - d_u))
    w_u = torch.exp(-torch.logaddexp(log_keep + d_u - d_r, torch.full_like(d_r, log_lam)))
    return w_r.to(z_t.dtype), w_u.to(z_t.dtype)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def erasediff_combine(g_retain: list[Tensor], g_forget: list[Tensor], eta: float) -> list[Tensor]:
    """g = g_r + max(eta - <g_r, g_f> / |g_f|^2, 0) * g_f."""
    norm_sq = _dot(g_forget, g_forget)
    if norm_sq == 0:
        return [g.clone() for g in g_retain]
    phi = torch.clamp(eta - _dot(g_retain, g_forget) / norm_sq, min=0.0)
    return [gr + phi.to(gr.dtype) * gf for gr, gf in zip(g_retain, g_forget)]


def siss_combine(g_retain: list[Tensor], g_unlearn: list[Tensor], c: float) -> list[Tensor]:
    """g = g_r - (C / |g_u|) * g_u: the NegGrad term rescaled to the fixed norm C."""
    norm = _dot(g_unlearn, g_unlearn).sqrt()
    if norm == 0:
        return [g.clone() for g in g_retain]
    scale = (c / norm).to(g_retain[0].dtype)
    return [gr - scale * gu for gr, gu in zip(g_retain, g_unlearn)]


# ----------------------------------------------------------------------------- objectives
def _noised(x0: Tensor, schedule: NoiseSchedule, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Draw t and eps (on the CPU generator, so runs are device-independent) and noise x0."""
    t = schedule.sample_t(x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    gamma, sigma = schedule.gamma_sigma(t, x0)
    return gamma * x0 + sigma * eps, t.to(x0.device), eps, gamma, sigma


def predict_noise(denoise: Denoiser, xs: list[Tensor], ts: list[Tensor], conds: list[Optional[Tensor]],
                  fuse: bool) -> list[Tensor]:
    """Predicted noise for several row groups, in one network call (`fuse`) or one call per group.

    The result is the same either way (the UNets normalise per sample); only the speed differs.
    On a GPU one wide call keeps the device busy. On the CPU separate calls are faster for a
    training step: on the built-in model (2 cores) forward+backward over 256 rows took 2.1-2.3 s,
    over 2 x 128 rows 1.9 s (benchmarks/step_timing.py measures this).
    """
    if not fuse:
        return [denoise(x, t, c) for x, t, c in zip(xs, ts, conds)]
    cond = None if conds[0] is None else torch.cat(conds)
    out = denoise(torch.cat(xs), torch.cat(ts), cond)
    return list(out.split([x.shape[0] for x in xs]))


def retrack(denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
    """ReTrack: L = lam * mean_b sum_k pi_k |eps(x_t) - v_k|^2 + (1 - lam) * retain loss.

    x_t is drawn around the forget item; the retain branch has its own t' and eps'.
    """
    x_t, t, _, gamma, sigma = _noised(batch.forget, schedule, generator)
    v, pi = retrack_targets(x_t, batch.neighbours, gamma, sigma)
    xr_t, tr, eps_r, _, _ = _noised(batch.retain, schedule, generator)
    pred_u, pred_r = predict_noise(denoise, [x_t, xr_t], [t, tr], [batch.forget_cond, batch.retain_cond],
                                   fuse=x_t.device.type != "cpu")
    unlearn = retrack_unlearn_loss(pred_u, v, pi).mean()
    retain = sum_sq(pred_r, eps_r).mean()
    loss = params.lam * unlearn + (1.0 - params.lam) * retain
    return Terms(unlearn=unlearn, retain=retain, loss=loss, total=loss)


def vanilla(denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
    """Naive deletion: keep training on the retain set only."""
    xr_t, tr, eps_r, _, _ = _noised(batch.retain, schedule, generator)
    retain = sum_sq(denoise(xr_t, tr, batch.retain_cond), eps_r).mean()
    return Terms(unlearn=torch.zeros_like(retain), retain=retain, loss=retain, total=retain)


def neggrad(denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
    """Gradient ascent on the forget set's denoising loss."""
    x_t, t, eps, _, _ = _noised(batch.forget, schedule, generator)
    forget = sum_sq(denoise(x_t, t, batch.forget_cond), eps).mean()
    return Terms(unlearn=forget, retain=torch.zeros_like(forget), loss=-forget, total=-forget)


def erasediff(denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
    """EraseDiff: retain loss, and a forget loss towards uniform noise u ~ U[0, 1); gradients
    are combined by `erasediff_combine`."""
    x_t, t, _, _, _ = _noised(batch.forget, schedule, generator)
    u = torch.rand(x_t.shape, generator=generator).to(x_t.device, x_t.dtype)
    xr_t, tr, eps_r, _, _ = _noised(batch.retain, schedule, generator)
    # Two separate graphs: the engine takes the two gradients one after the other, and over one
    # fused graph each of those backward passes would run through all rows of both branches.
    pred_u, pred_r = predict_noise(denoise, [x_t, xr_t], [t, tr], [batch.forget_cond, batch.retain_cond], fuse=False)
    forget = sum_sq(pred_u, u).mean()
    retain = sum_sq(pred_r, eps_r).mean()
    return Terms(unlearn=forget, retain=retain, loss=None, total=retain + forget)


def siss(denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms:
    """SISS: one forward on the defensive mixture of forget and retain rows, importance-weighted
    retain and forget losses; gradients are combined by `siss_combine`."""
    n = min(batch.forget.shape[0], batch.retain.shape[0])
    a_u, x_r = batch.forget[:n], batch.retain[:n]
    t = schedule.sample_t(n, generator)
    eps = torch.randn(a_u.shape, generator=generator).to(a_u.device, a_u.dtype)
    take_forget = (torch.rand(n, generator=generator) < params.siss_lambda).to(a_u.device)
    gamma, sigma = schedule.gamma_sigma(t, a_u)
    x0 = torch.where(take_forget.view(-1, 1, 1, 1), a_u, x_r)
    z_t = gamma * x0 + sigma * eps
    cond = None
    if batch.forget_cond is not None:
        mask = take_forget.view((-1,) + (1,) * (batch.forget_cond.dim() - 1))
        cond = torch.where(mask, batch.forget_cond[:n], batch.retain_cond[:n])
    pred = denoise(z_t, t.to(a_u.device), cond)
    w_r, w_u = siss_weights(z_t, x_r, a_u, gamma, sigma, params.siss_lambda)
    retain = (w_r * sum_sq(pred, noise_to(z_t, x_r, gamma, sigma))).mean()
    unlearn = (w_u * sum_sq(pred, noise_to(z_t, a_u, gamma, sigma))).mean()
    return Terms(unlearn=unlearn, retain=retain, loss=None, total=retain - unlearn)


# ----------------------------------------------------------------------------- registry
class Objective(Protocol):
    def __call__(self, denoise: Denoiser, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator, params: Params) -> Terms: ...


@dataclass(frozen=True)
class Method:
    name: str
    objective: Objective
    combine: Optional[Callable[[list[Tensor], list[Tensor], Params], list[Tensor]]] = None
    needs_neighbours: bool = False
    title: str = ""  # how people write its name
    summary: str = ""  # what it does, in a few words

    @property
    def label(self) -> str:
        """Name and summary, as the app's method menu shows them."""
        return f"{self.title}: {self.summary}"


METHODS: dict[str, Method] = {
    "retrack": Method("retrack", retrack, needs_neighbours=True,
                      title="ReTrack", summary="redirect to nearest retain images"),
    "vanilla": Method("vanilla", vanilla, title="Vanilla", summary="fine-tune on the retain set only"),
    "neggrad": Method("neggrad", neggrad, title="NegGrad", summary="gradient ascent on the forget set"),
    "erasediff": Method("erasediff", erasediff, combine=lambda gr, gu, p: erasediff_combine(gr, gu, p.eta),
                        title="EraseDiff", summary="retain loss + projected push to noise"),
    "siss": Method("siss", siss, combine=lambda gr, gu, p: siss_combine(gr, gu, p.siss_c),
                   title="SISS", summary="importance-sampled retain minus rescaled forget loss"),
}
