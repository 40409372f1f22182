"""The built-in DDPM ("model", trained on everything) and its oracle (on the digits only).

One run: set up the networks, optimiser and random generator (`set_up`), continue a checkpoint
exactly when --checkpoint-dir holds one (`resume`), run the shared loop saving checkpoints
(`save_checkpoint`), then save the EMA pipeline with its record and card. A checkpoint folder is
the EMA pipeline plus TRAINING_STATE; the keys of that file are a format that running and earlier
trainings rely on: change them only together with a reader of the old ones.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from retrack.backends.pixel import PixelBackend
from retrack.data import BuiltinDataset
from retrack.engine import save_model
from retrack.images import uint8_to_tensor
from retrack.runrecord import describe_machine

from .cards import write_card
from .data import dataset_description
from .networks import NUM_TRAIN_TIMESTEPS, unet_config
from .runtime import fused, log, uses_bf16
from .training import run_training, stage_summary

# File in a checkpoint folder holding everything an exact resume needs (weights, EMA, optimiser,
# random generator, step count), saved together with the EMA pipeline by engine.save_model.
TRAINING_STATE = "training_state.pt"


@dataclass
class DdpmRun:
    """What one DDPM training run updates, and what an exact resume restores."""

    part: str
    args: argparse.Namespace
    config: dict
    unet: UNet2DModel
    ema_unet: UNet2DModel
    scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start_step: int = 0
    earlier: list = field(default_factory=list)  # summaries of the runs this one continues

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


def train_ddpm(part: str, args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> dict:
    """Train the built-in DDPM ("model", on everything) or the oracle (on the digits only)."""
    data = uint8_to_tensor(dataset.images if part == "model" else dataset.retain_images, device=device)
    run = set_up(part, args, device)
    checkpoint_folder = args.checkpoint_dir / part if args.checkpoint_dir else None
    if checkpoint_folder and (checkpoint_folder / TRAINING_STATE).is_file():
        resume(run, checkpoint_folder, device)
    log(part, f"{len(data)} training images, {run.n_parameters:,} parameters, batch {args.batch}, "
              f"device {describe_machine(str(device))}")

    def describe(record: dict) -> dict:
        return training_info(run, record, dataset, len(data))

    def checkpoint(record: dict) -> None:
        save_checkpoint(run, checkpoint_folder, record, describe(record), device)

    record = run_training(part, args, device, run.optimizer, args.lr, ddpm_loss(run, data, device),
                          ema_update(run), run.start_step, checkpoint if checkpoint_folder else None)
    info = describe(record)
    folder = save_model(PixelBackend(run.ema_unet.cpu(), run.scheduler), args.out / part, info, overwrite=True)
    write_card(folder)
    log(part, f"saved {folder} after {info['total_steps']} steps in total")
    return info


def set_up(part: str, args: argparse.Namespace, device: torch.device) -> DdpmRun:
    """Fresh networks (or, with --resume, the saved EMA weights in --out and a fresh optimiser),
    the EMA copy, AdamW and the run's generator. The order of the random draws (torch's global
    seed, then the two networks) is what makes the same seed give the same run."""
    torch.manual_seed(args.seed)
    config = unet_config(args.setting)
    earlier: list = []
    if args.resume:
        # Continue a time-boxed training: start from the saved EMA weights with a fresh optimiser.
        previous = json.loads((args.out / part / "retrack.json").read_text())
        earlier = previous.get("earlier_stages", []) + [stage_summary(previous)]
        unet = UNet2DModel.from_pretrained(args.out / part, subfolder="unet", use_safetensors=True).to(device).train()
    else:
        unet = UNet2DModel(**config).to(device).train()
    ema_unet = UNet2DModel(**config).to(device).eval().requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    optimizer = torch.optim.AdamW(list(unet.parameters()), lr=args.lr, weight_decay=0.0, **fused(device))
    generator = torch.Generator(device).manual_seed(_generator_seed(part, args))
    return DdpmRun(part, args, config, unet, ema_unet, DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS),
                   optimizer, generator, earlier=earlier)


def _generator_seed(part: str, args: argparse.Namespace) -> int:
    return args.seed + (1 if part == "oracle" else 0)


def _config_as_stored(config: dict) -> dict:
    """The network configuration as a checkpoint stores it (JSON types: tuples become lists)."""
    return json.loads(json.dumps(config))


def resume(run: DdpmRun, folder: Path, device: torch.device) -> None:
    """Continue the checkpoint in ``folder``: weights, EMA, optimiser, step count and earlier
    stages; the generator too when it was drawn on this device type (then the run continues bit
    for bit). Refuse a checkpoint of another part, setting or network."""
    state = torch.load(folder / TRAINING_STATE, map_location=device, weights_only=True)
    part, setting = run.part, run.args.setting
    if state["part"] != part or state["setting"] != setting or state["unet_config"] != _config_as_stored(run.config):
        raise SystemExit(f"{folder} holds a checkpoint of {state['part']} (setting {state['setting']}, "
                         f"network {state['unet_config']}), not of {part} (setting {setting}): "
                         "pass another --checkpoint-dir")
    run.unet.load_state_dict(state["unet"])
    run.ema_unet.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.start_step, run.earlier = state["step"], state["stages"]
    if state.get("generator_device", "cpu") == device.type:  # the first v2 checkpoints predate the key
        run.generator.set_state(state["generator"])
        log(part, f"resuming {folder} exactly at step {run.start_step}")
    else:
        # A CPU generator's state does not fit a CUDA generator: same weights and optimiser,
        # new random draws (seeded by the step), so the run continues but not bit for bit.
        run.generator.manual_seed(_generator_seed(part, run.args) + 1_000_003 * run.start_step)
        log(part, f"resuming {folder} at step {run.start_step} on {device.type} "
                  f"(checkpoint drawn on {state.get('generator_device', 'cpu')}: new random draws)")


def save_checkpoint(run: DdpmRun, folder: Path, record: dict, info: dict, device: torch.device) -> None:
    """Save the EMA pipeline with ``info`` as its retrack.json and TRAINING_STATE beside it."""
    state = {"part": run.part, "setting": run.args.setting, "unet_config": _config_as_stored(run.config),
             "step": record["start_step"] + record["steps"], "stages": run.earlier + [stage_summary(record)],
             "unet": run.unet.state_dict(), "ema": run.ema_unet.state_dict(), "optimizer": run.optimizer.state_dict(),
             "generator": run.generator.get_state(), "generator_device": device.type}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    save_model(PixelBackend(copy.deepcopy(run.ema_unet).cpu(), run.scheduler), folder, info,
               overwrite=True, extra_files={TRAINING_STATE: buffer.getvalue()})
    log(run.part, f"checkpoint at step {state['step']} in {folder}")


def ddpm_loss(run: DdpmRun, data: torch.Tensor, device: torch.device) -> Callable[[int], torch.Tensor]:
    """The loss of one step: a batch of training images noised to random timesteps, drawn from
    the run's generator, and the mean squared error of the predicted noise."""
    batch = run.args.batch
    alphas_cumprod = run.scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=uses_bf16(run.args, device))

    def loss(step: int) -> torch.Tensor:
        index = torch.randint(0, len(data), (batch,), device=device, generator=run.generator)
        x0 = data[index]
        noise = torch.randn(x0.shape, device=device, generator=run.generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device, generator=run.generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        with autocast:
            predicted = run.unet(x_t, t).sample
        return F.mse_loss(predicted.float(), noise)  # the standard mean-over-elements DDPM loss

    return loss


def ema_update(run: DdpmRun) -> Callable[[int], None]:
    """The EMA step after each update, with warm-up: early weights are averaged briefly, later
    ones over ~1/(1-decay) steps."""
    params, ema_params = list(run.unet.parameters()), list(run.ema_unet.parameters())

    def update(step: int) -> None:
        decay = min(run.args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():  # else autograd would record the update and chain every step's graph
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    return update


def training_info(run: DdpmRun, record: dict, dataset: BuiltinDataset, n_train_images: int) -> dict:
    """retrack.json of the DDPM after ``record``'s run, totals over the earlier stages included."""
    args, stages = run.args, run.earlier + [record]
    return {
        **record,
        "kind": "ddpm",
        "setting": args.setting,
        "trained_on": ("all images: digits + T-shirt copies" if run.part == "model"
                       else "retain images only: the digits, no T-shirt (the retrained oracle)"),
        "n_train_images": n_train_images,
        "dataset": dataset_description(args, dataset),
        "images_seen": record["steps"] * args.batch,
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0, "warmup_steps": args.warmup_steps,
                      "grad_clip": 1.0},
        "ema_decay": args.ema_decay,
        "loss": "mean squared error of the predicted noise, mean over elements (epsilon prediction)",
        "unet_config": run.config,
        "parameters": run.n_parameters,
        "scheduler": f"DDPMScheduler(num_train_timesteps={NUM_TRAIN_TIMESTEPS}), linear betas",
        "saved": "EMA weights",
        "earlier_stages": run.earlier,
        "total_steps": sum(stage["steps"] for stage in stages),
        "total_images_seen": sum(stage["steps"] * stage["batch"] for stage in stages),
    }
