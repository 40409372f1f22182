"""Unlearning jobs for an interactive front end: pick a model and images, run in the background.

The Gradio app (`app.py`) is only the page. Everything it does that is not layout lives here, so
it can be tested without a browser and reused by other front ends; nothing here imports gradio.

- `open_model` resolves a folder (or a Hub id when online), reads what kind of model it is and
  finds the images it was trained on: the built-in digits + T-shirt set, or a folder the user
  names.
- `gallery_items` picks training items to show, exact duplicates first: an image copied many
  times into the training set is the classic source of memorisation (the built-in model's
  T-shirt is one image copied hundreds of times).
- `build_forget_set` turns gallery picks and uploaded files into the forget set and the retain
  set (the training data minus every copy of a forget image).
- `generate_split` is the text-to-image route when the training data is unknown: generations
  of a memorised prompt, split into the copies (to forget) and the rest (to keep).
- `Job` runs one unlearning job in a worker thread. It waits its turn for the device (one
  training job per device at a time), loads a fresh copy of the model (the copy the page shows
  is never trained), samples "before" grids (cached per model and seeds), trains with
  `engine.unlearn`, saves and zips the result, samples "after" with the same seeds, measures
  every sample with `retrack.evaluation` (CLIP memorisation rate, pixel L2, quality) and builds
  the teaching view. Progress comes out as `JobState` snapshots; `Job.cancel()` stops the job
  between steps.
- The teaching views (`teaching_images`, `teaching_models`, `renoise_view`, `likelihood_view`):
  the forget image noised and denoised by the model before and after unlearning (and the
  oracle, when there is one), and its likelihood in bits/dim beside a few retain images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .atomic import write_file_atomically, write_folder_atomically
from .backends import load_backend, resolve_model_path
from .backends.base import Backend
from .evaluation import (
    DISPLAY_SIDE, Evaluation, Reference, SamplerSettings, draw, evaluate_samples, reduce_to_side,
)
from .engine import (
    Cancelled, Diverged, OutOfMemory, StepEvent, UnlearnConfig, check_range, check_request, is_out_of_memory,
    preset_for, resolve_device, save_model, unlearn,
)
from .images import expand_paths, load_images, tensor_to_pil, tensor_to_uint8, uint8_to_tensor
from .likelihood import LikelihoodRow, NLLSettings, model_likelihoods
from .objectives import METHODS, retrack_targets
from .sampling import Samples, image_grid, pixel_l2, renoise, renoise_grid, sample

log = logging.getLogger(__name__)

# The method names the app offers, ReTrack first; the others are the baselines of METHOD.md.
METHOD_LABELS: dict[str, str] = {name: method.label for name, method in METHODS.items()}  # the method menu

# Memorisation scorer for models that ship without their own (needs network or a filled cache the
# first time; the app falls back to the built-in tiny CLIP, with a note, when it cannot load it).
DEFAULT_SCORER = "ViT-B-32:laion2b_s34b_b79k"
GALLERY_SIZE = 48  # training items shown to pick from
MAX_TRAINING_IMAGES = 200_000  # a folder larger than this is refused (memory, time)


def describe_device(device: str = "auto") -> str:
    """'NVIDIA H100 80GB HBM3 (cuda:0)' or 'CPU (2 threads)': what the page shows."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(index)} ({device})"
    return f"CPU ({torch.get_num_threads()} threads)"


# ============================================================================ the model
@dataclass
class TrainingData:
    """The images a model was trained on, at the model's resolution, as the app knows them."""

    images: np.ndarray  # uint8 (N, H, W, C), C = 1 or 3
    names: list[str]  # one per item: a class name ("t-shirt") or a file name
    origin: str  # for people: "built-in digits + T-shirt set (20,408 images)"

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
    preset: str  # key of engine.PRESETS with this family's published settings
    training_data: Optional[TrainingData]
    scorer: str  # the CLIP model that scores memorisation: a folder, or "name:pretrained-tag"

    @property
    def cache_key(self) -> str:
        """Changes whenever the weights on disk change (for the "before" sample cache)."""
        weights = sorted(self.path.rglob("*.safetensors")) or [self.path / "model_index.json"]
        stamp = "|".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in weights)
        return hashlib.sha256(stamp.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """A few lines of Markdown for the page."""
        colour = "grayscale" if self.channels == 1 else "RGB"
        lines = [f"**{self.path.name}**: {self.family} diffusion model, {self.image_size}×{self.image_size} {colour}, "
                 f"published settings of the *{self.preset}* family."]
        if self.training_data is not None:
            lines.append(f"Training data: {self.training_data.origin}.")
        elif self.family == "latent":
            lines.append("Training data unknown: name a folder of images to keep (the retain set), including the "
                         "ones to forget, and type the memorised prompt below.")
        else:
            lines.append("Training data unknown: name the folder of images it was trained on (the retain set).")
        return "  \n".join(lines)


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
        data = load_builtin_training_data(_read_json(home / "dataset.json"))
    else:
        data = None
    if data is not None and data.images.shape[1:] != (image_size, image_size, channels):
        raise ValueError(f"the training data has images of shape {data.images.shape[1:]}, "
                         f"but the model makes {image_size}×{image_size}×{channels}")
    own_scorer = None if home is None else home / "clip"
    scorer = str(own_scorer) if own_scorer is not None and (own_scorer / "open_clip_config.json").is_file() \
        else DEFAULT_SCORER
    return ModelInfo(spec=spec.strip(), path=path, family=family, image_size=image_size, channels=channels,
                     preset=preset, training_data=data, scorer=scorer)


def _read_json(path: Path) -> dict:
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
        source = Path(_read_json(made_by).get("source_model") or "")
        if source.is_dir() and source.resolve() != model_path.resolve():
            return companion_folder(source.resolve())
    return None


def load_builtin_training_data(spec: dict) -> TrainingData:
    """Rebuild the built-in digits + T-shirt training set from its description (cached on disk),
    checked against the recorded fingerprint so the gallery shows exactly what the model saw."""
    from .data import build_digits_tshirt, dataset_fingerprint

    dataset = build_digits_tshirt(seed=int(spec["seed"]), n_digits=int(spec["n_digits"]),
                                  tshirt_fraction=float(spec["tshirt_fraction"]))
    expected = spec.get("fingerprint")
    if expected and dataset_fingerprint(dataset.images) != expected:
        raise ValueError("the rebuilt built-in training set differs from the one the model was trained on "
                         "(different fonts or package versions?); delete ~/.cache/retrack and retry")
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


@dataclass
class GalleryItem:
    index: int  # position in the training data (what the user picks)
    image: np.ndarray  # uint8 (H, W, C)
    copies: int  # how many identical images the training data holds
    caption: str


def duplicate_groups(images: np.ndarray) -> dict[bytes, list[int]]:
    """Identical images grouped by their bytes, in order of first appearance."""
    groups: dict[bytes, list[int]] = {}
    for index in range(len(images)):
        groups.setdefault(images[index].tobytes(), []).append(index)
    return groups


def gallery_items(data: TrainingData, limit: int = GALLERY_SIZE, seed: int = 0) -> list[GalleryItem]:
    """Training items to pick from: every image that occurs more than once (most copies first),
    then a seeded random choice of the others."""
    groups = list(duplicate_groups(data.images).values())
    repeated = sorted((g for g in groups if len(g) > 1), key=len, reverse=True)
    single = [g[0] for g in groups if len(g) == 1]
    rng = np.random.default_rng(seed)
    room = max(0, limit - len(repeated))
    chosen_single = sorted(rng.choice(single, size=min(room, len(single)), replace=False).tolist()) if single else []
    items = []
    for group in repeated[:limit]:
        first = group[0]
        items.append(GalleryItem(first, data.images[first], len(group),
                                 f"#{first} {data.names[first]} ×{len(group)} copies"))
    items += [single_item(data, index) for index in chosen_single]
    return items


def single_item(data: TrainingData, index: int) -> GalleryItem:
    """Gallery tile of one training item, captioned with its number and name."""
    return GalleryItem(index, data.images[index], 1, f"#{index} {data.names[index]}")


def split_items(data: TrainingData, picks: Sequence[int],
                limit: int = GALLERY_SIZE) -> tuple[list[GalleryItem], list[GalleryItem]]:
    """The training data in two sides, as a generate-and-split shows it: the picked items (to
    forget) and the others (kept), each side its first `limit` items."""
    chosen = set(picks)
    sides: tuple[list[GalleryItem], list[GalleryItem]] = ([], [])
    for index in range(len(data)):
        side = sides[0] if index in chosen else sides[1]
        if len(side) < limit:
            side.append(single_item(data, index))
    return sides


# ============================================================================ forget set
@dataclass
class ForgetSet:
    """Distinct images to forget, and which training items stay as the retain set."""

    images: np.ndarray  # uint8 (N_u, H, W, C)
    sources: list[str]  # one per forget image: "#17 t-shirt" or an uploaded file's name
    notes: list[str]  # conversions applied to uploads, copies removed from the retain set
    retain_index: np.ndarray  # indices into the training data kept as the retain set

    def __len__(self) -> int:
        return len(self.images)


def parse_picks(text: str) -> list[int]:
    """Training item numbers from text like '#17, 203 4051' (what the gallery writes)."""
    numbers = re.findall(r"\d+", text or "")
    return sorted({int(n) for n in numbers})


def toggle_pick(text: str, index: int) -> str:
    """Add `index` to the picked items, or remove it if it was there."""
    picks = set(parse_picks(text))
    picks.symmetric_difference_update({index})
    return ", ".join(f"#{i}" for i in sorted(picks))


def load_uploads(files: Sequence[str], model: ModelInfo) -> tuple[np.ndarray, list[str], list[str]]:
    """Uploaded image files converted to the model's format: (uint8 NHWC, names, notes)."""
    paths_ = [Path(f) for f in files]
    loaded = load_images(paths_, model.image_size, model.channels)
    return tensor_to_uint8(loaded.tensor), [p.name for p in paths_], loaded.notes


def build_forget_set(model: ModelInfo, picks: Sequence[int], uploads: Sequence[str] = ()) -> ForgetSet:
    """Forget = picked training items plus uploads (each distinct image once); retain = the
    training data minus every copy of a forget image. Raises ValueError/ImageError."""
    data = model.training_data
    if data is None:
        raise ValueError("this model's training data is unknown: name the folder of images it was trained on")
    bad = [i for i in picks if not 0 <= i < len(data)]
    if bad:
        raise ValueError(f"training item number(s) {', '.join(map(str, bad))} do not exist (0 to {len(data) - 1})")
    images = [data.images[i] for i in picks]
    sources = [f"#{i} {data.names[i]}" for i in picks]
    notes: list[str] = []
    if uploads:
        uploaded, names, upload_notes = load_uploads(uploads, model)
        images.extend(uploaded)
        sources.extend(names)
        notes.extend(upload_notes)
    if not images:
        raise ValueError("the forget set is empty: pick training items in the gallery or upload images")

    # One entry per distinct image: copies add nothing but weight.
    distinct: dict[bytes, int] = {}
    for position, image in enumerate(images):
        distinct.setdefault(image.tobytes(), position)
    keep = sorted(distinct.values())
    forget_bytes = set(distinct)
    in_forget = np.fromiter((data.images[i].tobytes() in forget_bytes for i in range(len(data))), bool, len(data))
    retain_index = np.flatnonzero(~in_forget)
    if in_forget.any():
        notes.append(f"{int(in_forget.sum())} training item(s) identical to a forget image are left out of the retain set")
    if len(retain_index) == 0:
        raise ValueError("every training item is a forget image: nothing would be left to keep")
    return ForgetSet(images=np.stack([images[i] for i in keep]), sources=[sources[i] for i in keep],
                     notes=notes, retain_index=retain_index)


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return uint8_to_tensor(images, channels_last=True)


def display_grid(images: Tensor | np.ndarray, **grid_options) -> Image.Image:
    """`sampling.image_grid` with tiles larger than DISPLAY_SIDE reduced first, so a grid of
    512-pixel samples stays a picture that fits on a page."""
    return image_grid(reduce_to_side(to_tensor(images) if isinstance(images, np.ndarray) else images, DISPLAY_SIDE),
                      **grid_options)


# ============================================================================ text-to-image split
@dataclass
class GeneratedSplit:
    """Generations of a memorised prompt, saved as a folder the app treats as training data."""

    folder: Path  # the images, 000_seed0.png ... (what the training-data box is set to)
    memorised: list[int]  # indices of the cluster that copies a training image: the forget picks
    rule: str  # how that cluster was chosen: 'reference' (closest to an uploaded image) or 'tighter'
    note: str  # e.g. that a fallback CLIP scorer was used


def generate_split(model: ModelInfo, prompt: str, output_root: Path, n: int = 16, seed: int = 0,
                   steps: int = 25, guidance: float = 7.5, reference: Optional[str] = None,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> GeneratedSplit:
    """The paper's protocol for a text-to-image model whose training data is unknown: generate n
    images of the prompt with fixed seeds, split them with 2-means on CLIP features into the
    memorised cluster (closest to `reference`, an image file known to be memorised, or else the
    tighter one) and the rest. All n images become a folder of "training data": the memorised
    ones are the forget set, the others the retain set, and the user may move any of them.

    Uses the device like a job, so it waits its turn in the device queue. The same request is
    answered from the folder it wrote before.
    """
    from .split import generate_and_split

    if model.family != "latent":
        raise ValueError("generating and splitting is for text-to-image models; pick training items instead")
    if not prompt.strip():
        raise ValueError("type the prompt whose generations copy a training image")
    key = json.dumps([model.cache_key, prompt.strip(), n, seed, steps, guidance, reference and Path(reference).name])
    folder = Path(output_root).absolute() / "generations" / hashlib.sha256(key.encode()).hexdigest()[:16]
    record = folder / "split.json"
    if record.is_file():
        saved = _read_json(record)
        return GeneratedSplit(folder / "images", saved["memorised"], saved["rule"], saved.get("note", ""))

    reference_image = None
    if reference:
        reference_image = load_images([reference], model.image_size, model.channels).tensor
    device = resolve_device("auto")
    owner, never = object(), threading.Event()
    queue = device_queue(device)
    queue.acquire(owner, never)
    try:
        backend = load_backend(model.path, device=device)
        scorer, note = load_scorer(model.scorer, device)
        split = generate_and_split(backend, prompt.strip(), scorer, reference_image, n=n, seed=seed, steps=steps,
                                   guidance=guidance, on_batch=on_batch)
    finally:
        queue.release(owner)
    def write(tmp: Path) -> None:
        (tmp / "images").mkdir(parents=True)
        for index, (picture, image_seed) in enumerate(zip(tensor_to_pil(split.images), split.seeds)):
            picture.save(tmp / "images" / f"{index:03d}_seed{image_seed}.png")
        (tmp / "split.json").write_text(json.dumps({"prompt": prompt.strip(), "seeds": split.seeds,
                                                     "memorised": split.memorised, "rule": split.rule, "note": note}))

    write_folder_atomically(folder, write, if_exists="keep")  # kept: written meanwhile by an identical request
    return GeneratedSplit(folder / "images", split.memorised, split.rule, note)


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


# ============================================================================ the device queue
class DeviceQueue:
    """First come, first served use of one device: one job at a time, the others wait in line.

    The app's page stays responsive because waiting happens in each job's own worker thread; a
    waiting job can be cancelled and leaves the line at once.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: deque[object] = deque()
        self._holder: Optional[object] = None

    def acquire(self, owner: object, cancel: threading.Event, on_wait: Callable[[int], None] = lambda ahead: None) -> bool:
        """Block until `owner` holds the device (True) or `cancel` is set (False).
        `on_wait(jobs_ahead)` is called whenever the position in the line changes."""
        with self._changed:
            self._line.append(owner)
            last_reported = -1
            try:
                while True:
                    if cancel.is_set():
                        return False
                    if self._holder is None and self._line[0] is owner:
                        self._line.popleft()
                        self._holder = owner
                        return True
                    ahead = list(self._line).index(owner) + (self._holder is not None)
                    if ahead != last_reported:
                        on_wait(ahead)
                        last_reported = ahead
                    self._changed.wait(timeout=0.2)  # wake up regularly to see `cancel`
            finally:
                if self._holder is not owner and owner in self._line:
                    self._line.remove(owner)
                    self._changed.notify_all()

    def release(self, owner: object) -> None:
        with self._changed:
            if self._holder is owner:
                self._holder = None
                self._changed.notify_all()

    @property
    def busy(self) -> bool:
        return self._holder is not None


_DEVICE_QUEUES: dict[str, DeviceQueue] = {}
_DEVICE_QUEUES_LOCK = threading.Lock()


def device_queue(device: str) -> DeviceQueue:
    """The one queue of a device ("cpu", "cuda:0", ...), shared by every job in this process."""
    key = "cuda:0" if device == "cuda" else device
    with _DEVICE_QUEUES_LOCK:
        return _DEVICE_QUEUES.setdefault(key, DeviceQueue())


# ============================================================================ helpers of a job
class _SampleCache:
    """"Before" samples per (model weights, device, seeds, steps): the model does not change
    between jobs, so its samples need not be drawn again. Small LRU; thread-safe."""

    def __init__(self, capacity: int = 8) -> None:
        self._items: OrderedDict[tuple, Samples] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, key: tuple) -> Optional[Samples]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, samples: Samples) -> None:
        with self._lock:
            self._items[key] = samples
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


BEFORE_SAMPLES = _SampleCache()


@torch.no_grad()
def neighbour_weights(forget_x0: Tensor, neighbours_x0: Tensor, backend: Backend, draws: int = 256, seed: int = 0) -> Tensor:
    """How much of ReTrack's unlearning target goes to each neighbour: the posterior weights
    pi_k = softmax_k(-|v_k|^2 / 2) averaged over the training draws of (t, eps) around each
    forget item. Shapes: forget (N_u, *x0), neighbours (N_u, K, *x0) -> (N_u, K)."""
    schedule = backend.schedule
    generator = torch.Generator().manual_seed(seed)
    k, entries = neighbours_x0.shape[1], neighbours_x0[0, 0].numel()
    chunk = max(1, min(draws, (64 * 2**20) // (4 * k * entries)))  # keep each chunk near 64 MB
    weights = []
    for item, nbrs in zip(forget_x0, neighbours_x0):
        total = torch.zeros(k, dtype=torch.float64)
        for start in range(0, draws, chunk):
            n = min(chunk, draws - start)
            t = schedule.sample_t(n, generator)
            eps = torch.randn((n, *item.shape), generator=generator)
            gamma, sigma = schedule.gamma_sigma(t, eps)
            x_t = gamma * item + sigma * eps
            _, pi = retrack_targets(x_t, nbrs.expand(n, *nbrs.shape), gamma, sigma)
            total += pi.double().sum(0)
        weights.append(total / draws)
    return torch.stack(weights).float()


def trajectory_strip(backend: Backend, seed: int, settings: EvalSettings, cond: Optional[Tensor]) -> Samples:
    """One sample's denoising path: predicted clean image at evenly spaced timesteps."""
    return sample(backend, 1, seed=seed, steps=settings.sampling_steps, trajectory_points=settings.trajectory_points,
                  cond=cond, guidance=settings.guidance)


def trajectory_image(before: Samples, after: Samples, before_flagged: bool, after_flagged: bool) -> Image.Image:
    """Two rows, before over after: the predicted clean image from pure noise (left) to the
    final sample at t = 0 (right); a final sample that reproduces a forget image is framed red."""
    timesteps = list(before.trajectory)  # highest t first, as recorded
    tiles = [before.trajectory[t] for t in timesteps] + [after.trajectory[t] for t in timesteps]
    labels = [f"{row} t={t}" for row in ("before", "after") for t in timesteps]
    flags = [False] * (len(timesteps) - 1) + [before_flagged] + [False] * (len(timesteps) - 1) + [after_flagged]
    return display_grid(torch.cat(tiles), ncol=len(timesteps), labels=labels, flags=flags)


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` (as one top-level folder inside the archive), written atomically."""
    # make_archive appends ".zip" to the name it is given: the temporary file's own name, less ".zip".
    return write_file_atomically(archive, lambda tmp: shutil.make_archive(
        str(tmp.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name))


# ============================================================================ the job
FINISHED_PHASES = ("done", "cancelled", "failed")


@dataclass
class JobState:
    """A snapshot of a job, as the page shows it. `revision` grows with every change."""

    phase: str = "queued"  # queued, loading, before, training, saving, after, done, cancelled, failed
    message: str = "Waiting to start"
    progress: float = 0.0  # 0..1 over the whole job
    losses: list[StepEvent] = field(default_factory=list)
    before: Optional[Evaluation] = None
    after: Optional[Evaluation] = None
    neighbours: Optional[Image.Image] = None  # each forget image, then its K nearest retain images
    trajectory: Optional[Image.Image] = None
    teaching_note: str = ""
    scorer_note: str = ""  # set when a fallback scorer is used
    model_dir: Optional[Path] = None
    archive: Optional[Path] = None
    error: Optional[str] = None
    revision: int = 0

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


# Where each phase starts and ends on the progress bar: training dominates on every device.
_PHASE_SPAN = {"loading": (0.0, 0.02), "before": (0.02, 0.10), "training": (0.10, 0.85), "saving": (0.85, 0.90),
               "after": (0.90, 1.0)}


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


class Job:
    """One unlearning job, run in a worker thread:

        job = Job(model, forget, UnlearnConfig.preset("mnist"), EvalSettings(), Path("outputs/app")).start()
        for state in job.watch():
            print(state.progress, state.message)

    Settings are checked when the job is made (ValueError), so a bad request never queues.
    Text-to-image models sample with `evaluation.prompt` and fine-tune on `training_prompt`
    (the same prompt by default, or a modified one, as in the paper's Stable Diffusion runs).
    """

    def __init__(self, model: ModelInfo, forget: ForgetSet, config: UnlearnConfig, evaluation: EvalSettings,
                 output_root: Path, training_prompt: str = ""):
        check_request(config, len(forget), len(forget.retain_index))  # the library's one check, before the job queues
        evaluation.validate()
        if model.training_data is None:
            raise ValueError("this model's training data is unknown: name the folder of images it was trained on")
        if model.family == "latent" and not evaluation.prompt.strip():
            raise ValueError("type the prompt whose memorised images should be forgotten")
        self.model, self.forget, self.config, self.evaluation = model, forget, config, evaluation
        self.training_prompt = (training_prompt or evaluation.prompt).strip()
        self.device = resolve_device(config.device)
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{uuid.uuid4().hex[:6]}"
        self.output_dir = Path(output_root).absolute() / self.id
        self._state = JobState()
        self._changed = threading.Condition()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retrack-job-{self.id}", daemon=True)

    # --- control ------------------------------------------------------------------------
    def start(self) -> "Job":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop; it does so before its next training step or sampling batch."""
        self._cancel.set()
        with self._changed:
            if not self._state.finished:
                self._set(message="Cancelling...")

    def snapshot(self) -> JobState:
        with self._changed:
            return replace(self._state, losses=list(self._state.losses))

    def watch(self, timeout: Optional[float] = None) -> Iterator[JobState]:
        """Yield a snapshot after every change until the job finishes (the last one is final)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1
        while True:
            with self._changed:
                while self._state.revision == seen:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"job {self.id} did not finish in {timeout} s")
                    self._changed.wait(timeout=left)
                seen = self._state.revision
                state = self.snapshot()
            yield state
            if state.finished:
                return

    def wait(self, timeout: Optional[float] = None) -> JobState:
        """Block until the job finishes; return its final state."""
        state = self.snapshot()
        for state in self.watch(timeout):
            pass
        return state

    # --- the worker ---------------------------------------------------------------------
    def _set(self, **changes) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(self._state, name, value)
            self._state.revision += 1
            self._changed.notify_all()

    def _phase(self, phase: str, message: str) -> None:
        self._check_cancel()
        self._set(phase=phase, message=message, progress=_PHASE_SPAN[phase][0])

    def _check_cancel(self, *_: object) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")

    def _run(self) -> None:
        queue = device_queue(self.device)
        waiting = lambda ahead: self._set(message=f"Waiting for the device ({self.device}): {ahead} job(s) ahead")  # noqa: E731
        if not queue.acquire(self, self._cancel, waiting):
            self._set(phase="cancelled", message="Cancelled before it started; nothing was changed")
            return
        try:
            self._work()
        except Cancelled:
            if self._state.model_dir is not None:  # cancelled while sampling "after"
                message = f"Cancelled after training: the unlearned model is saved in {self._state.model_dir}"
            else:
                message = (f"Cancelled after {len(self._state.losses)} of {self.config.steps} training steps; "
                           "nothing was saved")
            self._set(phase="cancelled", message=message)
        except (ValueError, Diverged, OutOfMemory, FileExistsError) as exc:  # ImageError is a ValueError
            self._set(phase="failed", error=str(exc), message=f"Stopped: {exc}")
        except Exception as exc:  # the page shows a message, the log keeps the traceback
            if is_out_of_memory(exc):  # e.g. while sampling, outside the engine's own check
                message = "Stopped: the device ran out of memory; try fewer samples or a smaller batch"
            else:
                log.exception("job %s failed", self.id)
                message = f"Unexpected error ({type(exc).__name__}: {exc}); details are in the server log"
            self._set(phase="failed", error=f"{type(exc).__name__}: {exc}", message=message)
        finally:
            queue.release(self)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def _work(self) -> None:
        settings, config, data = self.evaluation, self.config, self.model.training_data
        self._phase("loading", f"Loading a fresh copy of {self.model.path.name} on {describe_device(self.device)}")
        backend = load_backend(self.model.path, device=self.device)
        reference = reference_for(self.model, self.forget, device=self.device)
        self._set(scorer_note=reference.note)
        # Text-to-image models: the prompt to sample with, and the (maybe modified) one to train on.
        cond = training_cond = None
        if backend.family == "latent":
            cond = backend.encode_prompt([settings.prompt.strip()])
            training_cond = backend.encode_prompt([self.training_prompt])

        self._phase("before", f"Sampling {settings.n_samples} images before unlearning")
        sampling_started = time.perf_counter()
        before = self._evaluate(backend, reference, cached=True)
        teaching_seed, teaching_flagged = before.teaching_seed()
        before_path = trajectory_strip(backend, teaching_seed, settings, cond)
        sampling_seconds = time.perf_counter() - sampling_started
        self._set(before=before, progress=_PHASE_SPAN["before"][1])

        self._phase("training", f"Training: {METHODS[config.method].title}, {config.steps} steps")
        forget_x0 = backend.encode(to_tensor(self.forget.images))
        retain_x0 = backend.encode(to_tensor(data.images[self.forget.retain_index]))

        def on_step(event: StepEvent) -> None:
            with self._changed:
                self._state.losses.append(event)
                per_step = sum(e.step_seconds for e in self._state.losses) / len(self._state.losses)
            # ETA: the remaining steps at the mean pace so far, plus sampling "after" as long as "before".
            left = (event.steps - event.step) * per_step + sampling_seconds
            start, end = _PHASE_SPAN["training"]
            self._set(progress=start + (end - start) * event.step / event.steps,
                      message=f"Training step {event.step}/{event.steps} · loss {event.loss:.4g} "
                              f"(unlearn {event.unlearn:.4g}, retain {event.retain:.4g}) · "
                              f"{event.step_seconds:.2f} s/step · about {_seconds(left)} left")

        result = unlearn(backend, forget_x0, retain_x0, config, forget_cond=training_cond, retain_cond=training_cond,
                         on_step=on_step, cancel=self._cancel)
        if result.neighbours is not None:
            self._set(neighbours=self._neighbour_grid(backend, forget_x0, retain_x0, result))

        self._phase("saving", "Saving and zipping the unlearned model")
        name = f"{self.model.path.name}-{config.method}"
        metadata = result.metadata(app_job=self.id, forget_sources=self.forget.sources,
                                   training_prompt=self.training_prompt or None,
                                   evaluation=vars(settings) | {"before_memorisation_rate": before.rate})
        model_dir = save_model(backend, self.output_dir / name, metadata)
        archive = zip_folder(model_dir, self.output_dir / f"{name}.zip")
        self._set(model_dir=model_dir, archive=archive, progress=_PHASE_SPAN["saving"][1])

        self._phase("after", f"Sampling the same {settings.n_samples} seeds after unlearning")
        after = self._evaluate(backend, reference, cached=False)
        after_path = trajectory_strip(backend, teaching_seed, settings, cond)
        after_flagged = bool(after.flags[after.samples.seeds.index(teaching_seed)])
        note = (f"Seed {teaching_seed}: its sample {'reproduced' if teaching_flagged else 'came closest to'} a "
                f"forget image before unlearning (score {before.scores.max():.2f}, threshold {before.threshold:.2f})")
        if not teaching_flagged:
            note += "; no sample was above the threshold, so this is the nearest one"
        quality = "" if after.quality is None or before.quality is None else \
            f" · quality (CLIP Fréchet distance to the retain set) {before.quality:.3g} → {after.quality:.3g}"
        self._set(after=after, trajectory=trajectory_image(before_path, after_path, teaching_flagged, after_flagged),
                  teaching_note=note + ".", phase="done", progress=1.0,
                  message=f"Done in {_seconds(result.seconds)}: memorisation rate {before.rate:.0%} → {after.rate:.0%}"
                          f"{quality} · saved to {model_dir}")

    def _evaluate(self, backend: Backend, reference: Reference, cached: bool) -> Evaluation:
        settings = self.evaluation.sampler_settings()
        key = (self.model.cache_key, self.device, settings)
        samples = BEFORE_SAMPLES.get(key) if cached else None
        if samples is None:
            samples = draw(backend, settings, on_batch=self._check_cancel)
            if cached:
                BEFORE_SAMPLES.put(key, samples)
        self._check_cancel()
        return evaluate_samples(samples, reference)

    def _neighbour_grid(self, backend: Backend, forget_x0: Tensor, retain_x0: Tensor, result) -> Image.Image:
        """One row per forget image: the image, then its K nearest retain images captioned with
        their ReTrack weight (w) and distance (d), nearest first."""
        shown = min(len(forget_x0), 4)  # enough to see where trajectories go
        indices = result.neighbours[:shown]
        weights = neighbour_weights(forget_x0[:shown], retain_x0[indices], backend, seed=self.config.seed)
        distances = result.neighbour_distances
        data = self.model.training_data
        tiles, labels = [], []
        for row in range(shown):
            tiles.append(self.forget.images[row])
            labels.append(f"forget {self.forget.sources[row].split()[0]}"[:16])
            for col, retain_row in enumerate(indices[row].tolist()):
                tiles.append(data.images[int(self.forget.retain_index[retain_row])])
                distance = "" if distances is None else f" d{float(distances[row, col]):.1f}"
                labels.append(f"w{float(weights[row, col]):.2f}{distance}")
        return display_grid(np.stack(tiles), ncol=indices.shape[1] + 1, labels=labels,
                          flags=[i % (indices.shape[1] + 1) == 0 for i in range(len(tiles))])


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
            _REFERENCES[key] = Reference.build(to_tensor(forget.images), to_tensor(model.training_data.images[retain]),
                                               scorer=scorer, note=note)
            while len(_REFERENCES) > 8:
                _REFERENCES.popitem(last=False)
        return _REFERENCES[key]


# ============================================================================ teaching: noise and denoise, likelihood
TEACHING_RETAIN_IMAGES = 2  # retain images beside the forget image in the likelihood table
RENOISE_STEPS = 50  # DDIM grid of the noise-and-denoise view: t moves in steps of T / 50 (20 for T = 1000)


@dataclass
class TeachingImages:
    """What the teaching views look at: the forget image first, then a few retain images."""

    images: np.ndarray  # uint8 (N, H, W, C)
    names: list[str]
    roles: list[str]  # "forget" or "retain"


def teaching_images(model: ModelInfo, picks: Sequence[int], uploads: Sequence[str] = (),
                    n_retain: int = TEACHING_RETAIN_IMAGES, seed: int = 0) -> TeachingImages:
    """The first image of the forget set (picks and uploads; when none, the training item copied
    most often: the built-in T-shirt) and `n_retain` retain images drawn with `seed`."""
    if not picks and not uploads:
        if model.training_data is None:
            raise ValueError("pick or upload an image to forget first (section 2)")
        picks = [gallery_items(model.training_data, limit=1)[0].index]
    forget = build_forget_set(model, picks, uploads)
    data = model.training_data
    chosen = np.sort(np.random.default_rng(seed).choice(forget.retain_index, min(n_retain, len(forget.retain_index)),
                                                         replace=False))
    return TeachingImages(images=np.concatenate([forget.images[:1], data.images[chosen]]),
                          names=[forget.sources[0]] + [f"#{i} {data.names[i]}" for i in chosen],
                          roles=["forget"] + ["retain"] * len(chosen))


def teaching_models(model: ModelInfo, after: str) -> list[tuple[str, Path]]:
    """The models the teaching views compare: before (the model), after (an unlearned model folder,
    when given) and the oracle retrained without the forget image, when one lies beside the model's
    companions (the built-in model's assets/builtin/oracle). Pixel models only."""
    if model.family != "pixel":
        raise ValueError("noise-and-denoise and the likelihood are shown for pixel models")
    models = [("before", model.path)]
    if after.strip():
        folder = Path(after.strip()).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{after.strip()}: not a model folder (no model_index.json); run an unlearning job first "
                             "or type the folder of an unlearned model")
        models.append(("after", folder))
    home = companion_folder(model.path)
    oracle = None if home is None else home / "oracle"
    if oracle is not None and (oracle / "model_index.json").is_file() and oracle.resolve() != model.path.resolve():
        models.append(("oracle", oracle))
    return models


def renoise_view(models: Sequence[tuple[str, Path]], image: np.ndarray, t: int, seed: int = 0,
                 device: str = "auto") -> tuple[Image.Image, str]:
    """The forget image (uint8 HWC) noised to t and denoised by each model from the same noise:
    the picture (image, noised, one result per model) and a sentence with the distances."""
    device = resolve_device(device)
    x0 = to_tensor(image[None])
    row = [(name, renoise(load_backend(path, device=device), x0, t, seed=seed, steps=RENOISE_STEPS))
           for name, path in models]
    distances = ", ".join(f"{name} {float(pixel_l2(result.denoised, x0)[0]):.1f}" for name, result in row)
    note = (f"Noised to t = {row[0][1].t} with seed {seed}, then denoised by deterministic DDIM. Pixel-L2 distance "
            f"of each result to the image (pixels in [0, 1]; near 0: the model brings the image back): {distances}.")
    return renoise_grid(x0, [row]), note


def likelihood_view(models: Sequence[tuple[str, Path]], images: TeachingImages, settings: NLLSettings,
                    device: str = "auto") -> Iterator[list[LikelihoodRow]]:
    """Bits/dim of each teaching image under each model; yields the rows so far after each model."""
    device = resolve_device(device)
    rows: list[LikelihoodRow] = []
    pixels = to_tensor(images.images)
    for name, path in models:
        results = model_likelihoods(load_backend(path, device=device), pixels, settings)
        rows += [LikelihoodRow(name, image, role, result)
                 for image, role, result in zip(images.names, images.roles, results)]
        yield list(rows)
