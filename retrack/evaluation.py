"""The one evaluation of memorisation and quality that the app, CLI, benchmark and model cards call.

    reference = Reference.build(forget, retain, scorer=scorer, classifier=classifier, forget_class=10)
    result = evaluate(backend, SamplerSettings(n_samples=256, seed=0), reference, oracle=levels)
    result.rates()        # {"l2": 0.03, "clip": 0.02, "classifier": 0.04}
    result.excess()       # the same, read against the oracle (see below)
    result.quality        # {"clip_fd": ..., "confident_digit_rate": ..., ...}

What it measures, per sample (each a "distance to the forget set": lower = closer to a copy; which
samples are copies is said once, per measure, by `retrack.copies`):

* ``l2``: pixel-L2 distance (pixels in [0, 1]) to the nearest forget image. A sample is a copy
  below ``Reference.l2_threshold``: the paper's L2 < 10 on 28×28 grey images when that separates
  the forget images from the retain set (real MNIST digits), else half the distance from the forget
  set to its nearest retain image (``metrics.calibrated_l2_threshold``).
* ``clip`` (with a CLIP scorer): 1 − the highest cosine similarity to a forget image; a copy
  at or above the threshold of ``metrics.calibrate_threshold`` in similarity.
* ``classifier`` (when the model family has a classifier, the built-in digits + T-shirt one):
  1 − the probability of the forget class; a copy when that probability exceeds 0.5.

Quality is measured on the samples that are not pixel-L2 copies, as the paper does: the Fréchet
distance of CLIP features to the retain reference, a zero-shot CLIP class score when class names
are given, and with the classifier the confident-digit rate (all samples), the digit Inception
Score and the Fréchet distance of its features.

Read against an oracle (a model that never saw the forget images: the built-in
``assets/builtin/oracle``, or for Stable Diffusion the split's retained generations): the oracle's
samples (same seeds, same sampler) give each measure's 1 % quantile (``OracleLevels``, computed
once and saved as a small dict); a model's *excess over the oracle* is the share of its samples
closer to the forget set than that quantile, minus 1 %. Near 0 means "no more near-copies than a
model that never saw it".

Which sampler draws the samples is part of the result (docs/METHOD.md, "protocol"). The default is
the paper's: ancestral DDPM (diffusers' ``DDPMScheduler``, fresh noise at every step), with the
released code's steps for the model family (``presets.EVALUATION_STEPS``: 50 for MNIST-like models,
1,000 for CIFAR-10). Every verdict is also read under a second, deterministic sampler, DDIM-50
(``SamplerSettings.deterministic()``): on the built-in model the two disagree several-fold, so a
model has *forgotten* only when it is at the oracle's level under both (``at_oracle_level``).
Rates come with their count and a 95 % Wilson interval (``Evaluation.intervals``): at the paper's
rates of well under 1 %, 0 of 1,000 only says "below 0.4 %".

All thresholds are chosen here, in ``Reference.build``; the sampler is two plain fields of
``SamplerSettings`` with one default (``DEFAULT_SAMPLER``, ``DEFAULT_SAMPLER_STEPS``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import metrics
from .backends.base import Backend
from .copies import CLASSIFIER_THRESHOLD, PAPER_L2_THRESHOLD, classifier_copies, clip_copies, copy_rate, pixel_copies
from .images import unit_pixels
from .presets import EVALUATION_STEPS, GUIDANCE
from .sampling import Samples, pixel_l2, renoise, resolve_precision, sample

DEFAULT_SAMPLER = "ddpm"  # the paper's evaluation sampler: ancestral, as the released code's DDPMPipeline
DEFAULT_SAMPLER_STEPS = EVALUATION_STEPS["mnist"]  # the built-in family's; `SamplerSettings.paper` picks per family
SECOND_SAMPLER = "ddim"  # the deterministic sampler every verdict is also read under
SECOND_SAMPLER_STEPS = 50
PAPER, DDIM = "paper", "ddim"  # the keys of the two samplers' results in every record and table
# bf16 autocast where the device has it natively: T-shirt rates within one binomial standard error of
# float32's (at most 4 of 1,000 samples differ) and the same quality, in 0.66x the time per sample on
# the 2-core CPU (benchmarks/results/eval_sampler.md, published_run.md).
DEFAULT_SAMPLER_PRECISION = "auto"
REFERENCE_SIZE = 2000  # retain images (a seeded subset of larger sets) that features are measured on
ORACLE_QUANTILE = 0.01  # "closer than the oracle's 1 % quantile"
# The live noise-and-denoise curve (`noise_and_denoise_return`): each forget image noised to these
# timesteps (on the DDIM-50 grid of a 1,000-step model) with this many fixed seeds, then denoised.
RETURN_TIMESTEPS = (240, 500)
RETURN_COPIES = 16


# ============================================================================ settings
# The batch the compiled network draws with on a CPU: batches of 50-100 drew 10-20 % faster than 250
# on an Intel Xeon (AMX) machine and no differently on an AMD EPYC one (benchmarks/results/compile_options.md).
COMPILED_BATCH = 100


@dataclass(frozen=True)
class SamplerSettings:
    """Which samples are drawn: the same settings give the same samples under every model."""

    n_samples: int = 256
    seed: int = 0  # sample i uses seed + i
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_SAMPLER_STEPS
    prompt: str = ""  # text-to-image models only
    guidance: float = GUIDANCE  # text-to-image models only: classifier-free guidance scale
    batch_size: int = 250
    precision: str = DEFAULT_SAMPLER_PRECISION  # of the network call: fp32, bf16 (autocast) or auto
    compiled: bool = False  # draw with the compiled network (`retrack.compiled`): for thousands of samples
    # (then with batch_size COMPILED_BATCH, as the benchmark and the curves do)

    @classmethod
    def paper(cls, preset: str, **fields) -> "SamplerSettings":
        """The paper's protocol for a model family (a `presets.PRESETS` name, e.g. from
        `presets.preset_for`): ancestral DDPM with the released code's step count."""
        return cls(sampler=DEFAULT_SAMPLER, steps=EVALUATION_STEPS[preset], **fields)

    def deterministic(self) -> "SamplerSettings":
        """The same seeds and prompt under the second, deterministic sampler (DDIM-50)."""
        return replace(self, sampler=SECOND_SAMPLER, steps=SECOND_SAMPLER_STEPS)

    def describe(self, device: Optional[str] = None) -> str:
        """'DDIM, 50 steps, seeds 0..255' (for cards and tables), with ', bf16' when the network
        runs in bf16 on `device` (or the precision setting itself without a device) and ', compiled'
        when it is compiled (its samples differ from eager ones by about 0.001 per pixel)."""
        precision = self.precision if device is None else resolve_precision(self.precision, device)
        return (f"{self.sampler.upper()}, {self.steps} steps, seeds {self.seed}..{self.seed + self.n_samples - 1}"
                + (f", {precision}" if precision != "fp32" else "") + (", compiled" if self.compiled else ""))


def draw(backend: Backend, settings: SamplerSettings, on_batch: Optional[Callable[[int, int], None]] = None) -> Samples:
    """The seeded samples of `settings` from a model (a prompt is encoded for text-to-image models)."""
    cond = backend.encode_prompt([settings.prompt.strip()]) if settings.prompt.strip() else None
    return sample(backend, settings.n_samples, seed=settings.seed, steps=settings.steps, scheduler=settings.sampler,
                  cond=cond, guidance=settings.guidance if cond is not None else 1.0,
                  batch_size=settings.batch_size, on_batch=on_batch, precision=settings.precision,
                  compiled=settings.compiled)


# ============================================================================ the reference
def reference_subset(n: int, size: int = REFERENCE_SIZE, seed: int = 0) -> np.ndarray:
    """Indices of the retain images features are measured on: all of them up to `size`, else a
    seeded sorted choice of `size` (one rule for the app, the benchmark and the model cards)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def l2_threshold_for(forget01: np.ndarray, retain01: np.ndarray) -> tuple[float, str]:
    """The pixel-L2 copy threshold and its rule: the paper's 10 on 28×28 grey images when every
    retain image lies at least that far from the forget set, else the calibrated half-distance."""
    calibrated = metrics.calibrated_l2_threshold(forget01, retain01)  # half the nearest retain image's distance
    if forget01.shape[1:] == (1, 28, 28) and 2 * calibrated >= PAPER_L2_THRESHOLD:
        return PAPER_L2_THRESHOLD, "paper: L2 < 10 (28x28, pixels in [0, 1])"
    return calibrated, f"calibrated: half the distance {2 * calibrated:.3f} to the nearest retain image"


@dataclass
class Reference:
    """What every evaluation compares against, computed once per forget set (`Reference.build`)."""

    forget: Tensor  # (N_u, C, H, W) in [-1, 1]
    retain: Tensor  # (N_r, C, H, W) in [-1, 1]; may be empty when thresholds are given
    l2_threshold: Optional[float]  # None: no pixel-L2 copy criterion (no retain images to calibrate it on)
    l2_rule: str
    scorer: Optional[metrics.ClipScorer] = None
    clip_threshold: Optional[float] = None
    forget_features: Optional[Tensor] = None  # CLIP features of the forget images
    retain_features: Optional[np.ndarray] = None  # CLIP features of the retain reference subset
    classifier: Optional[object] = None  # retrack.classifier.DigitClassifier
    forget_class: Optional[int] = None  # the classifier's class of the forget images (given with a classifier)
    retain_classifier_features: Optional[np.ndarray] = None
    class_names: Sequence[str] = ()  # zero-shot CLIP class score over these names, when given
    note: str = ""  # e.g. that a fallback CLIP scorer is used

    @classmethod
    def build(cls, forget: Tensor, retain: Tensor, scorer: Optional[metrics.ClipScorer] = None,
              classifier=None, forget_class: Optional[int] = None, class_names: Sequence[str] = (),
              clip_threshold: Optional[float] = None, l2_threshold: Optional[float] = None,
              note: str = "", reference_size: int = REFERENCE_SIZE) -> "Reference":
        """Calibrate every threshold (unless given) against `retain`; features are measured on
        `reference_subset(len(retain), reference_size)` of it. Images are (N, C, H, W) in [-1, 1]."""
        if len(forget) == 0:
            raise ValueError("the forget set is empty")
        if classifier is not None and forget_class is None:
            raise ValueError("a classifier needs the class of the forget images (forget_class)")
        if len(retain) == 0 and (scorer is None or clip_threshold is None) and l2_threshold is None:
            raise ValueError("give retain images to calibrate the thresholds from, or the thresholds")
        if l2_threshold is not None:
            l2_rule = "given"
        elif len(retain):
            l2_threshold, l2_rule = l2_threshold_for(unit_pixels(forget), unit_pixels(retain))
        else:
            l2_rule = "none: no retain images to calibrate it on"
        subset = retain[torch.from_numpy(reference_subset(len(retain), reference_size))] if len(retain) else retain
        forget_features = retain_features = retain_classifier_features = None
        if scorer is not None:
            forget_features = scorer.image_features(forget)
            retain_features = scorer.image_features(subset).numpy() if len(subset) else None
            if clip_threshold is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an overlap shows in the scores themselves
                    clip_threshold = metrics.calibrate_threshold(forget_features, retain_features)
        if classifier is not None and len(subset):
            retain_classifier_features = classifier.features(subset)
        return cls(forget=forget, retain=retain, l2_threshold=None if l2_threshold is None else float(l2_threshold),
                   l2_rule=l2_rule, scorer=scorer,
                   clip_threshold=None if clip_threshold is None else float(clip_threshold),
                   forget_features=forget_features, retain_features=retain_features, classifier=classifier,
                   forget_class=forget_class, retain_classifier_features=retain_classifier_features,
                   class_names=tuple(class_names), note=note)

    def thresholds(self) -> dict:
        """Each measure's copy threshold, in its own units (for records)."""
        out = {"l2": self.l2_threshold, "l2_rule": self.l2_rule}
        if self.clip_threshold is not None:
            out["clip_similarity"] = self.clip_threshold
        if self.classifier is not None:
            out["classifier_probability"] = CLASSIFIER_THRESHOLD
        return out


# ============================================================================ oracle levels
@dataclass
class OracleLevels:
    """Each measure's `quantile` quantile of the distance to the forget set over an oracle's
    samples (or, for Stable Diffusion, the retained generations): the level a model that never
    saw the forget images reaches by chance. Computed once; `to_dict`/`from_dict` keep it."""

    levels: dict[str, float]  # measure -> distance quantile
    quantile: float = ORACLE_QUANTILE
    n_samples: int = 0
    source: str = ""  # e.g. "assets/builtin/oracle, DDIM, 50 steps, seeds 0..255"
    rates: dict[str, float] = field(default_factory=dict)  # the oracle's own copy rates
    quality: dict[str, Optional[float]] = field(default_factory=dict)

    @classmethod
    def from_evaluation(cls, oracle: "Evaluation", source: str = "", quantile: float = ORACLE_QUANTILE) -> "OracleLevels":
        levels = {name: float(np.quantile(distance, quantile)) for name, distance in oracle.distances().items()}
        return cls(levels=levels, quantile=quantile, n_samples=oracle.n, source=source, rates=oracle.rates(),
                   quality=dict(oracle.quality_figures))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OracleLevels":
        return cls(**data)


def excess_over(distance: np.ndarray, level: float, quantile: float = ORACLE_QUANTILE) -> float:
    """Share of samples closer to the forget set than the oracle's quantile `level`, minus `quantile`."""
    return float((np.asarray(distance) < level).mean()) - quantile


# What "at the oracle's level" is read on: the forget measures (pixel L2, the paper's; the
# classifier, which also counts blurred copies) and the quality figure that must stay in range.
FORGET_MEASURES = ("l2", "classifier")
QUALITY_FIGURES = ("classifier_fd", "clip_fd")  # the first one an evaluation has; lower is better


def quality_figure(quality: dict) -> Optional[str]:
    """The quality figure a verdict is judged by: the classifier's Fréchet distance, else CLIP's."""
    return next((name for name in QUALITY_FIGURES if quality.get(name) is not None), None)


def copies_beyond_oracle(counts: dict, n: int, oracle_rates: dict, oracle_n: int) -> bool:
    """Whether a model draws more copies than the oracle beyond sampling error, by any forget
    measure: its 95 % Wilson interval lies wholly above the oracle's (same sampler). The excess over
    the oracle's 1 % quantile cannot see this at low rates: 12 faint T-shirts in 50,000 samples hide
    among the few hundred digits near that quantile (docs/RESULTS.md, the 50,000-sample benchmark)."""
    for name in FORGET_MEASURES:
        if name in counts and name in oracle_rates and n and oracle_n:
            oracle_count = round(oracle_rates[name] * oracle_n)
            if metrics.wilson_interval(counts[name], n)[0] > metrics.wilson_interval(oracle_count, oracle_n)[1]:
                return True
    return False


def forget_measures_at_oracle(excess: dict, more_copies: bool = False) -> bool:
    """The memorisation half of the rule: no forget measure's excess over the oracle above 0, and
    no more copies than the oracle beyond sampling error (`copies_beyond_oracle`)."""
    return all(excess.get(name, 0.0) <= 0.0 for name in FORGET_MEASURES) and not more_copies


def at_oracle_level(excess: dict, quality: dict, oracle_quality: dict, pretrained_quality: dict,
                    more_copies: bool = False) -> bool:
    """The one rule for "forgotten" under one sampler: every forget measure's excess over the oracle
    is at most 0 (no more samples closer to the forget set than the oracle's 1 % quantile than the
    oracle itself has), no more copies than the oracle beyond sampling error (`more_copies`, from
    `copies_beyond_oracle`), and the quality figure (lower is better) no worse than the worse of the
    oracle's and the pretrained model's under the same sampler. A verdict needs it under both
    samplers (the paper's and `SECOND_SAMPLER`)."""
    figure = quality_figure(pretrained_quality)
    forgotten = forget_measures_at_oracle(excess, more_copies)
    if figure is None:
        return forgotten
    ceiling = max(oracle_quality.get(figure) or 0.0, pretrained_quality[figure])
    return forgotten and quality.get(figure) is not None and quality[figure] <= ceiling


# ============================================================================ the result
@dataclass
class Evaluation:
    """Seeded samples with every memorisation measure and quality figure.

    The app reads the CLIP view through `clip_similarity`, `clip_threshold`, `clip_flags`,
    `clip_rate` and `quality` (the CLIP Fréchet distance), as it shows them.
    """

    samples: Samples
    l2: np.ndarray  # (N,) pixel-L2 distance to the nearest forget image
    reference: Reference
    clip_similarity: Optional[np.ndarray] = None  # (N,) highest CLIP cosine to a forget image
    forget_probability: Optional[np.ndarray] = None  # (N,) classifier probability of the forget class
    class_probabilities: Optional[np.ndarray] = None  # (N, classes) the classifier's probabilities of every class
    quality_figures: dict[str, Optional[float]] = field(default_factory=dict)
    text_score: Optional[float] = None  # mean CLIP cosine of the samples to the prompt
    oracle: Optional[OracleLevels] = None
    sampler: str = ""  # how the samples were drawn (`SamplerSettings.describe`), when known

    @property
    def n(self) -> int:
        return len(self.l2)

    def distances(self) -> dict[str, np.ndarray]:
        """Each available measure as a distance to the forget set (lower = closer to a copy)."""
        out = {"l2": self.l2}
        if self.clip_similarity is not None:
            out["clip"] = 1.0 - self.clip_similarity
        if self.forget_probability is not None:
            out["classifier"] = 1.0 - self.forget_probability
        return out

    def copies(self) -> dict[str, np.ndarray]:
        """Boolean (N,) per measure: the sample counts as a copy of a forget image (`retrack.copies`)."""
        out = {} if self.reference.l2_threshold is None else {"l2": pixel_copies(self.l2, self.reference.l2_threshold)}
        if self.clip_similarity is not None:
            out["clip"] = clip_copies(self.clip_similarity, self.reference.clip_threshold)
        if self.forget_probability is not None:
            out["classifier"] = classifier_copies(self.forget_probability)
        return out

    def rates(self) -> dict[str, float]:
        """Share of copies per measure."""
        return {name: copy_rate(flags) for name, flags in self.copies().items()}

    def counts(self) -> dict[str, int]:
        """Number of copies per measure (of `n`)."""
        return {name: int(flags.sum()) for name, flags in self.copies().items()}

    def intervals(self) -> dict[str, tuple[float, float]]:
        """The 95 % Wilson interval of each rate (`metrics.wilson_interval`)."""
        return {name: metrics.wilson_interval(count, self.n) for name, count in self.counts().items()}

    def excess(self, oracle: Optional[OracleLevels] = None) -> dict[str, float]:
        """Per measure, the excess over the oracle (see the module docstring); {} without one."""
        oracle = oracle or self.oracle
        if oracle is None:
            return {}
        return {name: excess_over(distance, oracle.levels[name], oracle.quantile)
                for name, distance in self.distances().items() if name in oracle.levels}

    def nearest(self, k: int = 16) -> tuple[Tensor, list[str], list[bool]]:
        """The k samples nearest the forget set by pixel L2, nearest first (tensor in [-1, 1]), with
        their distances as captions and their pixel-L2 copy flags: the grid to look at before
        believing a rate (ghosts that no threshold counts show here; `grids.nearest_rows_grid` draws it)."""
        order = np.argsort(self.l2, kind="stable")[:k]
        flags = self.copies().get("l2", np.zeros(self.n, dtype=bool))
        images = self.samples.images[torch.as_tensor(order)]
        return images, [f"{self.l2[i]:.1f}" for i in order], [bool(flags[i]) for i in order]

    def class_shares(self, classifier=None) -> Optional[np.ndarray]:
        """(classes,) the share of the samples a classifier puts in each class (its most probable
        one; the built-in classifier's ten digits, then the T-shirt): does forgetting one class take
        its neighbours with it? The reference's classifier, or `classifier` when given (e.g. the
        model's own, where the reference has none); None without either."""
        probabilities = (classifier.probabilities(self.samples.images) if classifier is not None
                         else self.class_probabilities)
        return None if probabilities is None else metrics.class_shares(probabilities)

    @property
    def quality(self) -> Optional[float]:
        """The CLIP Fréchet distance of the non-copies to the retain reference (lower is better)."""
        return self.quality_figures.get("clip_fd")

    # --- the CLIP view the app shows (the copy measure that works for any image) -----------
    @property
    def clip_threshold(self) -> float:
        return self.reference.clip_threshold

    @property
    def clip_flags(self) -> np.ndarray:
        return self.copies()["clip"]

    @property
    def clip_rate(self) -> float:
        return copy_rate(self.clip_flags)

    def teaching_seed(self) -> tuple[int, bool]:
        """The seed whose sample is closest (CLIP) to a forget image, and whether it is a copy."""
        best = int(np.argmax(self.clip_similarity))
        return self.samples.seeds[best], bool(self.clip_flags[best])

    def summary(self) -> dict:
        """Every rate, excess and quality figure, with the thresholds (JSON-ready)."""
        out = {"samples": self.n, "rates": self.rates(), "counts": self.counts(),
               "intervals": {name: list(bounds) for name, bounds in self.intervals().items()},
               "sampler": self.sampler, "thresholds": self.reference.thresholds(),
               "quality": dict(self.quality_figures)}
        if self.clip_similarity is not None:
            out["clip_similarity_mean"] = float(self.clip_similarity.mean())
            out["clip_similarity_max"] = float(self.clip_similarity.max())
        if self.text_score is not None:
            out["text_score"] = self.text_score
        if self.oracle is not None:
            out["excess_over_oracle"] = self.excess()
            out["oracle_levels"] = dict(self.oracle.levels)
        return out


# ============================================================================ evaluating
def evaluate_samples(samples: Samples, reference: Reference, oracle: Optional[OracleLevels] = None,
                     prompt: str = "", sampler: str = "") -> Evaluation:
    """Every measure of already-drawn samples (the app's live curve, Stable Diffusion generations);
    `sampler` says how they were drawn (`SamplerSettings.describe`), for records."""
    images = samples.images
    result = Evaluation(samples=samples, reference=reference, oracle=oracle, sampler=sampler,
                        l2=metrics.nearest_l2_distances(unit_pixels(images), unit_pixels(reference.forget)))
    features = prompt_scores = None
    if reference.scorer is not None:
        features = reference.scorer.image_features(images)
        result.clip_similarity = metrics.max_cosine_similarity(features, reference.forget_features)
        if prompt.strip():  # each sample's CLIP cosine to the prompt
            prompt_scores = (features @ reference.scorer.text_features([prompt.strip()]).T)[:, 0]
            result.text_score = float(prompt_scores.mean())
    probs = None
    if reference.classifier is not None:
        probs = reference.classifier.probabilities(images)
        result.forget_probability = probs[:, reference.forget_class]
        result.class_probabilities = probs
    result.quality_figures = quality_of(result, features, probs, prompt_scores)
    return result


def quality_of(result: Evaluation, features: Optional[Tensor], probs: Optional[np.ndarray],
               prompt_scores: Optional[Tensor] = None) -> dict[str, Optional[float]]:
    """Quality on the non-copies, as the paper measures it: copies by the pixel-L2 criterion, or by
    CLIP where there is no pixel criterion (no retain images); figures that need two or more
    non-copies are None without them. With the samples' CLIP cosines to the prompt
    (`prompt_scores`), `prompt_score` is their mean over the non-copies: for a text-to-image model,
    whether what it still draws for the prompt matches it (collateral damage of unlearning shows as a
    fall)."""
    reference, images = result.reference, result.samples.images
    copies = result.copies()
    clean = ~copies.get("l2", copies.get("clip", np.zeros(result.n, bool)))
    kept = torch.from_numpy(clean)
    quality: dict[str, Optional[float]] = {}
    if features is not None:
        quality["clip_fd"] = (metrics.frechet_distance(features[kept].numpy(), reference.retain_features)
                              if clean.sum() >= 2 and reference.retain_features is not None else None)
        if reference.class_names:
            quality["clip_class_score"] = (metrics.inception_style_score(
                reference.scorer.zero_shot(images[kept], list(reference.class_names))) if clean.any() else None)
    if prompt_scores is not None:
        quality["prompt_score"] = float(prompt_scores[kept].mean()) if clean.any() else None
    if probs is not None:
        quality["confident_digit_rate"] = metrics.confident_digit_rate(probs)
        quality["digit_inception_score"] = metrics.digit_inception_score(probs[clean]) if clean.any() else None
        quality["classifier_fd"] = (metrics.frechet_distance(reference.classifier.features(images[kept]),
                                                             reference.retain_classifier_features)
                                    if clean.sum() >= 2 and reference.retain_classifier_features is not None else None)
    return quality


def evaluate(backend: Backend, settings: SamplerSettings, reference: Reference, oracle: Optional[OracleLevels] = None,
             on_batch: Optional[Callable[[int, int], None]] = None) -> Evaluation:
    """Draw the seeded samples of `settings` from a model and measure them (`evaluate_samples`)."""
    return evaluate_samples(draw(backend, settings, on_batch), reference, oracle, prompt=settings.prompt,
                            sampler=settings.describe(str(backend.device)))


def oracle_levels(backend: Backend, settings: SamplerSettings, reference: Reference, source: str = "") -> OracleLevels:
    """The oracle's levels from its own samples under the same settings."""
    described = settings.describe(str(backend.device))
    return OracleLevels.from_evaluation(evaluate(backend, settings, reference),
                                        source=f"{source}, {described}" if source else described)


# ============================================================================ noise and denoise
@dataclass(frozen=True)
class Return:
    """How a model brings noisy copies of the forget images back (`noise_and_denoise_return`)."""

    t: int  # the timestep the copies were noised to (on the DDIM-50 grid)
    copies: int  # noisy copies in all (forget images × copies of each)
    returned: Optional[int]  # of them, denoised back within the copy threshold of their image (None: no threshold)
    distance: float  # mean pixel-L2 distance (pixels in [0, 1]) of the denoised copies to their image

    @property
    def share(self) -> Optional[float]:
        return None if self.returned is None else self.returned / self.copies


def noise_and_denoise_return(backend: Backend, images: Tensor, threshold: Optional[float],
                             timesteps: Sequence[int] = RETURN_TIMESTEPS, copies: int = RETURN_COPIES,
                             seed: int = 0) -> dict[int, Return]:
    """The forget images (N, C, H, W) in [-1, 1], each noised to every t of `timesteps` with `copies`
    fixed seeds and denoised by deterministic DDIM (`sampling.renoise`: one batch of N × copies per
    t, row i (image i // copies) noised with seed + i at every t): per t, how many come back within
    the pixel-L2 copy `threshold` of their image, and their mean distance to it. A model that
    memorised an image brings every copy back (distance near 0); a model that never saw it draws
    something else from high enough t."""
    originals = images.float().cpu().repeat_interleave(copies, dim=0)  # image j's copies: rows j*copies, ...
    x0 = backend.encode(images.to(backend.device)).repeat_interleave(copies, dim=0)
    out = {}
    for t in timesteps:
        result = renoise(backend, x0, t, seed=seed)
        distance = pixel_l2(result.denoised, originals)
        out[result.t] = Return(t=result.t, copies=len(originals), distance=float(distance.mean()),
                               returned=None if threshold is None else int(pixel_copies(distance, threshold).sum()))
    return out
