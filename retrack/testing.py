"""Toy models for tests and hardware checks: a tiny random Stable Diffusion pipeline and a tiny
random CLIP, built offline from configs. Nothing in the library, the CLI or the app uses them;
they live in the package (not under tests/) because the GPU checks in benchmarks/ build them at
run time on machines that have no test folder on their path.

Real Stable Diffusion weights cannot be downloaded on the machines this project is developed and
tested on, so the latent backend is exercised on a pipeline with the same architecture and file
layout (UNet2DConditionModel, AutoencoderKL with 8x downsampling, CLIPTextModel, the real CLIP
tokenizer, SD's PNDM scheduler) but a few hundred thousand random weights. It is used by the
tests and the GPU checks (benchmarks/gpu_sd_check.py, gpu_oom_check.py); it generates noise-like
images, not pictures.

    pipe = build_tiny_sd_pipeline(seed=0)
    pipe.save_pretrained("tiny-sd")          # loads back with StableDiffusionPipeline.from_pretrained
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The CLIP BPE vocabulary has 49,408 entries: 256 bytes, 256 bytes + "</w>", 48,894 merges and the
# two special tokens. Stable Diffusion's text encoder reads at most 77 tokens.
CLIP_VOCAB_SIZE = 49_408
CLIP_CONTEXT_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (as in Stable Diffusion v1), rebuilt from the BPE merges that
    open_clip ships inside its package, so no download is needed. Token ids match open_clip's."""
    import open_clip

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    # Same slice as open_clip's SimpleTokenizer: skip the version line, keep 48,894 merges.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    # transformers 5 needs model_max_length for a locally built tokenizer, else the pipeline
    # overflows when it pads to "max_length".
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def build_tiny_sd_pipeline(
    seed: int = 0,
    image_size: int = 64,
    text_width: int = 32,
    save_to: Optional[Union[str, Path]] = None,
) -> StableDiffusionPipeline:
    """A random StableDiffusionPipeline with SD v1's layout at toy size.

    image_size must be a multiple of 32 (the VAE downsamples 8x like SD's, and the UNet halves the
    latent once more). With the defaults the latents are 4 x 8 x 8 and one fine-tune step takes a
    fraction of a second on a CPU. `save_to` also writes it as a diffusers folder (safetensors).
    """
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=text_width, attention_head_dim=4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT_LENGTH, hidden_size=text_width,
        intermediate_size=2 * text_width, num_hidden_layers=2, num_attention_heads=4, projection_dim=text_width,
        bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
    ))
    # Stable Diffusion v1's own scheduler settings, so the noise schedule is the real one.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    # float32 whatever torch's default dtype is, so the saved weights are always the same kind.
    vae, text_encoder, unet = (m.to(torch.float32).eval() for m in (vae, text_encoder, unet))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if save_to is not None:
        pipe.save_pretrained(save_to, safe_serialization=True)
    return pipe


# A CLIP of the same family as real ones (ViT image tower, transformer text tower, CLIP's
# tokenizer) at toy size; random weights, so its similarities are only meaningful for tests.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 2},
}
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(folder: Union[str, Path], seed: int = 0) -> Path:
    """Save a tiny random open_clip model as a folder `metrics.ClipScorer.load(folder)` reads."""
    from open_clip.model import CLIP

    from .metrics import save_open_clip_folder

    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CONFIG).to(torch.float32)
    preprocess = {"size": TINY_CLIP_CONFIG["vision_cfg"]["image_size"], "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}
    return save_open_clip_folder(model, TINY_CLIP_CONFIG, folder, preprocess_cfg=preprocess)
