"""What an unlearning run reports: a `StepEvent` after every step, an `UnlearnResult` at the end.

    result = unlearn(backend, forget, retain, config, on_step=lambda event: print(event.loss))
    save_model(backend, "out/unlearned", result.metadata())  # metadata() becomes retrack.json

The CLI's progress bar, the app's live plot and `stopping.UntilForgotten` read the events; the
result says how the model was made, enough to reproduce it. (A benchmark's record of the machine
and its load is another thing: `runrecord`.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

from torch import Tensor

from .runrecord import timestamp

if TYPE_CHECKING:  # the engine, which makes these reports, imports this module
    from .engine import UnlearnConfig


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
    """What `unlearn` returns: the settings that ran, every step's event, timings and sizes."""

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
    # Several processes: each one's `engine.weights_digest` of the trained network, in process order.
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
