"""The network compiled for drawing many samples (`SamplerSettings.compiled`, `sample(compiled=True)`).

`torch.compile` (inductor) fuses the UNet's many small memory-bound operations (GroupNorm, SiLU,
casts, adds: about half of the eager network's time on a CPU) into a few loops. On the 2-core CPU
it draws the built-in model about 1.7x faster than eager bf16 (benchmarks/results/
eval_speed-compare.md), after a first call of about 30 s that compiles it; inductor keeps its
kernels on disk, so a later process starts in a few seconds. That pays from about a thousand
samples: the benchmark, the curves and the model cards' 5,000-sample evaluations, not the app's 64.
It needs a C++ compiler on a CPU (inductor writes C++); without one it is refused up front.

GroupNorm is rewritten for it. Inductor stores convolution outputs channels-last on a CPU, and its
own GroupNorm kernel then reduces each group of two or three neighbouring channels with masked,
mostly empty vectors. `GroupStatsNorm` computes the same function from per-channel means
(reductions vectorised across all channels) averaged over each group by a small float32 matrix
product, first of x, then of its squared distance to that mean (two passes, so a large mean does
not cancel a small spread), and compiles about 10 % faster; eager it is slower, so only the compiled copy uses
it. Its statistics are float32 even under bf16 autocast, as nn.GroupNorm's are.

`compiled_backend` never touches the model it is given: it compiles a copy of the network's
modules that shares its weights (no second copy in memory), so a model being trained is drawn with
its current weights, and a new copy reuses the compiled kernels (torch treats the weights as inputs).
"""

from __future__ import annotations

import copy
import itertools
import shutil

import torch
from torch import Tensor

from .backends.base import Backend


class GroupStatsNorm(torch.nn.GroupNorm):
    """nn.GroupNorm with the group statistics taken from per-channel means (see the module docstring)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps, affine=True)
        per_group = num_channels // num_groups
        # (C, C): column c averages the channels of c's group
        average = torch.kron(torch.eye(num_groups), torch.full((per_group, per_group), 1.0 / per_group))
        self.register_buffer("group_average", average, persistent=False)

    @classmethod
    def like(cls, norm: torch.nn.GroupNorm) -> "GroupStatsNorm":
        """The same normalisation as `norm`, sharing its weight and bias."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps).to(norm.weight.device)
        new.weight, new.bias = norm.weight, norm.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        spatial = tuple(range(2, x.dim()))
        per_channel = (n, c) + (1,) * len(spatial)
        xf = x.float()
        with torch.autocast(x.device.type, enabled=False):  # the statistics stay float32
            mean = xf.mean(dim=spatial) @ self.group_average  # (N, C): each channel's group mean
            centred = xf - mean.view(per_channel)  # two passes: no cancellation at large means
            variance = (centred * centred).mean(dim=spatial) @ self.group_average
        scale = torch.rsqrt(variance + self.eps) * self.weight.float()
        shift = self.bias.float() - mean * scale
        return (xf * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)


def with_group_stats_norms(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every affine nn.GroupNorm inside it replaced by a `GroupStatsNorm` (in place)."""
    for name, child in module.named_children():
        if type(child) is torch.nn.GroupNorm and child.affine:
            setattr(module, name, GroupStatsNorm.like(child))
        else:
            with_group_stats_norms(child)
    return module


def compiled_backend(backend: Backend) -> Backend:
    """A shallow copy of `backend` whose network is a compiled copy of its modules sharing its weights."""
    if backend.device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise RuntimeError("compiled sampling on a CPU needs a C++ compiler (g++), and none is installed here; "
                           "draw without compiling (leave out --compiled / SamplerSettings.compiled)")
    tensors = itertools.chain(backend.unet.parameters(), backend.unet.buffers())
    shared = {id(tensor): tensor for tensor in tensors}  # deepcopy reuses these instead of copying them
    network = with_group_stats_norms(copy.deepcopy(backend.unet, memo=shared))
    compiled = copy.copy(backend)
    compiled.unet = torch.compile(network, dynamic=False)
    return compiled
