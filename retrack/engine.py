"""The one training loop every method and every model family shares.

    result = unlearn(backend, forget_x0, retain_x0, UnlearnConfig(method="retrack"), on_step=print)
    save_model(backend, "out/unlearned", result.metadata())

Per step: draw a forget batch (with each row's K nearest retain neighbours) and an independent
retain batch, call the objective, back-propagate (or, for EraseDiff/SISS, take the two gradients
separately and combine them after accumulation), average gradients across processes, clip the
global norm, take an AdamW step, report a `StepEvent`. Runs on `accelerate`'s process state, so
`accelerate launch --num_processes N` gives data parallelism with no code change: each process
draws its own rows and gradients are averaged before the update, so all copies stay identical.

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
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_choice_from_env, reduce
from torch import Tensor

from .atomic import write_folder_atomically
from .backends.base import Backend
from .neighbours import DEFAULT_CACHE, check_neighbour_count, nearest_neighbours
from .objectives import METHODS, Batch, Params
from .presets import DEFAULTS, PRESETS
from .runrecord import timestamp

# Mixed precision: the autocast dtype of each mode ("no" = fp32 throughout, the published setting).
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16: attempts in a row whose gradients overflow before the run counts as diverged. The scaler
# halves its scale at each one, so by then the scale has fallen by 2**20 from where it stood.
MAX_OVERFLOWS_IN_A_ROW = 20


class Cancelled(Exception):
    """The run was cancelled from another thread; nothing was saved."""


class Diverged(RuntimeError):
    """A loss or gradient became NaN/inf; the run stopped and nothing was saved."""


class OutOfMemory(RuntimeError):
    """The device (GPU or CPU) ran out of memory; the run stopped and nothing was saved."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory: torch's OutOfMemoryError (CUDA),
    MemoryError, or the RuntimeError other allocators raise ("DefaultCPUAllocator: can't
    allocate memory", "MPS backend out of memory", cuBLAS failing to allocate its workspace)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and not isinstance(exc, (Diverged, OutOfMemory)) and any(
        sign in message for sign in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


def check_range(label: str, value: float, low: float, high: float, *, open_low: bool = False,
                open_high: bool = False) -> None:
    """Refuse (ValueError) a setting outside [low, high]; open_low/open_high exclude an end."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        shown_high = "2**32" if high == 2**32 else str(high)
        raise ValueError(f"{label} must lie in {left}{low}, {shown_high}{right}, got {value}")


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


@dataclass
class StepEvent:
    """What one optimiser step reports (the CLI progress bar and the app's live plot read it)."""

    step: int  # 1-based
    steps: int
    loss: float  # the method's total objective (for two-gradient methods: retain + or - forget)
    unlearn: float  # the unlearning / forget term
    retain: float  # the retain term
    grad_norm: float  # before clipping
    seconds: float  # since the run started (k-NN included)
    step_seconds: float


@dataclass
class UnlearnResult:
    config: UnlearnConfig
    events: list[StepEvent]
    seconds: float  # whole run, k-NN included
    knn_seconds: float
    neighbours: Optional[Tensor]  # (N_u, K) indices into the retain set, for ReTrack
    neighbour_distances: Optional[Tensor]
    source: str
    n_forget: int
    n_retain: int
    world_size: int = 1
    overflow_skips: int = 0  # fp16: attempts skipped (and redone) because their gradients overflowed
    # Several processes: each one's `weights_digest` of the trained network, in process order.
    # Gradients are averaged before every update, so they must all be equal.
    process_digests: Optional[list[str]] = None

    @property
    def seconds_per_step(self) -> float:
        train = self.seconds - self.knn_seconds
        return train / max(1, len(self.events))

    def metadata(self, **extra) -> dict:
        """How the result was made: enough to reproduce it."""
        return {
            "method": self.config.method,
            "config": asdict(self.config),
            "source_model": self.source,
            "n_forget": self.n_forget,
            "n_retain": self.n_retain,
            "steps_done": len(self.events),
            "seconds": round(self.seconds, 3),
            "knn_seconds": round(self.knn_seconds, 3),
            "seconds_per_step": round(self.seconds_per_step, 4),
            "final_loss": self.events[-1].loss if self.events else None,
            "processes": self.world_size,
            "mixed_precision": self.config.mixed_precision,
            "fp16_overflow_skips": self.overflow_skips,
            **({"weights_sha256_per_process": self.process_digests} if self.process_digests else {}),
            "created": timestamp(),
            **extra,
        }


def preset_for(backend: Backend) -> str:
    """The published settings closest to a model: 'sd' for latent models, else by image size."""
    if backend.family == "latent":
        return "sd"
    if backend.channels == 1 and backend.image_size <= 32:
        return "mnist"
    return "cifar" if backend.image_size <= 64 else "celeba"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; other names are checked (ValueError)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("an Apple GPU (mps) was asked for but is not available here")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("a CUDA device was asked for but no GPU is available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"there is no {device} here: {torch.cuda.device_count()} GPU(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
    return device


def training_device(requested: str) -> str:
    """The device a run trains on: `requested` ('auto', 'cpu', 'cuda:1', ...) resolved, or under
    `accelerate launch` with several GPU processes, this process's own GPU. Load the model there
    before encoding images, so the VAE encodes on the device the UNet trains on."""
    device = resolve_device(requested)
    state = PartialState(cpu=device == "cpu")
    if device != "cpu" and state.num_processes > 1:
        return str(state.device)
    return device


def resolve_precision(requested: Optional[str]) -> str:
    """The mixed precision of a run: 'no' (fp32), 'bf16' or 'fp16'.

    None (not set) takes what `accelerate launch --mixed_precision` or `accelerate config` chose:
    accelerate hands it to the processes it starts as ACCELERATE_MIXED_PRECISION. Read from there,
    not from an `Accelerator`: accelerate's state fixes the precision once per process, and the
    app runs jobs with different settings in one process.
    """
    mode = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no") if requested is None else requested
    if mode not in AUTOCAST_DTYPES:
        where = " (set by accelerate launch or accelerate config)" if requested is None else ""
        raise ValueError(f"mixed precision must be 'no', 'bf16' or 'fp16', got {mode!r}{where}")
    return mode


@contextmanager
def out_of_memory_reported(device: str, config: UnlearnConfig) -> Iterator[None]:
    """Turn the device running out of memory inside the block into OutOfMemory, with what to try.

    The failed run's tensors are released first (the frames the error passed through are
    cleared and the CUDA cache emptied), so the process can go on with other work.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        traceback.clear_frames(exc.__traceback__)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        hint = ("lower the batch size and raise gradient accumulation to keep the same effective batch"
                + ("" if device == "cpu" else ", or use mixed precision (bf16/fp16)"))
        where = "the CPU" if device == "cpu" else f"the GPU ({device})"
        raise OutOfMemory(f"{where} ran out of memory with batch size {config.batch_size} "
                          f"({type(exc).__name__}); {hint}") from None


def _rows(x: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    """Select rows of a per-item tensor; a single row (one shared prompt) is broadcast."""
    if x is None:
        return None
    return x.expand(len(idx), *x.shape[1:]) if x.shape[0] == 1 else x[idx]


def check_request(config: UnlearnConfig, n_forget: int, n_retain: int, *, neighbours_given: bool = False) -> None:
    """The one check of an unlearning request, before any work: the settings
    (`UnlearnConfig.validate`), the set sizes, and K against the retain set
    (`neighbours.check_neighbour_count`; for methods that use neighbours, unless they are given).
    The library (`unlearn`, `split.unlearn_prompt`), the CLI and the app all call it, so a bad
    request gets the same message wherever it comes from. Raises ValueError."""
    config.validate()
    if n_forget == 0:
        raise ValueError("the forget set is empty: choose at least one image to forget")
    if n_retain == 0:
        raise ValueError("the retain set is empty")
    uses_retain_neighbours = METHODS[config.method].needs_neighbours and not neighbours_given
    check_neighbour_count(config.k, n_retain if uses_retain_neighbours else None)


def check_sets(forget: Tensor, retain: Tensor) -> None:
    """Refuse set contents the method cannot use (mismatched, non-finite, overlapping); their
    sizes are `check_request`'s."""
    if forget.shape[1:] != retain.shape[1:]:
        raise ValueError(f"forget items {tuple(forget.shape[1:])} and retain items {tuple(retain.shape[1:])} differ in shape")
    if not (torch.isfinite(forget).all() and torch.isfinite(retain).all()):
        raise ValueError("the forget or retain data contain NaN/inf values")
    forget_rows = {forget[i].numpy().tobytes() for i in range(forget.shape[0])}
    overlap = sum(retain[i].numpy().tobytes() in forget_rows for i in range(retain.shape[0]))
    if overlap == retain.shape[0]:
        raise ValueError("the retain set holds only forget items: nothing would be left to learn from")
    if overlap:
        raise ValueError(f"{overlap} retain item(s) are copies of forget items; remove them from the retain set")


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

    with out_of_memory_reported(device, config):
        start = time.perf_counter()
        distances = None
        if method.needs_neighbours and neighbours is None:
            distances, neighbours = nearest_neighbours(forget, retain, config.k, cache_dir=knn_cache)
        knn_seconds = time.perf_counter() - start

        unet = backend.unet.to(device)
        unet.train()
        # Each process draws its own rows and noise; all are reproducible from the seed.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank)
        sampler = _BatchSampler(forget, retain, neighbours, forget_cond, retain_cond, config.batch_size // world,
                                generator, device)
        steps = _Steps(backend, config, sampler, generator, device, world)
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


@dataclass
class _BatchSampler:
    """Draws one micro-batch: forget rows with each row's K nearest retain neighbours (or, for
    methods without neighbours, the row itself) and an independent retain batch, moved to the
    training device."""

    forget: Tensor
    retain: Tensor
    neighbours: Optional[Tensor]  # (N_u, K) indices into retain
    forget_cond: Optional[Tensor]
    retain_cond: Optional[Tensor]
    rows: int  # per branch, on this process
    generator: torch.Generator
    device: str

    def draw(self) -> Batch:
        fi = torch.randint(self.forget.shape[0], (self.rows,), generator=self.generator)
        ri = torch.randint(self.retain.shape[0], (self.rows,), generator=self.generator)
        nbrs = self.retain[self.neighbours[fi]] if self.neighbours is not None else self.forget[fi].unsqueeze(1)
        to = lambda x: None if x is None else x.to(self.device, non_blocking=True)  # noqa: E731
        return Batch(forget=to(self.forget[fi]), neighbours=to(nbrs), retain=to(self.retain[ri]),
                     forget_cond=to(_rows(self.forget_cond, fi)), retain_cond=to(_rows(self.retain_cond, ri)))


class _Steps:
    """The optimiser steps of one run: AdamW on the backend's trainable parameters, autocast in
    the run's precision, and (fp16 only) torch's gradient scaler.

    fp16 only (bf16 has fp32's range): losses are multiplied by a power-of-two scale before
    backward so small gradients survive in fp16, gradients are divided by it again before
    clipping, and a step whose gradients overflowed is skipped while the scale is halved.
    Disabled, the scaler passes everything through (scale 1, a plain optimiser step).
    """

    def __init__(self, backend: Backend, config: UnlearnConfig, sampler: _BatchSampler, generator: torch.Generator,
                 device: str, world: int):
        self.backend, self.config, self.sampler, self.generator, self.world = backend, config, sampler, generator, world
        self.method, self.params = METHODS[config.method], config.params()
        self.parameters = backend.trainable_parameters()
        self.optimiser = torch.optim.AdamW(self.parameters, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        device_type = torch.device(device).type
        dtype = AUTOCAST_DTYPES[config.mixed_precision]
        self.autocast = nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device_type, enabled=config.mixed_precision == "fp16")
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
            sums = self.accumulate(step)
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

    def accumulate(self, step: int) -> Tensor:
        """Run one step's micro-batches and leave the step's gradient (averaged over
        micro-batches and processes, in the scaler's units) in each parameter's .grad.
        Returns the mean losses (total, unlearn, retain)."""
        config, method, scaler, parameters = self.config, self.method, self.scaler, self.parameters
        sums = torch.zeros(3, dtype=torch.float64)
        acc_retain = acc_unlearn = None
        for _ in range(config.grad_accum):
            with self.autocast:
                terms = method.objective(self.backend.denoise, self.sampler.draw(), self.backend.schedule,
                                         self.generator, self.params)
            values = torch.stack([terms.total, terms.unlearn, terms.retain]).detach().double().cpu()
            if not torch.isfinite(values).all() and not scaler.is_enabled():
                bad = [n for n, v in zip(("total", "unlearn", "retain"), values) if not math.isfinite(v)]
                raise Diverged(f"the {'/'.join(bad)} loss became {values[0].item()} at step {step}; "
                               f"try a lower learning rate or lambda")
            # (fp16: a non-finite loss gives non-finite gradients, and the scaler skips the step.)
            sums += values / config.grad_accum
            if method.combine is None:
                scaler.scale(terms.loss / config.grad_accum).backward()
                continue
            g_r, g_u = (_gradient(scaler.scale(term) / config.grad_accum, parameters, keep_graph=keep)
                        for term, keep in ((terms.retain, True), (terms.unlearn, False)))
            acc_retain = g_r if acc_retain is None else [a + g for a, g in zip(acc_retain, g_r)]
            acc_unlearn = g_u if acc_unlearn is None else [a + g for a, g in zip(acc_unlearn, g_u)]
        if method.combine is not None:
            # Combine only after accumulating and averaging: the combination is nonlinear.
            if self.world > 1:
                acc_retain, acc_unlearn = reduce(acc_retain, "mean"), reduce(acc_unlearn, "mean")
            combined = combine_in_scaler_units(method.combine, acc_retain, acc_unlearn, self.params, scaler.get_scale())
            for p, g in zip(parameters, combined):
                p.grad = g
        elif self.world > 1:
            grads = reduce([p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters], "mean")
            for p, g in zip(parameters, grads):
                p.grad = g
        return sums


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of `module`, in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()


def _gradient(loss: Tensor, parameters: list[torch.nn.Parameter], keep_graph: bool) -> list[Tensor]:
    """d loss / d parameters, with zeros for parameters the loss does not reach."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=keep_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters)]


def combine_in_scaler_units(combine: Callable[[list[Tensor], list[Tensor], Params], list[Tensor]],
                            g_retain: list[Tensor], g_unlearn: list[Tensor], params: Params,
                            scale: float) -> list[Tensor]:
    """EraseDiff/SISS: combine the two true gradients, and return the result in the gradient
    scaler's units (multiplied by `scale`), so one path (unscale, clip, step) serves every method.

    Both gradients arrive multiplied by the same loss scale (1 without fp16). The combinations are
    nonlinear (a projection; a rescaling to the fixed norm C), so they must see the true
    gradients: both are divided by the scale first. fp16 scales are powers of two, so dividing and
    multiplying by them is exact. When either gradient overflowed, their sum (non-finite) is
    returned instead, so the scaler sees the overflow and skips the step.
    """
    if not all(bool(torch.isfinite(g).all()) for g in (*g_retain, *g_unlearn)):
        return [r + u for r, u in zip(g_retain, g_unlearn)]
    if scale == 1.0:
        return combine(g_retain, g_unlearn, params)
    combined = combine([g / scale for g in g_retain], [g / scale for g in g_unlearn], params)
    return [g * scale for g in combined]


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
