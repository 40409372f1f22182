"""What the app's jobs evaluate with: their settings, the CLIP scorer and the cached reference.

`EvalSettings` says how "before" and "after" are compared (the same seeds, sampler, steps and
prompt); `load_scorer` loads a CLIP scorer once per device (the built-in tiny CLIP, with a note,
when a named one cannot be fetched); `reference_for` is the `evaluation.Reference` of a model's
forget set, kept for the next job with the same model and sets. The measures themselves are
`retrack.evaluation`'s.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .engine import check_range
from .evaluation import Reference, SamplerSettings
from .images import uint8_to_tensor
from .models import ModelInfo

if TYPE_CHECKING:
    from .forget_set import ForgetSet

log = logging.getLogger(__name__)


# ============================================================================ evaluation
@dataclass(frozen=True)
class EvalSettings:
    """How "before" and "after" are compared: the same seeds, sampler, step count and prompt."""

    n_samples: int = 16
    seed: int = 0
    sampling_steps: int = 25  # steps of the evaluation sampler (deterministic given the seed)
    trajectory_points: int = 6  # predicted clean images shown in the teaching view
    prompt: str = ""  # text-to-image models: the prompt whose memorised images are forgotten
    guidance: float = 7.5  # text-to-image models: classifier-free guidance scale

    def validate(self) -> None:
        check_range("number of samples", self.n_samples, 1, 256)
        check_range("sampling steps", self.sampling_steps, 1, 1000)
        check_range("trajectory points", self.trajectory_points, 2, 20)
        check_range("the first sample seed", self.seed, 0, 2**32, open_high=True)
        check_range("guidance", self.guidance, 0, 50)

    def sampler_settings(self) -> SamplerSettings:
        """The evaluation's draw: these seeds, steps and prompt with the default evaluation sampler."""
        return SamplerSettings(n_samples=self.n_samples, seed=self.seed, steps=self.sampling_steps,
                               prompt=self.prompt, guidance=self.guidance, batch_size=16)


# ============================================================================ memorisation reference
_SCORERS: dict[tuple[str, str], object] = {}
_SCORERS_LOCK = threading.Lock()
_REFERENCES: OrderedDict[tuple, Reference] = OrderedDict()  # the last few, for repeated jobs
_REFERENCES_LOCK = threading.Lock()


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


def reference_for(model: ModelInfo, forget: ForgetSet, device: str = "cpu") -> Reference:
    """The evaluation reference of a model's forget set (`evaluation.Reference.build`: thresholds
    calibrated against its retain set, CLIP features on a seeded subset of it), scored with the
    model's CLIP scorer; kept for the next job with the same model, scorer and sets. Its `note`
    says when a fallback scorer is used."""
    retain = forget.retain_index
    key = (model.cache_key, model.scorer, device, hashlib.sha256(forget.images.tobytes()).hexdigest(),
           hashlib.sha256(retain.tobytes()).hexdigest())
    with _REFERENCES_LOCK:
        if key not in _REFERENCES:
            scorer, note = load_scorer(model.scorer, device)
            forget_x0 = uint8_to_tensor(forget.images, channels_last=True)
            retain_x0 = uint8_to_tensor(model.training_data.images[retain], channels_last=True)
            _REFERENCES[key] = Reference.build(forget_x0, retain_x0, scorer=scorer, note=note)
            while len(_REFERENCES) > 8:
                _REFERENCES.popitem(last=False)
        return _REFERENCES[key]
