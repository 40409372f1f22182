"""The teaching views: pictures that show what unlearning did to one forget image.

- `teaching_images`, `teaching_models`: the forget image (by default the training item copied
  most often) with a few retain images, and the models compared: before, after, and the oracle
  retrained without the forget image when one lies beside the model.
- `renoise_view`: the forget image noised to t and denoised by each model from the same noise.
- `likelihood_view`: its likelihood in bits/dim beside a few retain images, model by model.
- A job's pictures: `trajectory_strip`/`trajectory_image` (one seed's predicted clean image
  while it is denoised, before over after) and `neighbour_grid` (each forget image with the
  retain images ReTrack redirects it to, weighted by `neighbour_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .backends import load_backend
from .backends.base import Backend
from .devices import resolve_device
from .forget_set import ForgetSet, build_forget_set, gallery_items
from .grids import display_grid, renoise_grid
from .images import uint8_to_tensor
from .job_settings import EvalSettings
from .likelihood import LikelihoodRow, NLLSettings, model_likelihoods
from .models import ModelInfo, TrainingData, oracle_folder
from .objectives import retrack_targets
from .sampling import Samples, pixel_l2, renoise, sample

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
    oracle = oracle_folder(model.path)
    if oracle is not None:
        models.append(("oracle", oracle))
    return models


def renoise_view(models: Sequence[tuple[str, Path]], image: np.ndarray, t: int, seed: int = 0,
                 device: str = "auto") -> tuple[Image.Image, str]:
    """The forget image (uint8 HWC) noised to t and denoised by each model from the same noise:
    the picture (image, noised, one result per model) and a sentence with the distances."""
    device = resolve_device(device)
    x0 = uint8_to_tensor(image[None], channels_last=True)
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
    pixels = uint8_to_tensor(images.images, channels_last=True)
    for name, path in models:
        results = model_likelihoods(load_backend(path, device=device), pixels, settings)
        rows += [LikelihoodRow(name, image, role, result)
                 for image, role, result in zip(images.names, images.roles, results)]
        yield list(rows)


# ============================================================================ a job's pictures
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
    """One sample's denoising path: predicted clean image at evenly spaced timesteps, under the
    evaluation's sampler (so the path ends at the very sample the before/after grids show)."""
    return sample(backend, 1, seed=seed, steps=settings.sampling_steps, scheduler=settings.sampler_settings().sampler,
                  trajectory_points=settings.trajectory_points, cond=cond, guidance=settings.guidance)


def trajectory_image(before: Samples, after: Samples, before_flagged: bool, after_flagged: bool) -> Image.Image:
    """Two rows, before over after: the predicted clean image from pure noise (left) to the
    final sample at t = 0 (right); a final sample that reproduces a forget image is framed red."""
    timesteps = list(before.trajectory)  # highest t first, as recorded
    tiles = [before.trajectory[t] for t in timesteps] + [after.trajectory[t] for t in timesteps]
    labels = [f"{row} t={t}" for row in ("before", "after") for t in timesteps]
    flags = [False] * (len(timesteps) - 1) + [before_flagged] + [False] * (len(timesteps) - 1) + [after_flagged]
    return display_grid(torch.cat(tiles), ncol=len(timesteps), labels=labels, flags=flags)



def neighbour_grid(backend: Backend, forget: ForgetSet, data: TrainingData, forget_x0: Tensor, retain_x0: Tensor,
                   neighbours: Tensor, distances: Optional[Tensor], seed: int = 0) -> Image.Image:
    """One row per forget image (at most four: enough to see where trajectories go): the image,
    then its K nearest retain images (`neighbours`: rows of `retain_x0` per forget row, nearest
    first) captioned with their ReTrack weight (w) and distance (d)."""
    shown = min(len(forget_x0), 4)
    indices = neighbours[:shown]
    weights = neighbour_weights(forget_x0[:shown], retain_x0[indices], backend, seed=seed)
    tiles, labels = [], []
    for row in range(shown):
        tiles.append(forget.images[row])
        labels.append(f"forget {forget.sources[row].split()[0]}"[:16])
        for col, retain_row in enumerate(indices[row].tolist()):
            tiles.append(data.images[int(forget.retain_index[retain_row])])
            distance = "" if distances is None else f" d{float(distances[row, col]):.1f}"
            labels.append(f"w{float(weights[row, col]):.2f}{distance}")
    return display_grid(np.stack(tiles), ncol=indices.shape[1] + 1, labels=labels,
                        flags=[i % (indices.shape[1] + 1) == 0 for i in range(len(tiles))])
