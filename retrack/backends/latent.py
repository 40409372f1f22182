"""Latent diffusion models (Stable Diffusion v1-style pipelines): the UNet is trained, nothing else.

x0 is the VAE latent of an image times the VAE's scaling factor (the space the UNet was trained
in), so ReTrack's K nearest neighbours are searched among retain latents. Prompts become text
embeddings through the frozen text encoder and are passed to the objectives as `forget_cond` /
`retain_cond`. The engine, the objectives and the sampler are the ones the pixel backend uses;
this file only says how a Stable Diffusion folder is loaded, called and saved.

    backend = LatentBackend.from_pretrained("path/to/sd", device="cuda", gradient_checkpointing=True)
    forget, retain = backend.encode(forget_images), backend.encode(retain_images)
    cond = backend.encode_prompt(["a modified prompt"])          # (1, 77, D): shared by every row
    result = unlearn(backend, forget, retain, UnlearnConfig.preset("sd"), forget_cond=cond, retain_cond=cond)
    save_model(backend, "out/sd-unlearned", result.metadata())

Saving writes a StableDiffusionPipeline folder holding only what the pipeline loads: model_index.json
and the component folders it names, each written by diffusers' own save_pretrained (the trained UNet
as safetensors). The files of the frozen components (VAE, text encoder, tokenizer, scheduler, safety
checker, feature extractor) are then replaced by the source's files of the same name, so they stay
byte-identical. Nothing else of the source folder is copied: a full Stable Diffusion download also
holds single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, `.ckpt`), `.bin` and `.fp16`
variants, i.e. the original, memorising weights. With `lora_rank`, only a LoRA adapter on the
UNet's attention projections is trained and saved: `pytorch_lora_weights.safetensors` (what
`StableDiffusionPipeline.load_lora_weights(folder)` reads) plus `retrack_lora.json` naming the base
model. `LatentBackend.from_pretrained(adapter_folder)` loads the base and merges the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from ..loading import MODEL_LOADING
from ..presets import GUIDANCE
from .base import Backend

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' LoRA loaders look for
LORA_REFERENCE_FILE = "retrack_lora.json"  # base model + adapter settings, next to the weights
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as in diffusers' LoRA scripts


def is_lora_folder(path: Union[str, Path]) -> bool:
    """True for a folder retrack wrote for a LoRA run (adapter weights + base reference)."""
    return (Path(path) / LORA_REFERENCE_FILE).is_file() and (Path(path) / LORA_WEIGHTS_FILE).is_file()


class LatentBackend(Backend):
    family = "latent"
    channels = 3  # of the images; the latents have unet.config.in_channels

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        source: str = "",
        components_dir: Optional[Union[str, Path]] = None,
    ):
        """Wrap the modules of a loaded pipeline. `components_dir` is the local folder the pipeline
        was read from (the frozen components' files are copied from it on save, byte for byte); None
        (a pipeline built in memory) saves them with their own `save_pretrained` only."""
        prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"this model predicts {prediction!r}; ReTrack's objectives need a noise (epsilon) "
                             f"predicting model such as Stable Diffusion v1.x")
        self.unet: UNet2DConditionModel = pipeline.unet
        self.vae: AutoencoderKL = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.sampling_scheduler = pipeline.scheduler  # the pipeline's own (saved unchanged)
        # The training schedule: same betas as the pipeline's sampler. Latents are not bounded to
        # [-1, 1], so predicted x0 must never be clipped (StableDiffusionPipeline forces the same).
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
        self.source = source
        self.components_dir = Path(components_dir) if components_dir is not None else None
        self.extra_components = {name: getattr(pipeline, name, None) for name in ("safety_checker", "feature_extractor", "image_encoder")}
        self.lora_rank: Optional[int] = None
        self.lora_alpha: Optional[float] = None
        # Only the UNet ever trains; the VAE and the text encoder are frozen feature extractors.
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        self.latent_size = int(size if isinstance(size, int) else size[0])
        self.image_size = self.latent_size * self.vae_scale_factor
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self._empty_prompt: Optional[Tensor] = None

    # --------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        local_files_only: bool = True,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        gradient_checkpointing: bool = False,
    ) -> "LatentBackend":
        """Load a Stable Diffusion folder (or Hub id when online), or a retrack LoRA folder (its base
        is loaded and the adapter merged in). safetensors only; no remote code is ever run.

        lora_rank: train a fresh LoRA adapter of this rank (alpha defaults to the rank, i.e. scale 1)
        instead of the whole UNet. gradient_checkpointing: recompute UNet activations in the
        backward pass (less memory, ~30% slower), as for SD at 512 px on small GPUs.
        """
        if is_lora_folder(path):
            backend = cls._from_lora_folder(Path(path), local_files_only)
        else:
            local = Path(path)
            if not local.is_dir():
                # A Hub id: fetch (or find in the cache) the snapshot once, then load it like a folder,
                # so the components can later be copied file by file.
                local = Path(StableDiffusionPipeline.download(str(path), local_files_only=local_files_only, use_safetensors=True))
            with MODEL_LOADING:
                pipeline = StableDiffusionPipeline.from_pretrained(local, local_files_only=True, use_safetensors=True)
            backend = cls(pipeline, source=str(path), components_dir=local)
        if lora_rank is not None:
            backend.add_lora(lora_rank, lora_alpha)
        if gradient_checkpointing:
            backend.unet.enable_gradient_checkpointing()
        return backend.to(device)

    @classmethod
    def _from_lora_folder(cls, folder: Path, local_files_only: bool) -> "LatentBackend":
        """The base model named in retrack_lora.json with the saved adapter merged into its UNet."""
        reference = json.loads((folder / LORA_REFERENCE_FILE).read_text())
        base = cls.from_pretrained(reference["base_model"], local_files_only=local_files_only)
        pipeline = base.pipeline()
        with MODEL_LOADING:
            pipeline.load_lora_weights(str(folder), adapter_name="retrack", weight_name=LORA_WEIGHTS_FILE, use_safetensors=True)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()  # the merged weights stay; the adapter layers go
        base.source = str(folder)
        return base

    def add_lora(self, rank: int, alpha: Optional[float] = None) -> None:
        """Freeze the UNet and add a trainable LoRA adapter (rank `rank`) to its attention layers."""
        from peft import LoraConfig

        if self.lora_rank is not None:
            raise ValueError("this backend already trains a LoRA adapter")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        self.unet.requires_grad_(False)
        # init_lora_weights=True starts B at zero: the adapted UNet equals the original at step 0.
        with MODEL_LOADING:  # builds new layers
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                             target_modules=list(LORA_TARGET_MODULES)))
        self.lora_rank, self.lora_alpha = rank, alpha

    def to(self, device: Union[str, torch.device]) -> "LatentBackend":
        """Move the UNet, the VAE, the text encoder and the pipeline's other networks (safety
        checker, image encoder) to `device`, so `pipeline()` runs there as a whole."""
        extra = [m for m in self.extra_components.values() if isinstance(m, torch.nn.Module)]
        for module in (self.unet, self.vae, self.text_encoder, *extra):
            module.to(device)
        return self

    def pipeline(self) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline sharing this backend's modules (generation with the usual
        diffusers API; training the backend changes what it generates)."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.sampling_scheduler, safety_checker=self.extra_components["safety_checker"],
            feature_extractor=self.extra_components["feature_extractor"],
            image_encoder=self.extra_components["image_encoder"], requires_safety_checker=False,
        )

    # --------------------------------------------------------------------------- images <-> x0
    @property
    def x0_shape(self) -> tuple[int, int, int]:
        return (int(self.unet.config.in_channels), self.latent_size, self.latent_size)

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 8) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] at `image_size` -> latents x scaling factor, on the CPU.

        Uses the mean of the VAE's posterior, not a sample: the latent of an image is then one
        fixed tensor, so the k-NN search and its cache are deterministic (SD's posterior std is
        tiny next to the data spread, so nothing is lost).
        """
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit this model, which expects "
                             f"{(self.channels, self.image_size, self.image_size)}")
        device, dtype = self.vae.device, self.vae.dtype
        latents = []
        for chunk in images.split(batch_size):
            mean = self.vae.encode(chunk.to(device, dtype)).latent_dist.mean
            latents.append(((mean - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, x0: Tensor, batch_size: int = 8) -> Tensor:
        """Latents x scaling factor -> images (N, 3, H, W) in [-1, 1], on the latents' device."""
        device, dtype = self.vae.device, self.vae.dtype
        images = [self.vae.decode(chunk.to(device, dtype) / self.scaling_factor + self.shift_factor).sample.clamp(-1, 1)
                  for chunk in x0.split(batch_size)]
        return torch.cat(images).to(x0.device)

    # --------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """Prompts -> text embeddings (N, 77, D) on the CPU, from the frozen text encoder (the
        last hidden state, as StableDiffusionPipeline uses). Prompts over 77 tokens are truncated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return hidden.float().cpu()

    def empty_prompt(self) -> Tensor:
        """The embedding of "" (1, 77, D): the unconditional input of classifier-free guidance."""
        if self._empty_prompt is None:
            self._empty_prompt = self.encode_prompt([""])
        return self._empty_prompt

    # --------------------------------------------------------------------------- the network
    def denoise(self, x_t: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        """Predicted noise; `cond` (B, 77, D) text embeddings, or None for the empty prompt."""
        if cond is None:
            cond = self.empty_prompt()
        cond = cond.to(x_t.device)
        if cond.shape[0] != x_t.shape[0]:
            cond = cond.expand(x_t.shape[0], *cond.shape[1:])
        return self.unet(x_t, t, encoder_hidden_states=cond).sample

    def sampling_denoiser(self, cond: Optional[Tensor] = None, guidance: float = GUIDANCE) -> Callable[[Tensor, Tensor], Tensor]:
        """eps(x_t, t) with classifier-free guidance: eps_u + guidance * (eps_c - eps_u), where eps_u
        is conditioned on the empty prompt. guidance 1 (or cond None) is a single conditional call."""
        if cond is None or guidance == 1.0:
            return lambda x, t: self.denoise(x, t.expand(x.shape[0]), cond)
        uncond, cond = self.empty_prompt(), cond

        def guided(x: Tensor, t: Tensor) -> Tensor:
            n = x.shape[0]
            both = torch.cat([uncond.expand(n, *uncond.shape[1:]), cond.expand(n, *cond.shape[1:])])
            eps_u, eps_c = self.denoise(torch.cat([x, x]), t.expand(2 * n), both).chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        return guided

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The UNet's weights, or only its LoRA adapter's when one was added."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    # --------------------------------------------------------------------------- files
    def save_pretrained(self, out_dir: Path) -> None:
        """A full pipeline folder, or (LoRA) the adapter plus a reference to the base model."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora_rank is not None:
            self._save_lora(out_dir)
            return
        # diffusers writes exactly what a pipeline consists of: model_index.json and one folder per
        # component, with each component's config and safetensors weights (no variants, no pickles).
        self.pipeline().save_pretrained(out_dir, safe_serialization=True)
        if self.components_dir is not None:
            _restore_source_files(self.components_dir, out_dir, trained=("unet",))

    def _save_lora(self, out_dir: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(
            out_dir, unet_lora_layers=layers, safe_serialization=True,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
        )
        base = Path(self.source).absolute() if Path(self.source).exists() else self.source
        reference = {"base_model": str(base), "rank": self.lora_rank, "alpha": self.lora_alpha,
                     "target_modules": list(LORA_TARGET_MODULES), "weights": LORA_WEIGHTS_FILE}
        (out_dir / LORA_REFERENCE_FILE).write_text(json.dumps(reference, indent=2))


def _restore_source_files(source: Path, out_dir: Path, trained: Sequence[str]) -> None:
    """Replace each file just written under `out_dir` (outside the `trained` component folders) by
    the source's file at the same relative path, when there is one: the frozen components and
    model_index.json then stay byte-identical to the source, while only files the pipeline loads
    are written. Links are followed, so a Hub cache snapshot's files are copied, not linked."""
    for written in sorted(out_dir.rglob("*")):
        relative = written.relative_to(out_dir)
        original = source / relative
        if written.is_file() and relative.parts[0] not in trained and original.is_file():
            shutil.copyfile(original, written)
