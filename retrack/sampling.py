"""Seeded sampling, denoising trajectories and image grids.

Sample i always starts from the noise of `torch.Generator().manual_seed(seed + i)`, whatever the
batch size or device, so "before" and "after" grids of an unlearning run use the same noise and
can be compared tile by tile. DDIM with eta = 0 is deterministic given that noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .backends.base import Backend
from .images import tensor_to_uint8


@dataclass
class Samples:
    images: Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    seeds: list[int]
    # predicted clean image at chosen timesteps: {timestep: (N, C, H, W) in [-1, 1]}
    trajectory: dict[int, Tensor] = field(default_factory=dict)


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One noise tensor per seed, drawn on the CPU so every device sees the same numbers."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(
    backend: Backend,
    n: int,
    seed: int = 0,
    steps: int = 50,
    scheduler: str = "ddim",
    cond: Optional[Tensor] = None,
    guidance: float = 1.0,
    batch_size: int = 64,
    trajectory_points: int = 0,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> Samples:
    """Draw n samples with seeds seed, seed+1, ...; optionally record predicted x0 at
    `trajectory_points` evenly spaced timesteps (for the teaching view)."""
    if n < 1 or steps < 1:
        raise ValueError("need at least one sample and one step")
    if scheduler == "ddim":
        sched = DDIMScheduler.from_config(backend.scheduler.config)
    elif scheduler == "ddpm":
        sched = DDPMScheduler.from_config(backend.scheduler.config)
    else:
        raise ValueError(f"unknown sampler {scheduler!r}; use 'ddim' or 'ddpm'")
    sched.set_timesteps(steps)
    timesteps = list(sched.timesteps)
    record = set()
    if trajectory_points > 0:
        picks = np.linspace(0, len(timesteps) - 1, trajectory_points).round().astype(int)
        record = {int(timesteps[i]) for i in picks}
    device = backend.device
    was_training = backend.unet.training
    backend.unet.eval()
    denoise = backend.sampling_denoiser(cond, guidance)
    images, trajectory = [], {t: [] for t in sorted(record, reverse=True)}
    seeds = list(range(seed, seed + n))
    try:
        for start in range(0, n, batch_size):
            chunk = seeds[start:start + batch_size]
            x = initial_noise(backend.x0_shape, chunk).to(device) * sched.init_noise_sigma
            # ancestral (DDPM) sampling draws fresh noise each step: seed it from the chunk
            step_gen = torch.Generator(device=device).manual_seed(chunk[0] + 7_919)
            for t in timesteps:
                t_in = t.to(device).reshape(1)
                eps = denoise(sched.scale_model_input(x, t), t_in)
                kwargs = {"generator": step_gen} if scheduler == "ddpm" else {}
                out = sched.step(eps, t, x, **kwargs)
                x = out.prev_sample
                if int(t) in record:
                    trajectory[int(t)].append(backend.decode(out.pred_original_sample).float().cpu().clamp(-1, 1))
            images.append(backend.decode(x).float().cpu().clamp(-1, 1))
            if on_batch is not None:
                on_batch(min(start + batch_size, n), n)
    finally:
        backend.unet.train(was_training)
    return Samples(torch.cat(images), seeds, {t: torch.cat(v) for t, v in trajectory.items()})


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


def save_grid(images: Union[Tensor, np.ndarray], path: Union[str, Path], **kwargs) -> Path:
    """Write `image_grid(images, **kwargs)` as a PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image_grid(images, **kwargs).save(tmp)
    tmp.replace(path)
    return path
