"""Pictures of images: captioned grids with red frames on copies, and the evaluation's grids.

`image_grid` draws any images (tensors in [-1, 1] or uint8 NHWC) as a captioned grid, flagged tiles
framed in red; `display_grid` first reduces tiles larger than `DISPLAY_SIDE`, so a grid of
512-pixel samples stays a picture that fits on a page. On top of it: `renoise_grid` (the
noise-and-denoise check of one image), `samples_grid` (an evaluation's samples captioned with seed
and CLIP score, CLIP copies framed) and `nearest_rows_grid` (the samples nearest the forget set,
a row per model, pixel-L2 copies framed). `save_png` writes any of them atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .atomic import write_file_atomically
from .evaluation import Evaluation
from .images import tensor_to_uint8, uint8_to_tensor
from .sampling import Renoised, pixel_l2


def _font(size: int) -> ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:
        return ImageFont.load_default()


def image_grid(
    images: Union[Tensor, np.ndarray],
    ncol: int = 8,
    labels: Optional[Sequence[str]] = None,
    flags: Optional[Sequence[bool]] = None,
    scale: int = 0,
    pad: int = 2,
) -> Image.Image:
    """A grid of images (tensor in [-1, 1] or uint8 NHWC) with optional captions under each tile;
    flagged tiles get a red frame. Small images are upscaled (nearest) to about 96 px."""
    arr = tensor_to_uint8(images) if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    n, h, w, _ = arr.shape
    scale = scale or max(1, 96 // max(h, w))
    th, tw = h * scale, w * scale
    caption = 14 if labels is not None else 0
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    grid = Image.new("RGB", (ncol * (tw + pad) + pad, nrow * (th + caption + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(11)
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), pad + r * (th + caption + pad)
        grid.paste(Image.fromarray(arr[i]).resize((tw, th), Image.Resampling.NEAREST), (x, y))
        if flags is not None and flags[i]:
            draw.rectangle([x, y, x + tw - 1, y + th - 1], outline=(220, 30, 30), width=max(2, scale))
        if labels is not None:
            color = (200, 0, 0) if flags is not None and flags[i] else (40, 40, 40)
            draw.text((x + 2, y + th + 1), str(labels[i]), fill=color, font=font)
    return grid


DISPLAY_SIDE = 128  # tiles of shown pictures: small images are enlarged, larger ones reduced to this


def reduce_to_side(images: Tensor, side: Optional[int]) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] reduced (antialiased) to side × side when larger."""
    if side is None or images.shape[-1] <= side:
        return images
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


def display_grid(images: Union[Tensor, np.ndarray], **grid_options) -> Image.Image:
    """`image_grid` of tensors or uint8 NHWC arrays, with tiles larger than DISPLAY_SIDE reduced
    first, so a grid of 512-pixel samples stays a picture that fits on a page."""
    pixels = uint8_to_tensor(images, channels_last=True) if isinstance(images, np.ndarray) else images
    return image_grid(reduce_to_side(pixels, DISPLAY_SIDE), **grid_options)


def save_png(picture: Image.Image, path: Union[str, Path]) -> Path:
    """Write a picture as a PNG, atomically (a reader never sees half a file)."""
    return write_file_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_grid(images: Union[Tensor, np.ndarray], path: Union[str, Path], **kwargs) -> Path:
    """Write `image_grid(images, **kwargs)` as a PNG (atomically)."""
    return save_png(image_grid(images, **kwargs), path)


def renoise_grid(image: Tensor, rows: Sequence[Sequence[tuple[str, Renoised]]]) -> Image.Image:
    """One row per timestep: the image, its noised version, then each model's denoised result
    captioned with its pixel-L2 distance to the image. `image` is (1, C, H, W) in [-1, 1]; each row
    holds (model name, Renoised of that image) pairs for one t, all from the same noise."""
    tiles, labels = [], []
    for row in rows:
        t = row[0][1].t
        tiles += [image[:1].cpu(), row[0][1].noised[:1]]
        labels += ["image", f"noised t={t}"]
        for name, result in row:
            tiles.append(result.denoised[:1])
            labels.append(f"{name[:9]} L2 {float(pixel_l2(result.denoised[:1], image[:1].cpu())[0]):.1f}")
    return image_grid(torch.cat(tiles), ncol=2 + len(rows[0]), labels=labels)


def samples_grid(evaluation: Evaluation, ncol: int = 8, side: Optional[int] = DISPLAY_SIDE,
                 limit: Optional[int] = None) -> Image.Image:
    """The first `limit` samples of an evaluation (all by default), captioned with seed and CLIP
    score; CLIP copies framed in red. Tiles larger than `side` pixels are reduced first (None: as
    they are)."""
    shown = slice(0, limit)
    labels = [f"{seed}: {score:.2f}" for seed, score in zip(evaluation.samples.seeds[shown], evaluation.clip_similarity[shown])]
    return image_grid(reduce_to_side(evaluation.samples.images[shown], side), ncol=ncol, labels=labels,
                      flags=evaluation.clip_flags[shown].tolist())


NearestRow = tuple[Optional[object], tuple[Tensor, list[str], list[bool]]]


def nearest_rows_grid(rows: Sequence[NearestRow], side: Optional[int] = DISPLAY_SIDE) -> Optional[Image.Image]:
    """The grid to look at before believing a rate: one row per (label, `Evaluation.nearest(k)`),
    the samples nearest the forget set captioned with their distances (the first one "label:
    distance" when a label is given), red where they count as pixel-L2 copies; tiles larger than
    `side` reduced first (None: as they are). None without rows."""
    if not rows:
        return None
    images = torch.cat([images for _, (images, _, _) in rows])
    labels = [f"{label}: {d}" if i == 0 and label is not None else d
              for label, (_, distances, _) in rows for i, d in enumerate(distances)]
    flags = [f for _, (_, _, row_flags) in rows for f in row_flags]
    return image_grid(reduce_to_side(images, side), ncol=max(len(row[1][1]) for row in rows), labels=labels,
                      flags=flags)


def save_nearest_rows(rows: Sequence[NearestRow], path: Path) -> None:
    """`nearest_rows_grid` of `rows` at full size, written as a PNG (nothing without rows)."""
    if rows:
        save_png(nearest_rows_grid(rows, side=None), path)
