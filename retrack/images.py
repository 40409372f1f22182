"""Images in and out of the library, converted in one place.

Images enter as files, PIL images or uint8 arrays and leave as NCHW float32 tensors in [-1, 1]
at the model's resolution and channel count (`load_images`); tensors go back to uint8 HWC arrays
for display, to 8-bit levels for the likelihood, to [0, 1] for CLIP and the classifier, and to
float64 arrays in [0, 1] for the pixel-L2 distance (`unit_pixels`).
Every refusal is an `ImageError` whose message says which input and why.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_FILE_BYTES = 20 * 2**20  # uploads above this are refused before decoding
MAX_PIXELS = 40_000_000  # decompression-bomb guard: larger images are refused, not decoded
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow raises DecompressionBombError at 2x this

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input image that cannot be used, with a message for people."""


@dataclass
class Loaded:
    """Converted images plus notes on what was changed (shown to the user)."""

    tensor: Tensor  # (N, C, H, W) float32 in [-1, 1]
    notes: list[str] = field(default_factory=list)


def _name(item: ImageLike, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name
    return f"image {index + 1}"


def _checked(img: Image.Image, name: str) -> Image.Image:
    """Refuse images with no pixels or more than MAX_PIXELS (whatever form they came in)."""
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: the image has no pixels ({img.width}x{img.height})")
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"{name}: {img.width}x{img.height} pixels is over the {MAX_PIXELS:,}-pixel limit")
    return img


def open_image(item: ImageLike, index: int = 0) -> Image.Image:
    """Open one image fully (decoded now, so a truncated file fails here, not later).

    Files and bytes are checked against MAX_FILE_BYTES before decoding and against MAX_PIXELS
    before their pixels are allocated; whatever goes wrong while decoding untrusted data is an
    ImageError naming the input.
    """
    name = _name(item, index)
    if isinstance(item, Image.Image):
        return _checked(item, name)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
                arr = (arr * 255).round().astype(np.uint8)
            else:
                raise ImageError(f"{name}: arrays must be uint8 (0-255) or float in [0, 1], got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ImageError(f"{name}: array of shape {arr.shape} is not an image (H x W, or H x W x 3/4)")
        if 0 in arr.shape:
            raise ImageError(f"{name}: the image has no pixels (array of shape {arr.shape})")
        return _checked(Image.fromarray(np.ascontiguousarray(arr)), name)
    if isinstance(item, bytes):
        size, source = len(item), io.BytesIO(item)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        size, source = path.stat().st_size, path
    else:
        raise ImageError(f"{name}: a {type(item).__name__} is not an image (give a file, bytes, a PIL image or an array)")
    if size == 0:
        raise ImageError(f"{name}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{name}: {size / 2**20:.1f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            _checked(img, name)  # from the header: nothing is decoded yet
            img.seek(0)  # animated images: the first frame
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: the image is too large to decode safely (a possible decompression bomb; "
                         f"the limit is {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except PermissionError:
        raise ImageError(f"{name}: the file cannot be read (permission denied)") from None
    except Exception as exc:  # untrusted data: whatever the decoder raises means the file is unusable
        raise ImageError(f"{name}: the image is damaged or truncated ({type(exc).__name__}: {exc})") from None
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit grayscale ('L').

    16-bit data is scaled from 0..65535; 32-bit integers from 0..255 when they fit in it, else
    from 0..65535 (how Pillow opens some 16-bit files), else from 0..their maximum; floats from
    0..1 when they fit in it, else from 0..their maximum. Negative values become black.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # damaged data may hold NaN/inf: they become black
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16"):
        scale = 65535.0
    elif img.mode == "F":
        scale = 1.0 if top <= 1.0 else top
    else:
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    return Image.fromarray((arr / scale * 255).clip(0, 255).round().astype(np.uint8))


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale ('L') for 1 channel, 'RGB' for 3; transparency is flattened onto black.

    The EXIF orientation is applied when it can be read (an unreadable one is ignored).
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # damaged EXIF data: keep the pixels as stored
        pass
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _convert(img: Image.Image, size: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """One opened image -> uint8 (size, size) or (size, size, 3), and what was changed."""
    changes = []
    try:  # looks for a second frame; the first one is already decoded
        if getattr(img, "is_animated", False):
            changes.append("first frame of an animation")
    except Exception:
        changes.append("first frame only (the rest of the file is damaged)")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        changes.append(f"{img.mode} -> {'grayscale' if channels == 1 else 'RGB'}")
    img = to_mode(img, channels)
    if img.size != (size, size):
        if img.width != img.height:
            changes.append("centre-cropped to a square")
            img = ImageOps.fit(img, (min(img.size),) * 2)
        changes.append(f"resized {img.width}x{img.height} -> {size}x{size}")
        img = img.resize((size, size), Image.Resampling.LANCZOS if img.width > size else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8), changes


def load_images(items: Sequence[ImageLike], size: int, channels: int) -> Loaded:
    """Open, convert and resize images to an (N, channels, size, size) tensor in [-1, 1].

    Non-square images are centre-cropped to a square first. Raises ImageError naming the first
    unusable input; `Loaded.notes` lists every conversion so the user can see what happened.
    (A folder of them: `list_image_files`, or `models.load_training_folder` for training data.)
    """
    if len(items) == 0:
        raise ImageError("no images given")
    arrays, notes = [], []
    for i, item in enumerate(items):
        img = open_image(item, i)
        name = _name(item, i)
        try:
            arr, changes = _convert(img, size, channels)
        except Exception as exc:  # e.g. a mode Pillow cannot convert, or damage found only now
            raise ImageError(f"{name}: the image cannot be converted ({type(exc).__name__}: {exc})") from None
        if changes:
            notes.append(f"{name}: " + ", ".join(changes))
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return Loaded(uint8_to_tensor(np.stack(arrays)), notes)


def list_image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Image files in a folder (sorted, not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageError(f"{folder}: no image files (.png, .jpg, ...) in it")
    return files


def expand_paths(paths: Iterable[Union[str, os.PathLike]]) -> list[Path]:
    """Files stay files; folders become their image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(list_image_files(p) if p.is_dir() else [p])
    return out


def uint8_to_tensor(arr: np.ndarray, *, channels_last: bool = False,
                    device: Union[str, torch.device, None] = None) -> Tensor:
    """uint8 (N, C, H, W), (N, H, W, C) with `channels_last`, or (N, H, W) -> float32 (N, C, H, W)
    in [-1, 1], on `device` (moved there as uint8, a quarter of the bytes, then converted)."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif channels_last:
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device).float().div(127.5).sub(1.0)


def tensor_to_uint8(x: Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """float (N, C, H, W) in [-1, 1] -> PIL images (grayscale for one channel)."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in tensor_to_uint8(x)]


def unit_pixels(images: Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> float64 (N, C, H, W) in [0, 1], the pixel-L2 scale."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).numpy().astype(np.float64)


def tensor_to_levels(x: Tensor) -> Tensor:
    """float (N, C, H, W) in [-1, 1] -> its 8-bit values 0..255 as int64 (N, C, H, W), computed in
    float64 (the likelihood's dequantisation starts from them)."""
    return ((x.detach().double().clamp(-1, 1) + 1) * 127.5).round().to(torch.int64)


def to_unit_nchw(images) -> Tensor:
    """Any accepted image form -> float32 NCHW in [0, 1] on the CPU (what CLIP and the classifier
    read): PIL images (as RGB), uint8 arrays (HW, NHW, NCHW or NHWC), uint8 tensors, or float
    NCHW tensors/arrays in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            array = images.astype(np.float32) / 255.0
            if array.ndim == 2:
                array = array[None, None]
            elif array.ndim == 3:
                array = array[:, None]
            elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
                array = array.transpose(0, 3, 1, 2)
            return torch.from_numpy(np.ascontiguousarray(array))
        images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unsupported image type {type(images).__name__}")
    if images.dtype == torch.uint8:
        return to_unit_nchw(images.numpy())
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"float images must be NCHW with 1 or 3 channels, got shape {tuple(images.shape)}")
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
