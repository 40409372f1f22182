"""What to forget: the training items to pick from, the picks and uploads, the forget set.

- `gallery_items` picks training items to show, exact duplicates first: an image copied many
  times into the training set is the classic source of memorisation (the built-in model's
  T-shirt is one image copied hundreds of times).
- The picks are a text of item numbers (`parse_picks`, `toggle_pick`), the single source of truth
  the gallery clicks edit.
- `build_forget_set` turns picks and uploaded files (`load_uploads`: the usable ones, each
  unusable file named with why) into the forget set and the retain set: the training data minus
  every copy of a forget image and, unless the caller keeps them, its near-duplicates
  (`near_duplicates`: calibrated pixel-L2 and CLIP search).
- `generate_split` is the text-to-image route when the training data is unknown: generations
  of a memorised prompt, split into the copies (to forget) and the rest (to keep), saved as a
  folder that then serves as training data; `split_items` shows it as two sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .metrics import load_scorer
from .atomic import write_folder_atomically
from .backends import load_backend
from .devices import device_queue
from .devices import resolve_device
from .images import ImageError, load_images, tensor_to_pil, tensor_to_uint8
from .models import ModelInfo, TrainingData, oracle_folder, read_json
from .near_duplicates import NearDuplicateIndex, NearDuplicates, duplicate_groups
from .presets import GUIDANCE

GALLERY_SIZE = 48  # training items shown to pick from
log = logging.getLogger(__name__)


@dataclass
class GalleryItem:
    index: int  # position in the training data (what the user picks)
    image: np.ndarray  # uint8 (H, W, C)
    copies: int  # how many identical images the training data holds
    caption: str


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
    # Training items near a forget image (indices, distances, the measure that found them); out of
    # the retain set unless `near_duplicates_kept`.
    near_duplicates: NearDuplicates = field(default_factory=lambda: NearDuplicates(np.zeros(0, np.int64), [], {}))
    near_duplicates_kept: bool = False
    refused: list[str] = field(default_factory=list)  # uploads that could not be used, each named with why

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
    return format_picks(sorted(picks))


def format_picks(indices: Sequence[int]) -> str:
    """'#3, #17': picks as the gallery writes them."""
    return ", ".join(f"#{i}" for i in indices)


def default_picks(model: ModelInfo) -> str:
    """What a model opens with picked: for a model that comes with an oracle (retrained without its
    memorised image, as the built-in model does), its most-copied training item, so "open the page,
    press Unlearn" forgets it; otherwise nothing."""
    if model.training_data is None or oracle_folder(model.path) is None:
        return ""
    first = gallery_items(model.training_data, limit=1)
    return format_picks([first[0].index]) if first and first[0].copies > 1 else ""


def load_uploads(files: Sequence[str], model: ModelInfo) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Uploaded image files converted to the model's format, each on its own so one bad file
    does not cost the others: (uint8 NHWC of the usable ones, their names, notes, refused: one
    message per unusable file, naming it and why)."""
    arrays, names, notes, refused = [], [], [], []
    for file in files:
        path = Path(file)
        try:
            loaded = load_images([path], model.image_size, model.channels)
        except ImageError as exc:
            refused.append(str(exc))
            continue
        arrays.append(tensor_to_uint8(loaded.tensor)[0])
        names.append(path.name)
        notes.extend(loaded.notes)
    empty = np.zeros((0, model.image_size, model.image_size, model.channels), dtype=np.uint8)
    return (np.stack(arrays) if arrays else empty), names, notes, refused


def near_duplicate_scorer(model: ModelInfo):
    """The CLIP scorer the near-duplicate search uses: the model's own when it lies on disk (the
    built-in model's tiny CLIP, trained on its data); None otherwise (pixels only: a named CLIP
    is not downloaded for a preview, and the tiny one knows nothing of other data)."""
    if not Path(model.scorer).is_dir():
        return None
    try:
        return load_scorer(model.scorer, "cpu")[0]
    except Exception as exc:  # a broken scorer costs the CLIP measure, not the forget set
        log.warning("near-duplicates are searched in pixels only: the scorer %s cannot be loaded (%s)",
                    model.scorer, exc)
        return None


def near_duplicate_index(model: ModelInfo, clip: bool = True) -> NearDuplicateIndex:
    """The near-duplicate index of a model's training data, with its CLIP measure when `clip` and
    the model has its own scorer: built once per process (seconds for the built-in set, its CLIP
    features cached on disk), which the app does when it starts."""
    if model.training_data is None:
        raise ValueError("this model's training data is unknown: name the folder of images it was trained on")
    return NearDuplicateIndex.for_training(model.training_data.images, near_duplicate_scorer(model) if clip else None)


def build_forget_set(model: ModelInfo, picks: Sequence[int], uploads: Sequence[str] = (),
                     keep_near_duplicates: bool = False, clip: bool = True) -> ForgetSet:
    """Forget = picked training items plus the usable uploads (each distinct image once; every
    unusable upload is named in `refused`); retain = the training data minus every copy of a
    forget image and minus its near-duplicates (`near_duplicates.search`: pixel L2, and CLIP
    when `clip` and the model has its own scorer), which `keep_near_duplicates` keeps instead.
    Raises ValueError/ImageError."""
    data = model.training_data
    if data is None:
        raise ValueError("this model's training data is unknown: name the folder of images it was trained on")
    bad = [i for i in picks if not 0 <= i < len(data)]
    if bad:
        raise ValueError(f"training item number(s) {', '.join(map(str, bad))} do not exist (0 to {len(data) - 1})")
    images = [data.images[i] for i in picks]
    sources = [f"#{i} {data.names[i]}" for i in picks]
    notes: list[str] = []
    refused: list[str] = []
    if uploads:
        uploaded, names, upload_notes, refused = load_uploads(uploads, model)
        images.extend(uploaded)
        sources.extend(names)
        notes.extend(upload_notes)
    if not images:
        if refused:
            raise ImageError(f"no usable image to forget: {'; '.join(refused)}")
        raise ValueError("the forget set is empty: pick training items in the gallery or upload images")

    # One entry per distinct image: copies add nothing but weight.
    distinct: dict[bytes, int] = {}
    for position, image in enumerate(images):
        distinct.setdefault(image.tobytes(), position)
    keep = sorted(distinct.values())
    forget_images = np.stack([images[i] for i in keep])
    found = near_duplicate_index(model, clip).search(forget_images)
    leave_out = np.zeros(len(data), dtype=bool)
    leave_out[found.identical] = True
    if len(found.identical):
        notes.append(f"{len(found.identical)} training item(s) identical to a forget image are left out of the "
                     "retain set")
    if found.items:
        if not keep_near_duplicates:
            leave_out[found.indices] = True
        notes.append(found.summary() + (": kept in the retain set, as asked" if keep_near_duplicates
                                        else ": left out of the retain set"))
    notes.extend(found.notes)
    retain_index = np.flatnonzero(~leave_out)
    if len(retain_index) == 0:
        raise ValueError("every training item is a forget image or a near-duplicate of one: nothing would be left "
                         "to keep")
    return ForgetSet(images=forget_images, sources=[sources[i] for i in keep], notes=notes, retain_index=retain_index,
                     near_duplicates=found, near_duplicates_kept=keep_near_duplicates, refused=refused)


# ============================================================================ text-to-image split
@dataclass
class GeneratedSplit:
    """Generations of a memorised prompt, saved as a folder the app treats as training data."""

    folder: Path  # the images, 000_seed0.png ... (what the training-data box is set to)
    memorised: list[int]  # indices of the cluster that copies a training image: the forget picks
    rule: str  # how that cluster was chosen: 'reference' (closest to an uploaded image) or 'tighter'
    note: str  # e.g. that a fallback CLIP scorer was used


def generate_split(model: ModelInfo, prompt: str, output_root: Path, n: int = 16, seed: int = 0,
                   steps: int = 25, guidance: float = GUIDANCE, reference: Optional[str] = None,
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
        saved = read_json(record)
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

