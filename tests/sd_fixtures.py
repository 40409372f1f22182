"""Shared fixtures and helpers of the Stable Diffusion tests (imported by test_latent, test_split,
test_multiprocess, test_cli and test_engine).

The tiny random pipeline is built and saved once per test session; tests load it read-only.
"""

from pathlib import Path

import pytest
import torch

from retrack.engine import UnlearnConfig
from retrack.images import tensor_to_pil
from retrack.testing import build_tiny_clip, build_tiny_sd_pipeline

TINY_IMAGE_SIZE = 32  # latents 4 x 4 x 4: each UNet call is a few milliseconds on a CPU


def random_images(n: int, seed: int, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """n RGB images in [-1, 1]: smooth random blobs (upsampled noise), distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def write_images(folder: Path, n: int, seed: int) -> Path:
    """A new folder of n random_images as 0.png, 1.png, ..."""
    folder.mkdir(parents=True)
    for i, picture in enumerate(tensor_to_pil(random_images(n, seed))):
        picture.save(folder / f"{i}.png")
    return folder


def quick_config(**overrides) -> UnlearnConfig:
    """The SD preset, shortened: 2 steps of 2 micro-batches, a learning rate that moves weights."""
    return UnlearnConfig.preset("sd", **{**dict(k=3, steps=2, grad_accum=2, lr=1e-3, device="cpu"), **overrides})


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread. The tiny models' tensors are far too small to gain from
    a second thread, and on a busy 2-core machine OpenMP's spinning made each UNet call ~50x
    slower (17 ms instead of 0.4 ms per small convolution). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline saved as a diffusers folder (32 x 32 RGB)."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd_pipeline(seed=0, image_size=TINY_IMAGE_SIZE, save_to=path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random open_clip model saved as a folder ClipScorer.load reads."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def tiny_safety_checker_parts(seed: int = 0):
    """A random StableDiffusionSafetyChecker with a tiny CLIP vision tower, and the CLIP image
    processor that feeds it (the feature extractor of a real Stable Diffusion folder)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).to(torch.float32).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


@pytest.fixture(scope="session")
def tiny_sd_download(tmp_path_factory) -> Path:
    """The tiny pipeline laid out like a full Stable Diffusion v1.5 download: a safety checker and
    a feature extractor; in each component folder the safetensors weights plus `.bin` (pickle) and
    `.fp16.safetensors` variants; and, at the top level, single-file checkpoints of the whole model
    (`.safetensors` and `.ckpt`) and a README. What the pipeline loads: model_index.json, and per
    component its config and non-variant safetensors weights (and the tokenizer's files)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("models") / "sd-download"
    base = build_tiny_sd_pipeline(seed=0, image_size=TINY_IMAGE_SIZE)
    checker, processor = tiny_safety_checker_parts()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=checker,
                                   feature_extractor=processor, requires_safety_checker=True)
    # Variants first and the plain safetensors save last, so the configs are the float32 ones.
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(path, variant="fp16", safe_serialization=True)
    pipe.save_pretrained(path, safe_serialization=False)  # .bin for the diffusers models
    for name in ("text_encoder", "safety_checker"):  # transformers 5 no longer writes .bin: as older downloads hold
        torch.save(getattr(pipe, name).state_dict(), path / name / "pytorch_model.bin")
    pipe.save_pretrained(path, safe_serialization=True)
    everything = {f"{name}.{key}": tensor.contiguous() for name in ("unet", "vae", "text_encoder")
                  for key, tensor in getattr(pipe, name).state_dict().items()}
    save_file(everything, path / "v1-5-pruned-emaonly.safetensors")
    torch.save({"state_dict": everything}, path / "v1-5-pruned-emaonly.ckpt")
    (path / "README.md").write_text("A model card.\n")
    return path
