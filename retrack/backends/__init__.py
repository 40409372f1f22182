"""Model families. `load_backend` picks the right one from a model folder's model_index.json;
`resolve_model_path` turns what a user names (a folder or a Hub id) into that folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Union

import torch

from .. import paths
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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_weights(path: Union[str, Path]) -> None:
    """Refuse a model folder whose weights (in it or in a component folder: unet/, vae/, ...)
    are pickle files with no safetensors file beside them. retrack loads safetensors only: a
    pickle file can run code when it is loaded, and the loaders never fall back to one."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for part in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        files = [p for p in part.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise ValueError(
                f"{path}: {pickles[0].relative_to(folder)} holds the weights in pickle format and there is no "
                ".safetensors file beside it; retrack loads safetensors only (a pickle file can run code when "
                "it is loaded). Convert it once where you trust the file, e.g. "
                "DDPMPipeline.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str) -> Path:
    """A local model folder for `spec`: the folder itself, or a Hub id downloaded when online."""
    spec = spec.strip()
    if not spec:
        raise ValueError("no model given: type a model folder or a Hub model id")
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.absolute() == paths.BUILTIN_MODEL:
        raise ValueError(f"the built-in model is missing from {paths.BUILTIN_MODEL}; "
                         "build it with `python scripts/build_builtin.py`")
    if not HUB_ID.match(spec):
        raise ValueError(f"{spec}: no such folder (and not a Hub model id like 'google/ddpm-cifar10-32')")
    try:
        from huggingface_hub import snapshot_download

        # Configs and safetensors weights only: no pickled weights, no remote code.
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as exc:  # offline, unknown id, gated repo: all end up here
        raise ValueError(f"could not fetch the model {spec!r} from the Hugging Face Hub "
                         f"({type(exc).__name__}); without network use a local model folder") from None


def load_backend(path: Union[str, Path], device: Union[str, torch.device] = "cpu", **kwargs) -> Backend:
    """Load any supported model folder as a backend on `device` (safetensors weights only).

    Raises ValueError, with the reason, for a folder that is not a supported model, holds only
    pickle weights, or whose files cannot be loaded.
    """
    family = model_family(path)
    refuse_pickle_weights(path)
    try:
        if family == "pixel":
            return PixelBackend.from_pretrained(path, device=device, **kwargs)
        from .latent import LatentBackend  # imported lazily: it pulls in transformers

        return LatentBackend.from_pretrained(path, device=device, **kwargs)
    except (OSError, json.JSONDecodeError) as exc:  # e.g. a missing or damaged weights file
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: the model cannot be loaded ({type(exc).__name__}: {exc})") from None


__all__ = ["Backend", "PixelBackend", "load_backend", "model_family", "refuse_pickle_weights", "resolve_model_path"]
