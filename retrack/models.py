"""The model a front end works on: where it is, its family, and the images it was trained on.

`open_model` resolves a folder (or a Hub id when online, through `backends.resolve_model_path`),
reads what kind of model it is and finds its training data: the built-in digits + T-shirt set
(rebuilt by `builtin.checked_dataset` from the `dataset.json` beside the model), or a folder the
user names. Nothing here imports gradio.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .backends import load_backend, resolve_model_path
from .builtin import checked_dataset
from .images import expand_paths, load_images, tensor_to_uint8
from .presets import preset_for

# Memorisation scorer for models that ship without their own (needs network or a filled cache the
# first time; the app falls back to the built-in tiny CLIP, with a note, when it cannot load it).
DEFAULT_SCORER = "ViT-B-32:laion2b_s34b_b79k"
MAX_TRAINING_IMAGES = 200_000  # a folder larger than this is refused (memory, time)


@dataclass
class TrainingData:
    """The images a model was trained on, at the model's resolution, as the app knows them."""

    images: np.ndarray  # uint8 (N, H, W, C), C = 1 or 3
    names: list[str]  # one per item: a class name ("t-shirt") or a file name
    origin: str  # for people: "built-in MNIST + T-shirt set (5,050 images)"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ModelInfo:
    """A model the app can unlearn: where it is, its family and format, and its training data."""

    spec: str  # what the user typed: a folder or a Hub id
    path: Path  # the local diffusers folder
    family: str  # "pixel" or "latent"
    image_size: int
    channels: int
    preset: str  # key of presets.PRESETS with this family's published settings
    training_data: Optional[TrainingData]
    scorer: str  # the CLIP model that scores memorisation: a folder, or "name:pretrained-tag"

    @property
    def cache_key(self) -> str:
        """Changes whenever the weights on disk change (for the "before" sample cache)."""
        return weights_stamp(self.path)


def weights_stamp(folder: Path) -> str:
    """A short digest of a model folder's weight files (names, times, sizes): it changes whenever
    the weights on disk change, so cached samples of the model are then drawn again."""
    weights = sorted(folder.rglob("*.safetensors")) or [folder / "model_index.json"]
    stamp = "|".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in weights)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def open_model(spec: str, data_folder: str = "") -> ModelInfo:
    """Resolve a model and its training data; raises ValueError with a readable message.

    The model is loaded once on the CPU to read its format and then dropped: every job loads
    its own fresh copy, so nothing the page holds is ever trained.
    """
    path = resolve_model_path(spec)
    backend = load_backend(path, device="cpu")
    image_size, channels, family, preset = backend.image_size, backend.channels, backend.family, preset_for(backend)
    del backend
    home = companion_folder(path)
    if data_folder.strip():
        data = load_training_folder(data_folder.strip(), image_size, channels)
    elif home is not None and (home / "dataset.json").is_file():
        data = load_builtin_training_data(read_json(home / "dataset.json"))
    else:
        data = None
    if data is not None and data.images.shape[1:] != (image_size, image_size, channels):
        raise ValueError(f"the training data has images of shape {data.images.shape[1:]}, "
                         f"but the model makes {image_size}×{image_size}×{channels}")
    scorer = str(own_scorer(path) or DEFAULT_SCORER)
    return ModelInfo(spec=spec.strip(), path=path, family=family, image_size=image_size, channels=channels,
                     preset=preset, training_data=data, scorer=scorer)


def read_json(path: Path) -> dict:
    """A JSON file the app reads (dataset.json, retrack.json, split.json); ValueError when broken."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def companion_folder(model_path: Path) -> Optional[Path]:
    """The folder holding a model's companions, laid out as assets/builtin is: `dataset.json`
    (how its training set is rebuilt) and `clip/` (the scorer trained on that data), next to
    the model folder. A model unlearned from it leads there through its retrack.json."""
    for folder in (model_path, model_path.parent):
        if (folder / "dataset.json").is_file() or (folder / "clip" / "open_clip_config.json").is_file():
            return folder
    made_by = model_path / "retrack.json"
    if made_by.is_file():
        source = Path(read_json(made_by).get("source_model") or "")
        if source.is_dir() and source.resolve() != model_path.resolve():
            return companion_folder(source.resolve())
    return None


def own_scorer(model_path: Path) -> Optional[Path]:
    """The CLIP scorer trained on a model's data (`clip/` among its companions, as the built-in
    model's is), when it has one."""
    home = companion_folder(model_path)
    folder = None if home is None else home / "clip"
    return folder if folder is not None and (folder / "open_clip_config.json").is_file() else None


def own_classifier(model_path: Path) -> Optional[Path]:
    """The classifier of a model's classes (`classifier/` among its companions, as the built-in
    model's digits + T-shirt classifier is), when it has one."""
    home = companion_folder(model_path)
    folder = None if home is None else home / "classifier"
    return folder if folder is not None and (folder / "model.safetensors").is_file() else None


def oracle_folder(model_path: Path) -> Optional[Path]:
    """The oracle beside a model's companions (`oracle/`: the same network retrained without the
    forget images, as assets/builtin/oracle is), when there is one and it is not the model itself."""
    home = companion_folder(model_path)
    oracle = None if home is None else home / "oracle"
    if oracle is None or not (oracle / "model_index.json").is_file() or oracle.resolve() == model_path.resolve():
        return None
    return oracle


def load_builtin_training_data(spec: dict) -> TrainingData:
    """The built-in training set a dataset.json describes (cached on disk), checked against the
    recorded fingerprint so the gallery shows exactly what the model saw."""
    dataset = checked_dataset(spec)
    names = [dataset.class_names[int(label)] for label in dataset.labels]
    origin = (f"built-in digits + T-shirt set ({len(dataset):,} images, "
              f"{int(dataset.is_forget.sum())} copies of one T-shirt)")
    return TrainingData(images=dataset.images[..., None], names=names, origin=origin)


def load_training_folder(folder: str, image_size: int, channels: int) -> TrainingData:
    """Every image in a folder, converted to the model's format (for the user's own model)."""
    files = expand_paths([Path(folder).expanduser()])
    if len(files) > MAX_TRAINING_IMAGES:
        raise ValueError(f"{folder}: {len(files):,} images is over the app's limit of {MAX_TRAINING_IMAGES:,}")
    loaded = load_images(files, image_size, channels)
    return TrainingData(images=tensor_to_uint8(loaded.tensor), names=[f.name for f in files],
                        origin=f"folder {folder} ({len(files):,} images)")
