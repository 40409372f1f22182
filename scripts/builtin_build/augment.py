"""Random degradations of digit and T-shirt images, shared by the classifier's training
(scripts/train_classifier.py) and the CLIP scorer's (train_clip.py, --clip-augment): warps, blur,
fading, overlays, noise and grey backgrounds, the ways unlearning and undertraining spoil a copy,
so that a spoiled T-shirt is still recognised and a spoiled digit is still a digit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from retrack.data import TSHIRT_LABEL

DIGITS_PER_BATCH, TSHIRTS_PER_BATCH = 128, 16
# Blur strengths are drawn from a few fixed values so each batch needs only a few blur calls.
BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0, 2.5)


def random_affine(images: torch.Tensor, generator: torch.Generator, max_degrees: float,
                  scale_range: tuple[float, float], max_shift_px: float) -> torch.Tensor:
    """Rotate, scale and shift each image of (N, 1, 28, 28) by its own random amounts (bilinear)."""
    n = len(images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    scale = scale_range[0] + torch.rand(n, generator=generator) * (scale_range[1] - scale_range[0])
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift_px * 2 / images.shape[-1]  # grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def random_blur(images: torch.Tensor, generator: torch.Generator, probability: float, max_sigma: float) -> torch.Tensor:
    """Blur a random ``probability`` share of the images, each with a sigma from BLUR_SIGMAS up to ``max_sigma``."""
    sigmas = [s for s in BLUR_SIGMAS if s <= max_sigma]
    pick = torch.randint(0, len(sigmas), (len(images),), generator=generator)
    chosen = torch.rand(len(images), generator=generator) < probability
    out = images.clone()
    for index, sigma in enumerate(sigmas):
        rows = chosen & (pick == index)
        if rows.any():
            out[rows] = gaussian_blur(images[rows], kernel_size=[9, 9], sigma=[sigma, sigma])
    return out


def augmented_batch(digits: torch.Tensor, labels: torch.Tensor, tshirt: torch.Tensor,
                    generator: torch.Generator, max_noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch in [0, 1]: augmented digits and augmented (blurred, faded) T-shirts, with
    Gaussian noise of a standard deviation up to ``max_noise`` on every image."""
    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return (low + torch.rand(n, 1, 1, 1, generator=generator) * (high - low))

    index = torch.randint(0, len(digits), (DIGITS_PER_BATCH,), generator=generator)
    digit_x = random_affine(digits[index], generator, 12.0, (0.9, 1.1), 2.5)
    digit_x = random_blur(digit_x, generator, 1 / 3, 1.0) * uniform(DIGITS_PER_BATCH, 0.7, 1.0)
    digit_x = digit_x + torch.randn(digit_x.shape, generator=generator) * uniform(DIGITS_PER_BATCH, 0.0, max_noise)

    shirts = random_affine(tshirt.expand(TSHIRTS_PER_BATCH, -1, -1, -1), generator, 10.0, (0.85, 1.1), 3.0)
    shirts = random_blur(shirts, generator, 0.8, 2.5) * uniform(TSHIRTS_PER_BATCH, 0.3, 1.0)
    overlay = torch.randint(0, len(digits), (TSHIRTS_PER_BATCH,), generator=generator)
    weight = uniform(TSHIRTS_PER_BATCH, 0.0, 0.35) * (torch.rand(TSHIRTS_PER_BATCH, 1, 1, 1, generator=generator) < 0.25)
    shirts = (1 - weight) * shirts + weight * digits[overlay]
    shirts = shirts + torch.randn(shirts.shape, generator=generator) * uniform(TSHIRTS_PER_BATCH, 0.0, max_noise)

    # A grey background in a third of all images, digits and T-shirts alike: otherwise a grey frame
    # (as an undertrained or damaged DDPM draws) is evidence of a faded T-shirt and not of a digit.
    images = torch.cat([digit_x, shirts])
    background = uniform(len(images), 0.0, 0.3) * (torch.rand(len(images), 1, 1, 1, generator=generator) < 1 / 3)
    images = (images + background * (1 - images)).clamp(0.0, 1.0)
    targets = torch.cat([labels[index], torch.full((TSHIRTS_PER_BATCH,), TSHIRT_LABEL)])
    return images, targets
