"""One optimiser step's gradient: draw its micro-batches, take each method's gradient, average.

    batches = MicroBatches(forget, retain, neighbours, forget_cond, retain_cond, rows, generator, device)
    gradients = StepGradients(backend, method, params, parameters, batches, generator, autocast, scaler,
                              micro_batches=config.grad_accum, world=processes)
    losses = gradients.accumulate(step)  # every parameter's .grad now holds the step's gradient

The training loop (`engine.unlearn`) calls `accumulate` once per step and then unscales, clips
and steps. Methods with one objective back-propagate it. EraseDiff and SISS take two gradients per
micro-batch (retain and forget, with `torch.autograd.grad`) and combine them nonlinearly, so both
are summed over the micro-batches and averaged over the processes first, and combined only then
(`combine_in_scaler_units`): that keeps gradient accumulation and data parallelism exact.

Gradients are left in the units of torch's gradient scaler (multiplied by the fp16 loss scale;
scale 1 without fp16), so one path (unscale, clip, step) serves every method and precision.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate.utils import reduce
from torch import Tensor

from .backends.base import Backend
from .errors import Diverged
from .objectives import Batch, Method, Params


@dataclass
class MicroBatches:
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
                     forget_cond=to(rows_of(self.forget_cond, fi)), retain_cond=to(rows_of(self.retain_cond, ri)))


def rows_of(x: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    """Select rows of a per-item tensor; a single row (one shared prompt) is broadcast."""
    if x is None:
        return None
    return x.expand(len(idx), *x.shape[1:]) if x.shape[0] == 1 else x[idx]


@dataclass
class StepGradients:
    """The gradient of each optimiser step of one run, written into the parameters' .grad."""

    backend: Backend
    method: Method
    params: Params
    parameters: list[torch.nn.Parameter]  # the ones the optimiser updates
    batches: MicroBatches
    generator: torch.Generator  # draws every t and noise
    autocast: AbstractContextManager  # the run's mixed precision (a no-op context in fp32)
    scaler: torch.amp.GradScaler  # shared with the loop, which unscales, clips and steps with it
    micro_batches: int  # per step (gradient accumulation)
    world: int  # processes, whose gradients are averaged

    def accumulate(self, step: int) -> Tensor:
        """Run one step's micro-batches and leave the step's gradient (averaged over
        micro-batches and processes, in the scaler's units) in each parameter's .grad.
        Returns the mean losses (total, unlearn, retain)."""
        method, scaler, parameters, micro_batches = self.method, self.scaler, self.parameters, self.micro_batches
        sums = torch.zeros(3, dtype=torch.float64)
        acc_retain = acc_unlearn = None
        for _ in range(micro_batches):
            with self.autocast:
                terms = method.objective(self.backend.denoise, self.batches.draw(), self.backend.schedule,
                                         self.generator, self.params)
            values = torch.stack([terms.total, terms.unlearn, terms.retain]).detach().double().cpu()
            if not torch.isfinite(values).all() and not scaler.is_enabled():
                bad = [n for n, v in zip(("total", "unlearn", "retain"), values) if not math.isfinite(v)]
                raise Diverged(f"the {'/'.join(bad)} loss became {values[0].item()} at step {step}; "
                               f"try a lower learning rate or lambda")
            # (fp16: a non-finite loss gives non-finite gradients, and the scaler skips the step.)
            sums += values / micro_batches
            if method.combine is None:
                scaler.scale(terms.loss / micro_batches).backward()
                continue
            g_r, g_u = (parameter_gradients(scaler.scale(term) / micro_batches, parameters, keep_graph=keep)
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


def parameter_gradients(loss: Tensor, parameters: list[torch.nn.Parameter], keep_graph: bool) -> list[Tensor]:
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
