"""An app job's evaluation settings (`EvalSettings`): what `retrack.jobs.Job` draws and shows.

The library's evaluation (`retrack.evaluation`) draws the samples of a `SamplerSettings`; an app
job adds what only the app needs: how many samples its grids show, the live memorisation curve
during training, the teaching view's trajectory and "stop when forgotten". `EvalSettings` builds
the job's `SamplerSettings` and starts from their defaults, so a default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .checks import check_range
from .evaluation import RETURN_COPIES, SamplerSettings

MAX_EVAL_SAMPLES = 1024  # an app job's before/after samples at most
MAX_GRID_SAMPLES = 256  # samples one grid shows at most
# The draw an app job starts from: the evaluation's own defaults (the paper's sampler and steps).
DEFAULT_DRAW = SamplerSettings()


@dataclass(frozen=True)
class EvalSettings:
    """How an app job compares "before" and "after": the same seeds, sampler (the paper's), step
    count and prompt, and the same seeds under DDIM-50 beside it (`deterministic`); the rate on
    `n_samples` samples, the grids showing the first `grid_samples` of them.
    During training the live memorisation curve evaluates `live_samples` samples (seeds from
    `seed`: few, and always the same ones) every `live_every` steps and at the last one, with the
    evaluation's own sampler steps unless `live_steps` says otherwise; `live_every` 0 turns it off.
    Each live point also noises every forget image to `evaluation.RETURN_TIMESTEPS` with
    `live_return_copies` fixed seeds and denoises them (`evaluation.noise_and_denoise_return`; 0
    copies: not done): a signal that moves where a rate of a few dozen samples sits at 0.
    (A cheaper live sampler misleads: at 10 DDIM steps the built-in model's live curve fell to 0 %
    during a ReTrack run whose 50-step "after" rate rose from 7 % to 16 %.)"""

    n_samples: int = DEFAULT_DRAW.n_samples
    grid_samples: int = 64
    seed: int = DEFAULT_DRAW.seed
    # Steps of the evaluation sampler (the paper's): the one default, as in the benchmark. Fewer
    # steps change the rates (benchmarks/results/eval_sampler.md, measured for DDIM), and a live or
    # before/after reading with fewer steps than the evaluation's misled before (docs/RESULTS.md, app cost).
    sampling_steps: int = DEFAULT_DRAW.steps
    trajectory_points: int = 6  # predicted clean images shown in the teaching view
    prompt: str = DEFAULT_DRAW.prompt  # text-to-image models: the prompt whose memorised images are forgotten
    guidance: float = DEFAULT_DRAW.guidance  # text-to-image models: classifier-free guidance scale
    live_every: int = 10
    live_samples: int = 32
    live_steps: Optional[int] = None  # None: the evaluation's `sampling_steps`
    live_return_copies: int = RETURN_COPIES
    # Also read before, after and the oracle under the second, deterministic sampler (DDIM-50) on
    # the same seeds: on the built-in model the paper's sampler and DDIM disagree several-fold.
    deterministic: bool = True
    # Stop training at the first live point where the model has forgotten (`retrack.stopping`,
    # checked on the live samples' seeds under both samplers); the run's steps are the cap.
    until_forgotten: bool = False

    def validate(self) -> None:
        check_range("number of samples", self.n_samples, 1, MAX_EVAL_SAMPLES)
        check_range("samples shown in the grids", self.grid_samples, 1, MAX_GRID_SAMPLES)
        check_range("sampling steps", self.sampling_steps, 1, 1000)
        check_range("trajectory points", self.trajectory_points, 2, 20)
        check_range("the first sample seed", self.seed, 0, 2**32, open_high=True)
        check_range("guidance", self.guidance, 0, 50)
        check_range("live curve: steps between evaluations", self.live_every, 0, 10_000)
        check_range("live curve: samples", self.live_samples, 1, MAX_GRID_SAMPLES)
        if self.live_steps is not None:
            check_range("live curve: sampler steps", self.live_steps, 1, 1000)
        check_range("live curve: noisy copies of each forget image", self.live_return_copies, 0, MAX_GRID_SAMPLES)
        if self.until_forgotten and (self.live_every < 1 or self.live_return_copies < 1):
            raise ValueError("stop when forgotten checks at the live curve's points: it needs the live curve and "
                             "its noise-and-denoise copies on")

    def sampler_settings(self) -> SamplerSettings:
        """The evaluation's draw: these seeds, steps and prompt with the default evaluation sampler."""
        return replace(DEFAULT_DRAW, n_samples=self.n_samples, seed=self.seed, steps=self.sampling_steps,
                       prompt=self.prompt, guidance=self.guidance, batch_size=16)

    def deterministic_sampler_settings(self) -> SamplerSettings:
        """The same seeds under the second, deterministic sampler (DDIM-50)."""
        return self.sampler_settings().deterministic()

    def live_sampler_settings(self) -> SamplerSettings:
        """The live curve's draw: the first `live_samples` seeds of the evaluation's draw."""
        return replace(self.sampler_settings(), n_samples=self.live_samples, steps=self.live_steps or self.sampling_steps)

    def live_at(self, step: int, last: int) -> bool:
        """Whether the live curve is evaluated after training step `step` of `last`."""
        return self.live_every > 0 and (step % self.live_every == 0 or step == last)
