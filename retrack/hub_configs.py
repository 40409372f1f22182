"""The pixel DDPMs of the paper's CIFAR-10 and CelebA-HQ benchmarks, as configurations.

ReTrack's published CIFAR-10 and CelebA-HQ settings (presets "cifar" and "celeba" in
`presets.PRESETS`) were run on Ho et al.'s DDPMs, which diffusers publishes on the Hugging Face Hub
as `google/ddpm-cifar10-32` and `google/ddpm-ema-celebahq-256`. Their weights cannot be downloaded
on every machine (not on this project's), so their configurations are written out here: the
UNet2DModel `config.json` and DDPMScheduler `scheduler_config.json` of each repository.
`build_hub_pipeline` builds a DDPMPipeline of the same architecture and noise schedule with random
weights, for tests and for sizing a run; with network, `python -m retrack unlearn --model
google/ddpm-cifar10-32 ...` loads the real weights instead.

`width_divisor` narrows every block (channels / divisor, GroupNorm groups likewise) and keeps
everything else: the block types, the layers per block, where the attention blocks sit, the
resolution, the time embedding and the scheduler. A 256-pixel model at 1/16 width trains a few steps
on a CPU in under a minute; the full one (113.7 M parameters) does not.

This module is separate from `retrack.testing` (toy models built for tests) because these are real
published configurations, not toys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

# Shared by both repositories (converted from Ho et al.'s TensorFlow checkpoints): the positional
# time embedding without the sin/cos flip and with frequency shift 1, downsampling by a stride-2
# convolution without padding, GroupNorm of 32 groups with eps 1e-6, one attention head per block.
_HO_ET_AL_UNET = dict(
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, in_channels=3, out_channels=3, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
    resnet_time_scale_shift="default",
)
# Ho et al.'s linear schedule over 1,000 steps, samples clipped to [-1, 1].
_HO_ET_AL_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                          clip_sample=True, trained_betas=None, prediction_type="epsilon")


@dataclass(frozen=True)
class HubPixelModel:
    """One published pixel DDPM: where it lives, its configs, the paper's settings for it."""

    hub_id: str
    preset: str  # key of presets.PRESETS: the paper's settings for this benchmark
    unet: dict  # UNet2DModel config
    scheduler: dict  # DDPMScheduler config
    parameters: int  # UNet parameter count of the published model

    def build(self, width_divisor: int = 1, seed: int = 0,
              save_to: Optional[Union[str, Path]] = None) -> DDPMPipeline:
        """A DDPMPipeline of this architecture with random weights (see the module docstring for
        `width_divisor`); `save_to` also writes it as a diffusers folder (safetensors)."""
        torch.manual_seed(seed)
        unet = UNet2DModel(**self.unet_config(width_divisor)).to(torch.float32).eval()
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**self.scheduler))
        if save_to is not None:
            pipe.save_pretrained(save_to, safe_serialization=True)
        return pipe

    def unet_config(self, width_divisor: int = 1) -> dict:
        """The UNet config with every block `width_divisor` times narrower."""
        widths, groups = self.unet["block_out_channels"], self.unet["norm_num_groups"]
        if width_divisor < 1 or groups % width_divisor:
            raise ValueError(f"width_divisor must divide {groups} (the GroupNorm groups), got {width_divisor}")
        return {**self.unet, "block_out_channels": tuple(w // width_divisor for w in widths),
                "norm_num_groups": groups // width_divisor}


HUB_PIXEL_MODELS: dict[str, HubPixelModel] = {
    # 35.7 M parameters: 32x32 RGB, channel multipliers (1, 2, 2, 2), attention at 16x16.
    "google/ddpm-cifar10-32": HubPixelModel(
        hub_id="google/ddpm-cifar10-32", preset="cifar",
        unet=dict(_HO_ET_AL_UNET, sample_size=32, block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
        # Ho et al. sampled CIFAR-10 with the larger posterior variance (sigma^2 = beta_t).
        scheduler=dict(_HO_ET_AL_SCHEDULE, variance_type="fixed_large"),
        parameters=35_746_307,
    ),
    # 113.7 M parameters: 256x256 RGB, multipliers (1, 1, 2, 2, 4, 4), attention at 16x16.
    "google/ddpm-ema-celebahq-256": HubPixelModel(
        hub_id="google/ddpm-ema-celebahq-256", preset="celeba",
        unet=dict(_HO_ET_AL_UNET, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                  down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
        scheduler=dict(_HO_ET_AL_SCHEDULE, variance_type="fixed_small"),
        parameters=113_673_219,
    ),
}


def hub_pixel_model(name: str) -> HubPixelModel:
    """A published model by Hub id, or by its preset name ('cifar', 'celeba')."""
    for model in HUB_PIXEL_MODELS.values():
        if name in (model.hub_id, model.preset):
            return model
    names = [*HUB_PIXEL_MODELS, *(m.preset for m in HUB_PIXEL_MODELS.values())]
    raise ValueError(f"unknown published pixel DDPM {name!r}; choose one of {', '.join(names)}")
