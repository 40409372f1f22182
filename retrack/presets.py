"""The published settings of unlearning runs (docs/METHOD.md): the one place a default is written.

`engine.UnlearnConfig()` and `objectives.Params()` start from `DEFAULTS` (the MNIST preset);
`UnlearnConfig.preset(name)` starts from `PRESETS[name]`, and `preset_for(backend)` names the
preset of a model; the CLI and the app read their defaults from a config made there, never from
numbers of their own. They are starting points, not constants: every field can be overridden per
run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # named for type checkers only: this module stays free of torch and diffusers
    from .backends.base import Backend

# Per benchmark family: the settings the paper published for it.
PRESETS: dict[str, dict] = {
    "mnist": dict(lam=0.005, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6, batch_size=128, grad_accum=1, steps=50, eta=1e-3, siss_c=5.0),
    "cifar": dict(lam=0.02, lr=2e-5, betas=(0.95, 0.999), weight_decay=1e-6, batch_size=128, grad_accum=1, steps=60, eta=1e-3, siss_c=5.0),
    "celeba": dict(lam=0.005, lr=5e-6, betas=(0.95, 0.999), weight_decay=1e-6, batch_size=4, grad_accum=16, steps=40, eta=1e-3, siss_c=500.0),
    "sd": dict(lam=0.5, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, batch_size=1, grad_accum=16, steps=30, eta=1e-2, siss_c=750.0),
}

# Per benchmark family: how the released code draws its evaluation samples (docs/METHOD.md,
# "protocol"): diffusers' DDPMPipeline, i.e. ancestral DDPMScheduler sampling, with these steps.
EVALUATION_STEPS: dict[str, int] = {"mnist": 50, "cifar": 1000, "celeba": 50, "sd": 50}

# The same in every family: K = 10 neighbours everywhere, SISS's mixture weight 1/2, norm clip 1.
COMMON: dict = dict(k=10, clip_norm=1.0, seed=0, siss_lambda=0.5)

# Classifier-free guidance of text-to-image sampling: Stable Diffusion's own default (diffusers'
# StableDiffusionPipeline), which the released code samples its Stable Diffusion evaluation with.
GUIDANCE = 7.5

DEFAULT_PRESET = "mnist"
DEFAULTS: dict = {**COMMON, **PRESETS[DEFAULT_PRESET]}


def preset_for(backend: Backend) -> str:
    """The published settings closest to a model: 'sd' for latent models, else by image size."""
    if backend.family == "latent":
        return "sd"
    if backend.channels == 1 and backend.image_size <= 32:
        return "mnist"
    return "cifar" if backend.image_size <= 64 else "celeba"
