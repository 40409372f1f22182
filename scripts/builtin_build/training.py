"""The loop both trainings (DDPM and CLIP) share, its progress lines and the record (retrack.json)
of one training run."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from retrack.runrecord import describe_machine

from .runtime import build_command, log, uses_bf16, versions


def warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup_steps))


class ProgressLog:
    """Prints step, mean loss since the last line, steps/s and elapsed time every few seconds.

    Losses are summed on the device and read back only when a line is printed, so logging does
    not force a GPU sync every step.
    """

    def __init__(self, part: str, every_seconds: float, device: torch.device, start_step: int = 0) -> None:
        self.part, self.every = part, every_seconds
        self.start = self.last_time = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.count, self.last_step = 0, start_step
        self.last_mean = float("nan")

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.count += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def maybe_print(self, step: int, total_steps: int, force: bool = False) -> None:
        now = time.perf_counter()
        if (not force and now - self.last_time < self.every) or step == self.last_step:
            return
        if self.count:
            self.last_mean = float(self.loss_sum) / self.count
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        log(self.part, f"step {step}/{total_steps} loss {self.last_mean:.4f} {rate:.1f} steps/s {now - self.start:.0f}s")
        self.loss_sum.zero_()
        self.count, self.last_step, self.last_time = 0, step, now


def run_training(part: str, args: argparse.Namespace, device: torch.device, optimizer: torch.optim.Optimizer,
                 base_lr: float, compute_loss: Callable[[int], torch.Tensor],
                 after_step: Callable[[int], None], start_step: int = 0,
                 save_checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The loop both trainings share: linear warm-up, then a constant learning rate; clip the
    gradient norm to 1; stop at --steps (counted from step 0, so a resumed run continues to the
    same total) or at --max-seconds of this run, whichever comes first.

    ``save_checkpoint`` gets the record so far every --checkpoint-seconds and at the end.
    Returns the part of the record (retrack.json) that every trained part has; its "steps" are
    this run's, "start_step" where it began.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    progress = ProgressLog(part, args.log_seconds, device, start_step)
    step = start_step
    last_checkpoint = time.perf_counter()
    while step < args.steps and progress.elapsed() < args.max_seconds:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * warmup_factor(step, args.warmup_steps)
        loss = compute_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        after_step(step)
        progress.add(loss)
        step += 1
        progress.maybe_print(step, args.steps)
        if save_checkpoint and time.perf_counter() - last_checkpoint >= args.checkpoint_seconds:
            save_checkpoint(training_record(part, args, device, progress, start_step, step))
            last_checkpoint = time.perf_counter()
    progress.maybe_print(step, args.steps, force=True)
    record = training_record(part, args, device, progress, start_step, step)
    if save_checkpoint:
        save_checkpoint(record)
    return record


def training_record(part: str, args: argparse.Namespace, device: torch.device, progress: ProgressLog,
                    start_step: int, step: int) -> dict:
    """What every trained part's retrack.json records about the run that reached ``step``."""
    return {
        "part": part,
        "seed": args.seed,
        "start_step": start_step,
        "steps": step - start_step,
        "steps_requested": args.steps,
        "max_seconds": args.max_seconds,
        "batch": args.batch,
        "final_loss": progress.last_mean,
        "wall_seconds": round(progress.elapsed(), 1),
        "device": describe_machine(str(device)),
        "precision": "bf16 autocast" if uses_bf16(args, device) else ("tf32" if device.type == "cuda" else "fp32"),
        "versions": versions(),
        "command": build_command(),
    }


def stage_summary(record: dict) -> dict:
    """What the record of an earlier training run keeps (the cards list the stages)."""
    return {k: record.get(k) for k in ("steps", "batch", "wall_seconds", "final_loss", "device", "command")}
