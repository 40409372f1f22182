"""Shared fixtures of the Stable Diffusion tests (imported by test_latent/test_split/test_multiprocess).

The tiny random pipeline is built and saved once per test session; tests load it read-only.
"""

import hashlib
from pathlib import Path

import pytest
import torch

from retrack.tiny import build_tiny_clip, build_tiny_sd_pipeline

TINY_IMAGE_SIZE = 32  # latents 4 x 4 x 4: each UNet call is a few milliseconds on a CPU


def folder_digest(path: Path) -> dict:
    """sha256 of every file under a folder, by relative path."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def random_images(n: int, seed: int, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """n RGB images in [-1, 1]: smooth random blobs (upsampled noise), distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


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
