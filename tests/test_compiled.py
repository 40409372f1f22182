"""The compiled network for sampling: its GroupNorm is nn.GroupNorm's function, the model it is
built from is left as it was, and a compiled draw is the eager draw up to bf16-sized differences,
with a filled-up last batch that keeps exactly the full batch's samples."""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from retrack.backends import load_backend
from retrack.compiled import GroupStatsNorm, compiled_backend, with_group_stats_norms
from retrack.sampling import sample


@pytest.mark.parametrize("shape,groups", [((3, 6, 5, 4), 3), ((2, 8, 7), 4), ((2, 32, 3, 3), 32), ((1, 4, 2, 2), 1)])
def test_group_stats_norm_is_group_norm(shape, groups):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + torch.linspace(-2, 5, shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1]))
        norm.bias.copy_(torch.randn(shape[1]))
    ours = GroupStatsNorm.like(norm)
    assert ours.weight is norm.weight and ours.bias is norm.bias  # shared, not copied
    torch.testing.assert_close(ours(x), norm(x), rtol=1e-5, atol=1e-5)


def test_group_stats_norm_keeps_float32_statistics_under_bf16_autocast():
    # a large mean against a small spread: bf16 statistics would lose the spread entirely
    x = 50 + 0.01 * torch.randn(2, 4, 6, 6)
    norm = torch.nn.GroupNorm(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = GroupStatsNorm.like(norm)(x)
    torch.testing.assert_close(ours.float(), norm(x), rtol=0, atol=2e-3)


def test_swapping_leaves_other_modules_and_counts_every_group_norm(tiny_pixel_model):
    unet = load_backend(tiny_pixel_model).unet
    before = sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    swapped = with_group_stats_norms(unet)
    assert before > 0
    assert sum(isinstance(m, GroupStatsNorm) for m in swapped.modules()) == before
    assert not any(type(m) is torch.nn.GroupNorm for m in swapped.modules())


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_draw_matches_eager_and_leaves_the_model_alone(tiny_pixel_model):
    backend = load_backend(tiny_pixel_model)
    weights = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    norms = [type(m) for m in backend.unet.modules()]
    eager = sample(backend, 6, seed=3, steps=4, scheduler="ddpm", batch_size=3, precision="bf16")
    full = sample(backend, 6, seed=3, steps=4, scheduler="ddpm", batch_size=3, precision="bf16", compiled=True)
    filled = sample(backend, 5, seed=3, steps=4, scheduler="ddpm", batch_size=3, precision="bf16", compiled=True)
    # the last batch (seeds 6, 7) is filled up with seed 8 and its sample dropped: the kept ones are exact
    assert filled.images.shape[0] == 5 and torch.equal(filled.images, full.images[:5])
    assert filled.seeds == list(range(3, 8))
    # bf16-sized differences from the eager network, nothing more
    assert (full.images - eager.images).abs().mean() < 0.02
    assert [type(m) for m in backend.unet.modules()] == norms
    assert all(torch.equal(v, weights[k]) for k, v in backend.unet.state_dict().items())
    # the compiled copy shares the weights, and a new copy after the weights changed (a model being
    # trained, measured at checkpoints) draws with the new weights and reuses the compiled kernels
    assert compiled_backend(backend).unet._orig_mod.conv_in.weight is backend.unet.conv_in.weight
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        backend.unet.conv_out.bias.add_(0.5)
    moved = sample(backend, 6, seed=3, steps=4, scheduler="ddpm", batch_size=3, precision="bf16", compiled=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(moved.images, full.images)
