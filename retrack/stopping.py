"""Stop a run when the model has forgotten (`retrack unlearn --until-forgotten`, the app's switch).

Every `every` steps the model is checked against a level measured once before training, and the
run stops at the first check that passes all three parts; the run's step count is the cap.

1. **Noise and denoise** (`evaluation.noise_and_denoise_return`): each forget image noised to
   t = 240 and 500 with 16 fixed seeds and denoised. At every t the copies must land at least as
   far from the image, on average, as the level's: the oracle's own return of the forget images
   where the model has an oracle, else the pretrained model's return of a few retain images (an
   image the model learnt as one of many, not as a memorised one).
2. **No more copies** among the check's samples than the oracle makes on the same seeds (none
   without an oracle), by the evaluation's copy thresholds, under the paper's sampler and DDIM-50.
   (Not the benchmark's excess over the oracle's 1 % distance quantile: on a few hundred samples
   1 % is not a whole sample, and the oracle itself would fail that rule on its own seeds.)
3. **Quality held**: the quality figure (`evaluation.quality_figure`) no worse than the worse of
   the oracle's and the pretrained model's on the same seeds, the verdict's rule. Without an
   oracle, no worse than the pretrained model's plus the figure's own seed-to-seed spread (the
   pretrained model measured again on as many other seeds): on a few dozen samples a Fréchet
   distance moves by that much with the seeds alone, and a ceiling without it would never let a
   trained model pass.

Why this is sound when copies are rare: the built-in model makes about 1 % T-shirts under the
paper's sampler, so a check on a few hundred samples sees two or three of them before training
and none, by chance, about one time in ten. A rule on sample counts alone would stop on noise.
Part 1 measures the forget image itself: it needs no rare event, its 16 copies per t come from
fixed seeds, and it moves steadily with the weights (the app's live curve). It carries the
decision; parts 2 and 3 are guards that can only delay a stop. The stop is a claim at the
check's resolution: the full evaluation afterwards (thousands of samples, with intervals) is the
verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor

from .backends.base import Backend
from .evaluation import (
    DDIM, PAPER, Reference, Return, SamplerSettings, at_oracle_level, evaluate,
    noise_and_denoise_return, quality_figure,
)
from .reports import StepEvent

CHECK_EVERY = 10  # steps between checks
CHECK_SAMPLES = 256  # samples per sampler and check
RETAIN_IMAGES = 4  # retain images whose return is the level without an oracle


@dataclass
class Level:
    """What a check compares against, measured once before training."""

    returns: dict[int, Return]  # per t: the oracle's return of the forget images, or the pretrained model's of retain images
    returns_of: str  # which of the two, in words
    oracle_rates: dict[str, dict]  # PAPER / DDIM -> the oracle's copy rates on the check's seeds ({} without one)
    quality_ceiling: dict[str, dict]  # PAPER / DDIM -> {figure: the highest value that counts as held}
    pretrained_quality: dict[str, dict]  # PAPER / DDIM -> the model's quality before training


@dataclass
class Check:
    step: int
    seconds: float  # training seconds at this step
    forgotten: bool
    waiting_for: list[str]  # what is not at the level yet, in words ([] when forgotten)
    returns: dict[int, dict] = field(default_factory=dict)  # per t: returned, copies, distance


class UntilForgotten:
    """`engine.unlearn(..., until=UntilForgotten(...))`: True at the first check the model passes.

    `backend` is the model being trained, measured now (before training) for the level; `oracle`
    the same model retrained without the forget images, if there is one."""

    def __init__(self, backend: Backend, reference: Reference, oracle: Optional[Backend] = None,
                 every: int = CHECK_EVERY, samples: int = CHECK_SAMPLES, sample_steps: int = 50, seed: int = 0,
                 return_copies: int = 16):
        if every < 1 or samples < 1:
            raise ValueError(f"checks need every >= 1 step and samples >= 1, got every={every}, samples={samples}")
        self.backend, self.reference, self.every, self.return_copies = backend, reference, every, return_copies
        paper = SamplerSettings(n_samples=samples, seed=seed, steps=sample_steps)
        self.samplers = {PAPER: paper, DDIM: paper.deterministic()}
        self.level = self._level(oracle)
        self.checks: list[Check] = []

    def _returns(self, backend: Backend, images: Tensor) -> dict[int, Return]:
        return noise_and_denoise_return(backend, images, self.reference.l2_threshold, copies=self.return_copies)

    def _level(self, oracle: Optional[Backend]) -> Level:
        pretrained = {key: evaluate(self.backend, s, self.reference).quality_figures for key, s in self.samplers.items()}
        figure = quality_figure(pretrained[PAPER])
        if oracle is None:
            generator = torch.Generator().manual_seed(0)
            picked = torch.randperm(len(self.reference.retain), generator=generator)[:RETAIN_IMAGES]
            ceiling = {}
            for key, settings in self.samplers.items():
                if figure is not None:
                    other_seeds = replace(settings, seed=settings.seed + settings.n_samples)
                    again = evaluate(self.backend, other_seeds, self.reference).quality_figures[figure]
                    ceiling[key] = {figure: pretrained[key][figure] + abs(again - pretrained[key][figure])}
            return Level(self._returns(self.backend, self.reference.retain[picked]),
                         f"the model's own return of {len(picked)} retain images", {}, ceiling, pretrained)
        oracle_results = {key: evaluate(oracle, s, self.reference) for key, s in self.samplers.items()}
        ceiling = {key: {} if figure is None else
                   {figure: max(oracle_results[key].quality_figures[figure], pretrained[key][figure])}
                   for key in self.samplers}
        return Level(self._returns(oracle, self.reference.forget), "the oracle's return of the forget images",
                     {key: r.rates() for key, r in oracle_results.items()}, ceiling, pretrained)

    def __call__(self, event: StepEvent) -> bool:
        if event.step % self.every and event.step != event.steps:
            return False
        check = self.check(event)
        self.checks.append(check)
        return check.forgotten

    def check(self, event: StepEvent) -> Check:
        """Measure the model now against the level (see the module docstring)."""
        waiting = []
        returns = self._returns(self.backend, self.reference.forget)
        for t, mine in returns.items():
            level = self.level.returns[t]
            if mine.distance < level.distance:
                waiting.append(f"at t = {t} the noisy copies come back closer ({mine.distance:.2f}) than "
                               f"{self.level.returns_of} ({level.distance:.2f})")
        for key, settings in self.samplers.items():
            result = evaluate(self.backend, settings, self.reference)
            oracle_rates = self.level.oracle_rates.get(key, {})
            excess = {name: rate - oracle_rates.get(name, 0.0) for name, rate in result.rates().items()}
            if not at_oracle_level(excess, result.quality_figures, self.level.quality_ceiling.get(key, {}),
                                   self.level.pretrained_quality[key]):
                waiting.append(f"{result.sampler}: copies {result.counts()} or quality "
                               f"{_short(result.quality_figures)} not at the level")
        return Check(event.step, round(event.seconds, 1), not waiting, waiting,
                     {t: {"returned": r.returned, "copies": r.copies, "distance": round(r.distance, 3)}
                      for t, r in returns.items()})

    def record(self) -> dict:
        """What retrack.json keeps: the rule's settings, the level, every check and where it stopped."""
        stopped = next((c for c in self.checks if c.forgotten), None)
        return {"rule": "retrack.stopping (noise-and-denoise return at the level, no copies and quality held "
                        "under the paper's sampler and DDIM-50)",
                "every": self.every, "samples": self.samplers[PAPER].n_samples, "level": self.level.returns_of,
                "level_returns": {t: round(r.distance, 3) for t, r in self.level.returns.items()},
                "quality_ceiling": self.level.quality_ceiling,
                "stopped_at_step": None if stopped is None else stopped.step,
                "seconds": None if stopped is None else stopped.seconds,
                "checks": [asdict(c) for c in self.checks]}


    def outcome(self, cap: int) -> str:
        """Where the run stopped, or what kept it from stopping within `cap` steps, in words (the
        CLI prints it, the app's status ends with it)."""
        record = self.record()
        if record["stopped_at_step"] is not None:
            return (f"forgotten at step {record['stopped_at_step']} of at most {cap} ({record['seconds']} s of "
                    f"training), judged against {record['level']}.")
        waiting = self.checks[-1].waiting_for if self.checks else ["no check was made"]
        return f"not forgotten within {cap} steps ({'; '.join(waiting)})."


def _short(quality: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in quality.items() if isinstance(v, float))


__all__ = ["CHECK_EVERY", "CHECK_SAMPLES", "Check", "Level", "UntilForgotten"]
