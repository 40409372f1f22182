"""Test-wide settings: offline always, no analytics, a private cache, and tiny shared fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("RETRACK_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "retrack"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    """A tiny random UNet2DModel + DDPM scheduler saved as a DDPMPipeline folder (8x8x1)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    path = tmp_path_factory.mktemp("models") / "tiny-ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture
def image_folders(tmp_path):
    """Image files for the tiny model (8x8 grayscale): forget/ holds an 8x8 grayscale image and a
    16x16 colour one (converted on loading), retain/ twelve 8x8 grayscale images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    forget, retain = tmp_path / "forget", tmp_path / "retain"
    forget.mkdir(), retain.mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(forget / "secret.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(forget / "big-colour.png")
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(retain / f"{i}.png")
    return forget, retain


@pytest.fixture(scope="session")
def tiny_app_model(tmp_path_factory, tiny_pixel_model):
    """What the app needs to run a job in about a second: the tiny 8x8x1 DDPM in `root/model`, a
    tiny random CLIP scorer beside it in `root/clip` (found as the model's companion, as the
    built-in model's is) and 16 training images in `root/data`. Returns (model, data) folders."""
    import shutil

    import numpy as np
    from PIL import Image

    from retrack.testing import build_tiny_clip

    root = tmp_path_factory.mktemp("app-model")
    shutil.copytree(tiny_pixel_model, root / "model")
    build_tiny_clip(root / "clip")
    (root / "data").mkdir()
    rng = np.random.default_rng(1)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "data" / f"{i:02d}.png")
    return root / "model", root / "data"
