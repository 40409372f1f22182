"""The one training loop every method and every model family shares: config, loop and save.

    result = unlearn(backend, forget_x0, retain_x0, UnlearnConfig(method="retrack"), on_step=print)
    save_model(backend, "out/unlearned", result.metadata())

Per step: draw a forget batch (with each row's K nearest retain neighbours) and an independent
retain batch, call the objective, back-propagate (or, for EraseDiff/SISS, take the two gradients
separately and combine them after accumulation), average gradients across processes, clip the
global norm, take an AdamW step, report a `StepEvent`. Runs on `accelerate`'s process state, so
`accelerate launch --num_processes N` gives data parallelism with no code change: each process
draws its own rows and gradients are averaged before the update, so all copies stay identical.

Around the loop, each in its own module: `checks` refuses a bad request before any work,
`devices` resolves the device and the precision, `gradients` takes each step's gradient,
`errors` holds what a run raises and `reports` what it reports.

Mixed precision is torch autocast; fp16 adds torch's gradient scaler (`torch.amp.GradScaler`), so
small gradients do not underflow and a step whose gradients overflow is skipped, not fatal. A
config that leaves mixed precision unset takes what `accelerate launch --mixed_precision` (or
`accelerate config`) chose. Why not `accelerate.Accelerator.prepare`: see `unlearn`.

The backend's network is trained in place; the folder it was loaded from is never written.
Results are saved by `save_model`, atomically, to a new folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import Tensor

from .atomic import write_folder_atomically
from .backends.base import Backend
from .checks import check_range, check_request, check_sets
from .devices import AUTOCAST_DTYPES, resolve_device, resolve_precision, training_device
from .errors import Cancelled, Diverged, out_of_memory_reported
from .gradients import MicroBatches, StepGradients
from .neighbours import DEFAULT_CACHE, nearest_neighbours
from .objectives import METHODS, Params
from .presets import DEFAULTS, PRESETS
from .reports import StepEvent, UnlearnResult

# fp16: attempts in a row whose gradients overflow before the run counts as diverged. The scaler
# halves its scale at each one, so by then the scale has fallen by 2**20 from where it stood.
MAX_OVERFLOWS_IN_A_ROW = 20


@dataclass
class UnlearnConfig:
    """Every setting of one run. Defaults: `presets.DEFAULTS` (the MNIST preset); other families
    start from `UnlearnConfig.preset(name)`."""

    method: str = "retrack"
    k: int = DEFAULTS["k"]
    lam: float = DEFAULTS["lam"]
    lr: float = DEFAULTS["lr"]
    betas: tuple[float, float] = DEFAULTS["betas"]
    weight_decay: float = DEFAULTS["weight_decay"]
    batch_size: int = DEFAULTS["batch_size"]  # rows per branch per optimiser step (split across processes)
    grad_accum: int = DEFAULTS["grad_accum"]
    steps: int = DEFAULTS["steps"]
    clip_norm: float = DEFAULTS["clip_norm"]
    seed: int = DEFAULTS["seed"]
    eta: float = DEFAULTS["eta"]
    siss_lambda: float = DEFAULTS["siss_lambda"]
    siss_c: float = DEFAULTS["siss_c"]
    # "no" (fp32), "bf16" or "fp16" (autocast; fp16 with gradient scaling); None: what `accelerate
    # launch --mixed_precision` / `accelerate config` chose, else "no" (see resolve_precision).
    mixed_precision: Optional[str] = None
    device: str = "auto"  # "auto" (GPU when present), "cpu", "cuda", "cuda:1", ...

    @classmethod
    def preset(cls, name: str, **overrides) -> "UnlearnConfig":
        """The published settings of one benchmark family ('mnist', 'cifar', 'celeba', 'sd')."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def validate(self) -> None:
        """Refuse settings that cannot work, before any work starts. (K against the retain set's
        size, and the set sizes, are `check_request`'s: they need the sets.)"""
        def finite(name: str, value: float) -> None:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("lam", "lr", "weight_decay", "clip_norm", "eta", "siss_lambda", "siss_c"):
            finite(name, getattr(self, name))
        for name in ("k", "batch_size", "grad_accum", "steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        check_range("lambda", self.lam, 0, 1)
        check_range("learning rate", self.lr, 0, 1, open_low=True)
        check_range("steps", self.steps, 1, 1_000_000)
        check_range("batch size", self.batch_size, 1, 65_536)
        check_range("gradient accumulation", self.grad_accum, 1, 4096)
        check_range("weight decay", self.weight_decay, 0, 1)
        check_range("the seed", self.seed, 0, 2**32, open_high=True)
        check_range("SISS mixture weight", self.siss_lambda, 0, 1, open_low=True, open_high=True)
        if self.clip_norm <= 0:
            raise ValueError(f"clip norm must be positive, got {self.clip_norm}")
        if self.eta < 0:
            raise ValueError(f"EraseDiff eta must not be negative, got {self.eta}")
        if self.siss_c <= 0:
            raise ValueError(f"SISS C must be positive, got {self.siss_c}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW betas must be two numbers in [0, 1), got {self.betas}")
        resolve_precision(self.mixed_precision)  # an unknown mode is refused here, wherever it came from
        resolve_device(self.device)  # an unknown or absent device is refused here too

    def params(self) -> Params:
        return Params(lam=self.lam, eta=self.eta, siss_lambda=self.siss_lambda, siss_c=self.siss_c)


def unlearn(
    backend: Backend,
    forget: Tensor,
    retain: Tensor,
    config: UnlearnConfig,
    *,
    forget_cond: Optional[Tensor] = None,
    retain_cond: Optional[Tensor] = None,
    neighbours: Optional[Tensor] = None,
    on_step: Optional[Callable[[StepEvent], None]] = None,
    cancel: Optional[threading.Event] = None,
    knn_cache: Optional[Path] = DEFAULT_CACHE,
    until: Optional[Callable[[StepEvent], bool]] = None,
) -> UnlearnResult:
    """Fine-tune `backend.unet` to forget `forget` (x0 rows) while keeping `retain` (x0 rows).

    `until`, when given, is asked after every step (and `on_step`) whether to stop there, e.g.
    `stopping.UntilForgotten`; `config.steps` is then the cap.

    Raises ValueError for unusable inputs (before any work), Cancelled if `cancel` is set,
    Diverged if a loss or gradient becomes non-finite (in fp16: if the gradients overflow in
    MAX_OVERFLOWS_IN_A_ROW attempts in a row), and OutOfMemory if the device runs out of memory.

    Built on accelerate's process state, torch's autocast and torch's GradScaler rather than on
    `accelerate.Accelerator.prepare`: EraseDiff and SISS take two separate gradients per
    micro-batch (`torch.autograd.grad`) and combine them nonlinearly after accumulation. DDP, what
    `prepare` wraps a model in, averages only gradients that `.backward()` accumulates, and
    FSDP/DeepSpeed shard the parameters those gradients are taken of. So gradients are averaged
    here, with accelerate's `reduce`, after accumulation and before any combination, which keeps
    every method exact on any number of processes; FSDP and DeepSpeed configs are not used.
    """
    config = replace(config, mixed_precision=resolve_precision(config.mixed_precision))  # results record what ran
    check_request(config, forget.shape[0], retain.shape[0], neighbours_given=neighbours is not None)
    forget, retain = forget.detach().float().cpu(), retain.detach().float().cpu()
    check_sets(forget, retain)
    method = METHODS[config.method]
    device = training_device(config.device)
    state = PartialState(cpu=device == "cpu")
    world, rank = state.num_processes, state.process_index
    if config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} does not split evenly over {world} processes")

    with out_of_memory_reported(device, config.batch_size):
        start = time.perf_counter()
        distances = None
        if method.needs_neighbours and neighbours is None:
            distances, neighbours = nearest_neighbours(forget, retain, config.k, cache_dir=knn_cache)
        knn_seconds = time.perf_counter() - start

        unet = backend.unet.to(device)
        unet.train()
        # Each process draws its own rows and noise; all are reproducible from the seed.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank)
        batches = MicroBatches(forget, retain, neighbours, forget_cond, retain_cond, config.batch_size // world,
                               generator, device)
        steps = _Steps(backend, config, batches, generator, device, world)
        try:
            events = steps.run(start, on_step, cancel, until)
        finally:
            steps.optimiser.zero_grad(set_to_none=True)
            unet.eval()

    return UnlearnResult(config=config, events=events, seconds=time.perf_counter() - start, knn_seconds=knn_seconds,
                         neighbours=neighbours, neighbour_distances=distances, source=backend.source,
                         n_forget=forget.shape[0], n_retain=retain.shape[0], world_size=world,
                         overflow_skips=steps.overflows,
                         process_digests=gather_object([weights_digest(unet)]) if world > 1 else None)


class _Steps:
    """The optimiser steps of one run: AdamW on the backend's trainable parameters, autocast in
    the run's precision, and (fp16 only) torch's gradient scaler.

    fp16 only (bf16 has fp32's range): losses are multiplied by a power-of-two scale before
    backward so small gradients survive in fp16, gradients are divided by it again before
    clipping, and a step whose gradients overflowed is skipped while the scale is halved.
    Disabled, the scaler passes everything through (scale 1, a plain optimiser step).
    """

    def __init__(self, backend: Backend, config: UnlearnConfig, batches: MicroBatches, generator: torch.Generator,
                 device: str, world: int):
        self.config = config
        self.parameters = backend.trainable_parameters()
        self.optimiser = torch.optim.AdamW(self.parameters, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        device_type = torch.device(device).type
        dtype = AUTOCAST_DTYPES[config.mixed_precision]
        autocast = nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device_type, enabled=config.mixed_precision == "fp16")
        self.gradients = StepGradients(backend, METHODS[config.method], config.params(), self.parameters, batches,
                                       generator, autocast, self.scaler, micro_batches=config.grad_accum, world=world)
        self.overflows = 0  # fp16: attempts skipped (and redone) because their gradients overflowed

    def run(self, start: float, on_step: Optional[Callable[[StepEvent], None]],
            cancel: Optional[threading.Event], until: Optional[Callable[[StepEvent], bool]] = None) -> list[StepEvent]:
        """Take `config.steps` optimiser steps (an fp16 attempt whose gradients overflowed is
        redone), or fewer where `until` says stop; report each one. `start`: when the run started
        (k-NN included)."""
        config, scaler = self.config, self.scaler
        events: list[StepEvent] = []
        overflows_in_a_row = 0
        while len(events) < config.steps:
            step = len(events) + 1
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after {step - 1} of {config.steps} steps")
            t0 = time.perf_counter()
            sums = self.gradients.accumulate(step)
            scaler.unscale_(self.optimiser)  # true gradients from here on (a no-op unless fp16)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, config.clip_norm))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise Diverged(f"the gradient norm became {grad_norm} at step {step}; try a lower learning rate")
            scaler.step(self.optimiser)  # fp16: no update when the gradients overflowed
            scaler.update()
            self.optimiser.zero_grad(set_to_none=True)
            if not math.isfinite(grad_norm):  # fp16 overflow: the step is redone with the lowered scale
                self.overflows, overflows_in_a_row = self.overflows + 1, overflows_in_a_row + 1
                if overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
                    raise Diverged(f"the fp16 gradients overflowed in {overflows_in_a_row} attempts in a row at "
                                   f"step {step}; try bf16, fp32 (mixed precision 'no') or a lower learning rate")
                continue
            overflows_in_a_row = 0
            now = time.perf_counter()
            event = StepEvent(step, config.steps, *map(float, sums), grad_norm, now - start, now - t0)
            events.append(event)
            if on_step is not None:
                on_step(event)
            if until is not None and until(event):
                break
        return events


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of `module`, in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()


def save_model(backend: Backend, out_dir: Union[str, Path], metadata: dict, overwrite: bool = False,
               extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Write the model folder plus retrack.json atomically: the folder appears complete or not at all.

    ``extra_files`` (file name -> bytes) are written into the folder with it, e.g. a training
    state that must always match the saved weights.
    """
    out = Path(out_dir).absolute()
    if backend.source and Path(backend.source).exists() and out.resolve() == Path(backend.source).resolve():
        raise ValueError(f"{out} is the source model folder; the source model is never overwritten")

    def write(tmp: Path) -> None:
        backend.save_pretrained(tmp)
        (tmp / "retrack.json").write_text(json.dumps(metadata, indent=2, default=str))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)

    return write_folder_atomically(out, write, overwrite)
