"""The app's before/after evaluation, moved unchanged from the former `retrack/session.py`.

Issue 11 replaces it with the one evaluation module (`retrack/evaluation.py`); until then it is
kept here as one block so that change merges in one place: `EvalSettings` (same seeds, sampler
and prompt before and after), `Evaluation` (scored samples), `load_scorer` and
`MemorisationDetector` (CLIP memorisation score, calibrated threshold, quality).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from PIL import Image

from .engine import check_range
from .models import ModelInfo
from .sampling import Samples, display_grid

if TYPE_CHECKING:
    from .forget_set import ForgetSet

log = logging.getLogger(__name__)


# ============================================================================ evaluation
@dataclass(frozen=True)
class EvalSettings:
    """How "before" and "after" are compared: the same seeds, sampler, step count and prompt."""

    n_samples: int = 16
    seed: int = 0
    sampling_steps: int = 25  # DDIM steps (deterministic given the seed)
    trajectory_points: int = 6  # predicted clean images shown in the teaching view
    prompt: str = ""  # text-to-image models: the prompt whose memorised images are forgotten
    guidance: float = 7.5  # text-to-image models: classifier-free guidance scale

    def validate(self) -> None:
        check_range("number of samples", self.n_samples, 1, 256)
        check_range("sampling steps", self.sampling_steps, 1, 1000)
        check_range("trajectory points", self.trajectory_points, 2, 20)
        check_range("the first sample seed", self.seed, 0, 2**32, open_high=True)
        check_range("guidance", self.guidance, 0, 50)


@dataclass
class Evaluation:
    """One set of seeded samples with their memorisation scores."""

    samples: Samples
    scores: np.ndarray  # CLIP memorisation score per sample (higher = closer to a forget image)
    threshold: float  # scores at or above it count as reproducing a forget image
    quality: Optional[float]  # Fréchet distance to the retain set in CLIP space (lower is better)

    @property
    def flags(self) -> np.ndarray:
        return self.scores >= self.threshold  # as metrics.memorisation_rate counts

    @property
    def rate(self) -> float:
        """Share of samples flagged as memorised."""
        return float(self.flags.mean())

    def grid(self, ncol: int = 8) -> Image.Image:
        """The samples, each captioned with its seed and score; flagged ones framed in red."""
        labels = [f"{seed}: {score:.2f}" for seed, score in zip(self.samples.seeds, self.scores)]
        return display_grid(self.samples.images, ncol=ncol, labels=labels, flags=self.flags.tolist())

    def teaching_seed(self) -> tuple[int, bool]:
        """The seed whose sample is closest to a forget image, and whether it was flagged."""
        best = int(np.argmax(self.scores))
        return self.samples.seeds[best], bool(self.flags[best])


# ============================================================================ memorisation detector
_SCORERS: dict[tuple[str, str], object] = {}
_SCORERS_LOCK = threading.Lock()
REFERENCE_SIZE = 2000  # retain images the threshold and the quality figure are measured against
_DETECTORS: OrderedDict[tuple, "MemorisationDetector"] = OrderedDict()  # the last few, for repeated jobs
_DETECTORS_LOCK = threading.Lock()


def load_scorer(spec: str, device: str) -> tuple[object, str]:
    """The CLIP scorer for `spec` (a folder or "name:pretrained"), loaded once per device.

    Returns (scorer, note). A named CLIP whose weights cannot be fetched (no network, empty
    cache) is replaced by the built-in tiny CLIP, and the note says so: its scores are rough
    outside the digits it was trained on.
    """
    from .metrics import ClipScorer

    with _SCORERS_LOCK:
        if (spec, device) not in _SCORERS:
            if Path(spec).is_dir():
                _SCORERS[(spec, device)] = (ClipScorer.load(spec, device=device), "")
            else:
                import open_clip

                name, _, tag = spec.partition(":")
                try:  # fetch (or find in the cache) first: it fails fast, building the model does not
                    open_clip.pretrained.download_pretrained(open_clip.pretrained.get_pretrained_cfg(name, tag))
                    _SCORERS[(spec, device)] = (ClipScorer.load(name, pretrained=tag, device=device), "")
                except Exception as exc:
                    log.warning("CLIP scorer %s unavailable (%s); using the built-in one", spec, exc)
                    note = (f"The CLIP scorer {spec} could not be loaded (offline?), so memorisation is scored "
                            "with the built-in tiny CLIP, trained on digits: treat the scores as rough.")
                    _SCORERS[(spec, device)] = (ClipScorer.load("builtin", device=device), note)
        return _SCORERS[(spec, device)]


class MemorisationDetector:
    """Decides which samples reproduce a forget image, and measures quality.

    A sample's score is its highest CLIP cosine similarity to any forget image. The threshold
    is calibrated on this forget set against retain images (`metrics.calibrate_threshold`:
    midway between how close copies look and how close legitimate data gets). Quality is the
    Fréchet distance, in CLIP space, from the samples that are not memorised to retain images.
    """

    def __init__(self, scorer, forget_images: np.ndarray, reference_images: np.ndarray, note: str = ""):
        from .metrics import calibrate_threshold

        self.scorer, self.note = scorer, note
        self.forget_features = scorer.image_features(forget_images)
        self.reference_features = scorer.image_features(reference_images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an overlap is reported by the scores themselves
            self.threshold = calibrate_threshold(self.forget_features, self.reference_features)

    @classmethod
    def for_model(cls, model: ModelInfo, forget: ForgetSet, device: str = "cpu") -> "MemorisationDetector":
        """The detector for a model's forget set, measured against (up to REFERENCE_SIZE) retain
        images; kept for the next job with the same model, scorer and sets."""
        rng = np.random.default_rng(0)
        retain = forget.retain_index
        reference = retain if len(retain) <= REFERENCE_SIZE else np.sort(rng.choice(retain, REFERENCE_SIZE, replace=False))
        key = (model.cache_key, model.scorer, device, hashlib.sha256(forget.images.tobytes()).hexdigest(),
               hashlib.sha256(reference.tobytes()).hexdigest())
        with _DETECTORS_LOCK:
            if key not in _DETECTORS:
                scorer, note = load_scorer(model.scorer, device)
                _DETECTORS[key] = cls(scorer, forget.images, model.training_data.images[reference], note)
                while len(_DETECTORS) > 8:
                    _DETECTORS.popitem(last=False)
            return _DETECTORS[key]

    def evaluate(self, samples: Samples) -> Evaluation:
        from .metrics import frechet_distance, max_cosine_similarity

        features = self.scorer.image_features(samples.images)
        scores = max_cosine_similarity(features, self.forget_features)
        clean = features[torch.from_numpy(scores < self.threshold)]
        quality = frechet_distance(clean.numpy(), self.reference_features.numpy()) if len(clean) >= 2 else None
        return Evaluation(samples=samples, scores=scores, threshold=self.threshold, quality=quality)

