"""What every model family provides to the engine, the sampler and the app.

A backend owns one loaded model: the trainable network (`unet`), its noise schedule, how
images become x0 (identity for pixel models, the VAE for latent models), how conditioning is
passed, and how the whole model folder is saved. The training loop, the objectives and the
sampler are shared by every family and only talk to this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from ..objectives import NoiseSchedule


class Backend:
    family: ClassVar[str] = ""
    unet: torch.nn.Module
    scheduler: object  # the diffusers training scheduler (DDPM); its alphas define the schedule
    source: str  # where the model was loaded from (recorded in outputs)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler(self.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: Union[str, torch.device]) -> "Backend":
        """Move every module the model holds to `device` (here the network; latent models add theirs)."""
        self.unet.to(device)
        return self

    # --- images <-> x0 -------------------------------------------------------------------
    image_size: int
    channels: int  # of the images the model consumes and produces

    def encode(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] at `image_size` -> x0 the network is trained on."""
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        """x0 -> images (N, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    # --- the network ---------------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        """Predicted noise for a batch (what the objectives call)."""
        raise NotImplementedError

    def sampling_denoiser(self, cond: Optional[Tensor] = None, guidance: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """eps(x_t, t) for sampling with fixed conditioning (guidance where the family has it)."""
        return lambda x, t: self.denoise(x, t.expand(x.shape[0]), cond)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # --- files ---------------------------------------------------------------------------
    def save_pretrained(self, out_dir: Path) -> None:
        """Write the complete model folder (the engine wraps this to make it atomic)."""
        raise NotImplementedError
