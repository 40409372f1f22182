"""The built-in default: the digits + T-shirt DDPM in assets/builtin and its training data.

The training set is not shipped as files: `assets/builtin/dataset.json` records the builder in
`retrack.data` (v1: `build_digits_tshirt`, v2: `build_mnist_tshirt`) and its parameters, and
`builtin_dataset()` rebuilds the identical set (`checked_dataset`: checked against the recorded
fingerprint when present; the app rebuilds a model's companion dataset.json the same way).
`builtin_reference` is what every evaluation of the built-in model compares against: the T-shirt
as the forget image (class `data.TSHIRT_LABEL` of the project's classifier), every retain digit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional

import numpy as np
from torch import Tensor

from .classifier import DigitClassifier
from .data import TSHIRT_LABEL, BuiltinDataset, build_digits_tshirt, build_mnist_tshirt, dataset_fingerprint
from .evaluation import REFERENCE_SIZE, Reference
from .images import uint8_to_tensor
from .metrics import ClipScorer
from .paths import BUILTIN_CLASSIFIER, BUILTIN_DATASET, BUILTIN_MODEL


def available() -> bool:
    """Whether the built-in model and its dataset description are present."""
    return (BUILTIN_MODEL / "model_index.json").is_file() and BUILTIN_DATASET.is_file()


def rebuild_dataset(spec: dict) -> BuiltinDataset:
    """Rebuild the training set a dataset.json describes (setting v1 or v2, by its "builder")."""
    if spec.get("builder") == "retrack.data.build_mnist_tshirt":
        return build_mnist_tshirt(seed=spec["seed"], n_tshirt=spec["n_tshirt"])
    return build_digits_tshirt(seed=spec["seed"], n_digits=spec["n_digits"], tshirt_fraction=spec["tshirt_fraction"])


def checked_dataset(spec: dict) -> BuiltinDataset:
    """`rebuild_dataset`, checked against the fingerprint the dataset.json records (when it does):
    ValueError if the rebuilt set is not the one the model was trained on."""
    dataset = rebuild_dataset(spec)
    expected = spec.get("fingerprint")
    if expected and dataset_fingerprint(dataset.images) != expected:
        raise ValueError("the rebuilt built-in training set differs from the one the model was trained on "
                         "(different fonts or package versions?); delete ~/.cache/retrack and retry")
    return dataset


@lru_cache(maxsize=1)
def builtin_dataset() -> BuiltinDataset:
    """The exact training set of the built-in model."""
    if not BUILTIN_DATASET.is_file():
        raise FileNotFoundError(f"{BUILTIN_DATASET} is missing: the built-in model has not been built")
    return checked_dataset(json.loads(BUILTIN_DATASET.read_text()))


def builtin_sets() -> tuple[Tensor, Tensor]:
    """(forget, retain) x0 tensors in [-1, 1]: the distinct T-shirt image(s) and all digits.

    The forget set holds many identical copies; one of each distinct image is the same set for
    sampling rows and neighbours, and far cheaper to search.
    """
    dataset = builtin_dataset()
    forget = np.unique(dataset.forget_images, axis=0)
    return uint8_to_tensor(forget), uint8_to_tensor(dataset.retain_images)


def builtin_reference(device: str = "cpu", scorer: Optional[ClipScorer] = None,
                      reference_size: int = REFERENCE_SIZE) -> Reference:
    """The built-in digits + T-shirt reference: the T-shirt, every retain digit, the built-in CLIP
    (or `scorer`), the project's classifier when shipped, and the digit names for the class score."""
    forget, retain = builtin_sets()
    classifier = (DigitClassifier.load(BUILTIN_CLASSIFIER, device=device)
                  if (BUILTIN_CLASSIFIER / "model.safetensors").is_file() else None)
    scorer = scorer or ClipScorer.load("builtin", device=device)
    return Reference.build(forget, retain, scorer=scorer, classifier=classifier, forget_class=TSHIRT_LABEL,
                           class_names=builtin_dataset().class_names[:TSHIRT_LABEL], reference_size=reference_size)
