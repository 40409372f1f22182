"""Unlearning jobs in the background, for an interactive front end (no gradio here).

`Job` runs one unlearning job in a worker thread. It waits its turn for the device
(`devices.device_queue`: one training job per device at a time), loads a fresh copy of the model
(the copy the page shows is never trained), samples "before" grids (cached per model and seeds),
trains with `engine.unlearn`, saves and zips the result, samples "after" with the same seeds,
measures every sample with `retrack.evaluation` (against the forget set's cached
`app_evaluation.reference_for`) and draws the teaching view. Progress comes out as
`JobState` snapshots; `Job.cancel()` stops the job between steps. `Job._work` is the whole run,
phase by phase, on one screen.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from PIL import Image

from .atomic import write_file_atomically
from .app_evaluation import EvalSettings, reference_for
from .backends import load_backend
from .backends.base import Backend
from .devices import describe_device, device_queue
from .engine import (
    Cancelled, Diverged, OutOfMemory, StepEvent, UnlearnConfig, UnlearnResult, check_request, is_out_of_memory,
    resolve_device, save_model, unlearn,
)
from .evaluation import Evaluation, Reference, draw, evaluate_samples
from .images import uint8_to_tensor
from .models import ModelInfo
from .objectives import METHODS
from .sampling import Samples
from .teaching import neighbour_grid, trajectory_image, trajectory_strip

if TYPE_CHECKING:
    from .forget_set import ForgetSet

log = logging.getLogger(__name__)

# ============================================================================ helpers of a job
class _SampleCache:
    """"Before" samples per (model weights, device, seeds, steps): the model does not change
    between jobs, so its samples need not be drawn again. Small LRU; thread-safe."""

    def __init__(self, capacity: int = 8) -> None:
        self._items: OrderedDict[tuple, Samples] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, key: tuple) -> Optional[Samples]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, samples: Samples) -> None:
        with self._lock:
            self._items[key] = samples
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


BEFORE_SAMPLES = _SampleCache()


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` (as one top-level folder inside the archive), written atomically."""
    # make_archive appends ".zip" to the name it is given: the temporary file's own name, less ".zip".
    return write_file_atomically(archive, lambda tmp: shutil.make_archive(
        str(tmp.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name))


# ============================================================================ the job
FINISHED_PHASES = ("done", "cancelled", "failed")


@dataclass
class JobState:
    """A snapshot of a job, as the page shows it. `revision` grows with every change."""

    phase: str = "queued"  # queued, loading, before, training, saving, after, done, cancelled, failed
    message: str = "Waiting to start"
    progress: float = 0.0  # 0..1 over the whole job
    losses: list[StepEvent] = field(default_factory=list)
    before: Optional[Evaluation] = None
    after: Optional[Evaluation] = None
    neighbours: Optional[Image.Image] = None  # each forget image, then its K nearest retain images
    trajectory: Optional[Image.Image] = None
    teaching_note: str = ""
    scorer_note: str = ""  # set when a fallback scorer is used
    model_dir: Optional[Path] = None
    archive: Optional[Path] = None
    error: Optional[str] = None
    revision: int = 0

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


# Where each phase starts and ends on the progress bar: training dominates on every device.
_PHASE_SPAN = {"loading": (0.0, 0.02), "before": (0.02, 0.10), "training": (0.10, 0.85), "saving": (0.85, 0.90),
               "after": (0.90, 1.0)}


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


class Job:
    """One unlearning job, run in a worker thread:

        job = Job(model, forget, UnlearnConfig.preset("mnist"), EvalSettings(), Path("outputs/app")).start()
        for state in job.watch():
            print(state.progress, state.message)

    Settings are checked when the job is made (ValueError), so a bad request never queues.
    Text-to-image models sample with `evaluation.prompt` and fine-tune on `training_prompt`
    (the same prompt by default, or a modified one, as in the paper's Stable Diffusion runs).
    """

    def __init__(self, model: ModelInfo, forget: ForgetSet, config: UnlearnConfig, evaluation: EvalSettings,
                 output_root: Path, training_prompt: str = ""):
        check_request(config, len(forget), len(forget.retain_index))  # the library's one check, before the job queues
        evaluation.validate()
        if model.training_data is None:
            raise ValueError("this model's training data is unknown: name the folder of images it was trained on")
        if model.family == "latent" and not evaluation.prompt.strip():
            raise ValueError("type the prompt whose memorised images should be forgotten")
        self.model, self.forget, self.config, self.evaluation = model, forget, config, evaluation
        self.training_prompt = (training_prompt or evaluation.prompt).strip()
        self.device = resolve_device(config.device)
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{uuid.uuid4().hex[:6]}"
        self.output_dir = Path(output_root).absolute() / self.id
        self._state = JobState()
        self._changed = threading.Condition()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retrack-job-{self.id}", daemon=True)

    # --- control ------------------------------------------------------------------------
    def start(self) -> "Job":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop; it does so before its next training step or sampling batch."""
        self._cancel.set()
        with self._changed:
            if not self._state.finished:
                self._set(message="Cancelling...")

    def snapshot(self) -> JobState:
        with self._changed:
            return replace(self._state, losses=list(self._state.losses))

    def watch(self, timeout: Optional[float] = None) -> Iterator[JobState]:
        """Yield a snapshot after every change until the job finishes (the last one is final)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1
        while True:
            with self._changed:
                while self._state.revision == seen:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"job {self.id} did not finish in {timeout} s")
                    self._changed.wait(timeout=left)
                seen = self._state.revision
                state = self.snapshot()
            yield state
            if state.finished:
                return

    def wait(self, timeout: Optional[float] = None) -> JobState:
        """Block until the job finishes; return its final state."""
        state = self.snapshot()
        for state in self.watch(timeout):
            pass
        return state

    # --- the worker ---------------------------------------------------------------------
    def _set(self, **changes) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(self._state, name, value)
            self._state.revision += 1
            self._changed.notify_all()

    def _phase(self, phase: str, message: str) -> None:
        self._check_cancel()
        self._set(phase=phase, message=message, progress=_PHASE_SPAN[phase][0])

    def _check_cancel(self, *_: object) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")

    def _run(self) -> None:
        queue = device_queue(self.device)
        waiting = lambda ahead: self._set(message=f"Waiting for the device ({self.device}): {ahead} job(s) ahead")  # noqa: E731
        if not queue.acquire(self, self._cancel, waiting):
            self._set(phase="cancelled", message="Cancelled before it started; nothing was changed")
            return
        try:
            self._work()
        except Cancelled:
            if self._state.model_dir is not None:  # cancelled while sampling "after"
                message = f"Cancelled after training: the unlearned model is saved in {self._state.model_dir}"
            else:
                message = (f"Cancelled after {len(self._state.losses)} of {self.config.steps} training steps; "
                           "nothing was saved")
            self._set(phase="cancelled", message=message)
        except (ValueError, Diverged, OutOfMemory, FileExistsError) as exc:  # ImageError is a ValueError
            self._set(phase="failed", error=str(exc), message=f"Stopped: {exc}")
        except Exception as exc:  # the page shows a message, the log keeps the traceback
            if is_out_of_memory(exc):  # e.g. while sampling, outside the engine's own check
                message = "Stopped: the device ran out of memory; try fewer samples or a smaller batch"
            else:
                log.exception("job %s failed", self.id)
                message = f"Unexpected error ({type(exc).__name__}: {exc}); details are in the server log"
            self._set(phase="failed", error=f"{type(exc).__name__}: {exc}", message=message)
        finally:
            queue.release(self)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def _work(self) -> None:
        """The run, phase by phase: load, sample "before", train, save, sample "after"."""
        settings, config, data = self.evaluation, self.config, self.model.training_data
        self._phase("loading", f"Loading a fresh copy of {self.model.path.name} on {describe_device(self.device)}")
        backend = load_backend(self.model.path, device=self.device)
        reference = reference_for(self.model, self.forget, device=self.device)
        self._set(scorer_note=reference.note)
        # Text-to-image models: the prompt to sample with, and the (maybe modified) one to train on.
        cond = training_cond = None
        if backend.family == "latent":
            cond = backend.encode_prompt([settings.prompt.strip()])
            training_cond = backend.encode_prompt([self.training_prompt])

        self._phase("before", f"Sampling {settings.n_samples} images before unlearning")
        sampling_started = time.perf_counter()
        before = self._evaluate(backend, reference, cached=True)
        teaching_seed, teaching_flagged = before.teaching_seed()
        before_path = trajectory_strip(backend, teaching_seed, settings, cond)
        sampling_seconds = time.perf_counter() - sampling_started
        self._set(before=before, progress=_PHASE_SPAN["before"][1])

        self._phase("training", f"Training: {METHODS[config.method].title}, {config.steps} steps")
        forget_x0 = backend.encode(uint8_to_tensor(self.forget.images, channels_last=True))
        retain_x0 = backend.encode(uint8_to_tensor(data.images[self.forget.retain_index], channels_last=True))
        result = unlearn(backend, forget_x0, retain_x0, config, forget_cond=training_cond, retain_cond=training_cond,
                         on_step=lambda event: self._on_step(event, sampling_seconds), cancel=self._cancel)
        if result.neighbours is not None:
            self._set(neighbours=neighbour_grid(backend, self.forget, data, forget_x0, retain_x0, result.neighbours,
                                                result.neighbour_distances, seed=config.seed))

        self._phase("saving", "Saving and zipping the unlearned model")
        name = f"{self.model.path.name}-{config.method}"
        metadata = result.metadata(app_job=self.id, forget_sources=self.forget.sources,
                                   training_prompt=self.training_prompt or None,
                                   evaluation=vars(settings) | {"before_memorisation_rate": before.rate})
        model_dir = save_model(backend, self.output_dir / name, metadata)
        archive = zip_folder(model_dir, self.output_dir / f"{name}.zip")
        self._set(model_dir=model_dir, archive=archive, progress=_PHASE_SPAN["saving"][1])

        self._phase("after", f"Sampling the same {settings.n_samples} seeds after unlearning")
        after = self._evaluate(backend, reference, cached=False)
        after_path = trajectory_strip(backend, teaching_seed, settings, cond)
        after_flagged = bool(after.flags[after.samples.seeds.index(teaching_seed)])
        self._set(after=after, trajectory=trajectory_image(before_path, after_path, teaching_flagged, after_flagged),
                  teaching_note=_teaching_note(before, teaching_seed, teaching_flagged), phase="done", progress=1.0,
                  message=_done_message(before, after, result, model_dir))

    def _on_step(self, event: StepEvent, sampling_seconds: float) -> None:
        """Record a training step; the message carries an ETA: the remaining steps at the mean
        pace so far, plus sampling "after" as long as "before" took."""
        with self._changed:
            self._state.losses.append(event)
            per_step = sum(e.step_seconds for e in self._state.losses) / len(self._state.losses)
        left = (event.steps - event.step) * per_step + sampling_seconds
        start, end = _PHASE_SPAN["training"]
        self._set(progress=start + (end - start) * event.step / event.steps,
                  message=f"Training step {event.step}/{event.steps} · loss {event.loss:.4g} "
                          f"(unlearn {event.unlearn:.4g}, retain {event.retain:.4g}) · "
                          f"{event.step_seconds:.2f} s/step · about {_seconds(left)} left")

    def _evaluate(self, backend: Backend, reference: Reference, cached: bool) -> Evaluation:
        settings = self.evaluation.sampler_settings()
        key = (self.model.cache_key, self.device, settings)
        samples = BEFORE_SAMPLES.get(key) if cached else None
        if samples is None:
            samples = draw(backend, settings, on_batch=self._check_cancel)
            if cached:
                BEFORE_SAMPLES.put(key, samples)
        self._check_cancel()
        return evaluate_samples(samples, reference)


def _teaching_note(before: Evaluation, seed: int, flagged: bool) -> str:
    """Why the teaching view follows this seed."""
    note = (f"Seed {seed}: its sample {'reproduced' if flagged else 'came closest to'} a "
            f"forget image before unlearning (score {before.scores.max():.2f}, threshold {before.threshold:.2f})")
    if not flagged:
        note += "; no sample was above the threshold, so this is the nearest one"
    return note + "."


def _done_message(before: Evaluation, after: Evaluation, result: UnlearnResult, model_dir: Path) -> str:
    """The status line of a finished job."""
    quality = "" if after.quality is None or before.quality is None else \
        f" · quality (CLIP Fréchet distance to the retain set) {before.quality:.3g} → {after.quality:.3g}"
    return (f"Done in {_seconds(result.seconds)}: memorisation rate {before.rate:.0%} → {after.rate:.0%}"
            f"{quality} · saved to {model_dir}")
