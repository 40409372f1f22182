"""Pixel-space diffusers DDPMs: a UNet2DModel plus a DDPM/DDIM scheduler in one folder.

x0 is the image itself in [-1, 1]; the network is unconditional. The folder layout is the one
`DDPMPipeline.save_pretrained` writes (model_index.json, unet/, scheduler/), so any such model
from the Hub or disk loads, and what retrack saves loads back with `DDPMPipeline.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import Tensor

from ..loading import MODEL_LOADING
from .base import Backend


class PixelBackend(Backend):
    family = "pixel"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, source: str = "", pipeline_class: str = "DDPMPipeline"):
        self.unet = unet
        self.scheduler = scheduler
        self.source = source
        self.pipeline_class = pipeline_class
        self.image_size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
        self.channels = int(unet.config.in_channels)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu", local_files_only: bool = True) -> "PixelBackend":
        """Load a DDPM pipeline folder (or Hub id when online); safetensors only, no remote code."""
        kwargs = dict(local_files_only=local_files_only, use_safetensors=True)
        with MODEL_LOADING:
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kwargs)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=local_files_only)
        pipeline_class = "DDPMPipeline"
        index = Path(path) / "model_index.json"
        if index.is_file():
            pipeline_class = json.loads(index.read_text()).get("_class_name", pipeline_class)
        return cls(unet.to(device).eval(), scheduler, str(path), pipeline_class)

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def encode(self, images: Tensor, batch_size: int = 32) -> Tensor:
        if tuple(images.shape[1:]) != self.x0_shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit this model, which expects {self.x0_shape}")
        return images.float()

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def denoise(self, x_t: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        return self.unet(x_t, t).sample

    def save_pretrained(self, out_dir: Path) -> None:
        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(out_dir, safe_serialization=True)
