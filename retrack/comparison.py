"""Methods side by side: one model, one forget set, the same seeds, a job per method, one after another.

    comparison = Comparison(model, forget, UnlearnConfig.preset("mnist"), ("retrack", "siss", "vanilla"),
                            EvalSettings(), Path("outputs/app")).start()
    for state in comparison.watch():
        print(state.message)

Each method runs as its own `jobs.Job` with the same training settings (only the method differs:
same data, steps, batch and optimiser, as the paper compares them) and the same evaluation, so
"before" and the oracle are the same samples for every method (the jobs' cache draws them once)
and every "after" comes from the same seeds. A method that fails (e.g. diverges) does not stop the
others; cancelling stops the running job and skips the ones still waiting.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from .engine import UnlearnConfig
from .job_settings import EvalSettings
from .jobs import Job, JobState, watch_changes
from .objectives import METHODS

if TYPE_CHECKING:
    from .forget_set import ForgetSet
    from .models import ModelInfo

MAX_METHODS = 3  # a row of grids stays readable, and three CPU runs already take a while


@dataclass(frozen=True)
class ComparisonState:
    """A snapshot: each method's job state, in the order the methods run. `revision` grows with
    every change; `finished` once the last job has ended (or the rest were skipped)."""

    methods: tuple[str, ...]
    states: tuple[JobState, ...]
    finished: bool = False
    revision: int = 0

    @property
    def message(self) -> str:
        """One line per method: its label and where it stands (a finished job's first line)."""
        return "\n".join(f"{METHODS[method].title}: {state.message.splitlines()[0] if state.message else state.phase}"
                         for method, state in zip(self.methods, self.states))

    @property
    def progress(self) -> float:
        """0..1 over all the jobs."""
        return sum(1.0 if state.finished else state.progress for state in self.states) / len(self.states)

    def first(self) -> JobState:
        """The first job's state: "before" and the oracle, the same for every method."""
        return self.states[0]


def check_methods(methods: tuple[str, ...]) -> None:
    """One to MAX_METHODS different, known methods."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not 1 <= len(methods) <= MAX_METHODS:
        raise ValueError(f"pick one to {MAX_METHODS} methods to run side by side (got {len(methods)})")
    if len(set(methods)) != len(methods):
        raise ValueError("each method can be picked once")


class Comparison:
    """The jobs of several methods, run one after another in a worker thread. Every job is made
    (and its settings checked: ValueError) before anything runs."""

    def __init__(self, model: ModelInfo, forget: ForgetSet, config: UnlearnConfig, methods: tuple[str, ...],
                 evaluation: EvalSettings, output_root: Path, training_prompt: str = ""):
        methods = tuple(methods)
        check_methods(methods)
        self.methods = methods
        self.jobs = [Job(model, forget, replace(config, method=method), evaluation, output_root, training_prompt)
                     for method in methods]
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-compare-{'-'.join(methods)}"
        self._states = [job.snapshot() for job in self.jobs]
        self._finished = False
        self._revision = 0
        self._changed = threading.Condition()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retrack-{self.id}", daemon=True)

    def start(self) -> "Comparison":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop the running job; the methods still waiting do not run."""
        self._cancel.set()
        for job in self.jobs:
            job.cancel()

    def snapshot(self) -> ComparisonState:
        with self._changed:
            return ComparisonState(self.methods, tuple(self._states), self._finished, self._revision)

    def watch(self, timeout: Optional[float] = None) -> Iterator[ComparisonState]:
        """Yield a snapshot after every change until every job has ended (the last one is final)."""
        return watch_changes(self._changed, lambda: self._revision, self.snapshot, timeout, f"comparison {self.id}")

    def _set(self, index: Optional[int] = None, state: Optional[JobState] = None, finished: bool = False) -> None:
        with self._changed:
            if index is not None:
                self._states[index] = state
            self._finished = finished
            self._revision += 1
            self._changed.notify_all()

    def _run(self) -> None:
        try:
            for index, job in enumerate(self.jobs):
                if self._cancel.is_set():  # a Job cancelled before it starts reports so itself
                    self._set(index, replace(self._states[index], phase="cancelled",
                                             message="Not run: the comparison was cancelled"))
                    continue
                job.start()
                for state in job.watch():
                    self._set(index, state)
        finally:
            self._set(finished=True)
