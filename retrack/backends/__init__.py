"""Model families. `load_backend` picks the right one from a model folder's model_index.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from .base import Backend
from .pixel import PixelBackend

PIXEL_PIPELINES = {"DDPMPipeline", "DDIMPipeline"}
LATENT_PIPELINES = {"StableDiffusionPipeline"}


def model_family(path: Union[str, Path]) -> str:
    """'pixel' or 'latent', from the folder's model_index.json (or a retrack LoRA adapter folder);
    a clear error otherwise."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        from .latent import is_lora_folder  # a LoRA adapter retrack saved: loads on its base model

        if is_lora_folder(path):
            return "latent"
        raise ValueError(f"{path}: not a diffusers model folder (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc})") from None
    if name in PIXEL_PIPELINES:
        return "pixel"
    if name in LATENT_PIPELINES or "StableDiffusion" in name:
        return "latent"
    raise ValueError(f"{path}: pipeline {name!r} is not supported (pixel DDPM/DDIM or Stable Diffusion)")


def load_backend(path: Union[str, Path], device: Union[str, torch.device] = "cpu", **kwargs) -> Backend:
    """Load any supported model folder as a backend on `device`."""
    family = model_family(path)
    if family == "pixel":
        return PixelBackend.from_pretrained(path, device=device, **kwargs)
    from .latent import LatentBackend  # imported lazily: it pulls in transformers

    return LatentBackend.from_pretrained(path, device=device, **kwargs)


__all__ = ["Backend", "PixelBackend", "load_backend", "model_family"]
