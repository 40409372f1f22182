"""The published pixel DDPMs of the paper's CIFAR-10 and CelebA-HQ benchmarks (retrack/hub_configs.py).

Their weights cannot be downloaded here, so the models are their exact configurations with random
weights. The CIFAR-10 one is used at full size (35.7 M parameters): it is put into a Hugging Face
cache folder as `google/ddpm-cifar10-32` would be after a download, and `python -m retrack
unlearn --model google/ddpm-cifar10-32` forgets one image with a retain folder, on the CPU, with
the published CIFAR-10 settings except for a small batch and two steps. The 256-pixel CelebA-HQ
one is trained at 1/16 width (and batch 1) with the same block layout and resolution, and only
built at full size (113.7 M parameters). Every output must load with plain diffusers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from retrack.cli import main
from retrack.hub_configs import HUB_PIXEL_MODELS, hub_pixel_model
from retrack.presets import PRESETS

CIFAR, CELEBA = HUB_PIXEL_MODELS["google/ddpm-cifar10-32"], HUB_PIXEL_MODELS["google/ddpm-ema-celebahq-256"]


def rgb_image_folders(root: Path, size: int, n_retain: int = 12) -> tuple[Path, Path]:
    """One RGB image to forget and a folder of `n_retain` RGB images to keep, all size x size."""
    rng = np.random.default_rng(0)
    (root / "retain").mkdir(parents=True)
    forget = root / "forget.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(forget)
    for i in range(n_retain):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "retain" / f"{i:02d}.png")
    return forget, root / "retain"


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_unlearned_folder(out: Path, source: Path, preset: str) -> None:
    """`out` loads with plain diffusers, has the source's architecture and schedule, different
    weights, and records the preset's settings."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    original = DDPMPipeline.from_pretrained(source, local_files_only=True)
    for saved, before in ((pipe.unet.config, original.unet.config), (pipe.scheduler.config, original.scheduler.config)):
        assert {k: v for k, v in saved.items() if not k.startswith("_")} == \
            {k: v for k, v in before.items() if not k.startswith("_")}
    changed = [name for (name, a), (_, b) in zip(pipe.unet.named_parameters(), original.unet.named_parameters())
               if not torch.equal(a, b)]
    assert changed, "two training steps must change the weights"
    record = json.loads((out / "retrack.json").read_text())
    assert record["steps_done"] == 2 and record["n_forget"] == 1 and record["n_retain"] == 12
    for name in ("lam", "lr", "weight_decay", "eta", "siss_c"):
        assert record["config"][name] == PRESETS[preset][name], name


# ============================================================================ the configurations
def test_full_size_models_have_the_published_parameter_counts_and_layout():
    cifar = CIFAR.build().unet
    assert parameter_count(cifar) == CIFAR.parameters == 35_746_307  # 35.7 M, as in Ho et al.
    assert [type(b).__name__ for b in cifar.down_blocks] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                             "DownBlock2D"]
    del cifar
    celeba = CELEBA.build().unet
    assert parameter_count(celeba) == CELEBA.parameters == 113_673_219  # 113.7 M
    assert celeba.config.sample_size == 256 and tuple(celeba.config.block_out_channels) == (128, 128, 256, 256, 512, 512)
    # The one attention block of each path works at 16x16 (256 / 2**4), as in the paper.
    assert [type(b).__name__ for b in celeba.down_blocks].index("AttnDownBlock2D") == 4
    assert [type(b).__name__ for b in celeba.up_blocks].index("AttnUpBlock2D") == 1
    assert celeba.down_blocks[4].resnets[0].norm1.eps == 1e-6 and celeba.down_blocks[4].attentions[0].heads == 1


def test_schedules_are_ho_et_al_linear_with_each_repositorys_variance():
    for model, variance in ((CIFAR, "fixed_large"), (CELEBA, "fixed_small")):
        scheduler = model.build(width_divisor=32).scheduler
        assert scheduler.config.variance_type == variance and scheduler.config.clip_sample
        assert len(scheduler.betas) == 1000
        assert torch.allclose(scheduler.betas, torch.linspace(1e-4, 0.02, 1000))


def test_reduced_width_keeps_the_block_layout():
    full, narrow = CELEBA.unet_config(), CELEBA.unet_config(width_divisor=8)
    assert narrow["block_out_channels"] == (16, 16, 32, 32, 64, 64) and narrow["norm_num_groups"] == 4
    assert {k: v for k, v in narrow.items() if k not in ("block_out_channels", "norm_num_groups")} == \
        {k: v for k, v in full.items() if k not in ("block_out_channels", "norm_num_groups")}
    with pytest.raises(ValueError, match="must divide 32"):
        CELEBA.unet_config(width_divisor=3)
    assert hub_pixel_model("cifar") is CIFAR and hub_pixel_model("google/ddpm-ema-celebahq-256") is CELEBA
    with pytest.raises(ValueError, match="unknown published pixel DDPM"):
        hub_pixel_model("google/ddpm-church-256")


# ============================================================================ unlearning them
def hub_cache_with(model_folder: Path, cache: Path, hub_id: str) -> None:
    """Lay out `model_folder` in a Hugging Face cache as huggingface_hub leaves a download of
    `hub_id` (refs/main names the snapshot), so that an offline `snapshot_download` finds it."""
    import shutil

    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_folder, repo / "snapshots" / commit)


@pytest.mark.slow
def test_cifar10_model_at_full_size_forgets_one_image_by_hub_id(tmp_path):
    source = tmp_path / "ddpm-cifar10-32"
    CIFAR.build(save_to=source)
    hub_cache_with(source, tmp_path / "hub-cache", CIFAR.hub_id)
    forget, retain = rgb_image_folders(tmp_path / "data", 32)
    out = tmp_path / "cifar-clean"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "retrack", "unlearn", "--model", CIFAR.hub_id, "--forget", str(forget),
         "--retain", str(retain), "--steps", "2", "--batch", "2", "--k", "3", "--device", "cpu", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "preset cifar" in result.stderr  # chosen from the model (32x32 RGB), not named
    print(result.stdout)  # the run's time and seconds per step
    check_unlearned_folder(out, source, "cifar")


@pytest.mark.slow
def test_celebahq_layout_at_reduced_width_forgets_one_image(tmp_path, capsys):
    source = tmp_path / "ddpm-celebahq-256-narrow"
    CELEBA.build(width_divisor=16, save_to=source)
    forget, retain = rgb_image_folders(tmp_path / "data", 256)
    out = tmp_path / "celeba-clean"
    code = main(["unlearn", "--model", str(source), "--forget", str(forget), "--retain", str(retain),
                 "--steps", "2", "--batch", "1", "--accum", "1", "--k", "3", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "preset celeba" in capsys.readouterr().err
    check_unlearned_folder(out, source, "celeba")


def test_a_hub_id_that_cannot_be_fetched_says_so(tmp_path, capsys, image_folders):
    forget, retain = image_folders
    code = main(["unlearn", "--model", "google/ddpm-ema-celebahq-256", "--forget", str(forget), "--retain",
                 str(retain), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "could not fetch the model 'google/ddpm-ema-celebahq-256' from the Hugging Face Hub" in err
    assert "local model folder" in err and not (tmp_path / "x").exists()
