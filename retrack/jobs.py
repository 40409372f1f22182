"""Unlearning jobs in the background, for an interactive front end (no gradio here).

`Job` runs one unlearning job in a worker thread. It waits its turn for the device
(`devices.device_queue`: one training job per device at a time), loads a fresh copy of the model
(the copy the page shows is never trained), samples "before" grids (cached per model and seeds),
trains with `engine.unlearn`, saves and zips the result, samples "after" with the same seeds,
measures every sample with `retrack.evaluation` (against `reference_for`, the forget set's
reference, cached) and draws the teaching view. Progress comes out as
`JobState` snapshots; `Job.cancel()` stops the job between steps. `Job._work` is the whole run,
phase by phase, on one screen.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
from PIL import Image

from .atomic import write_file_atomically
from .backends import load_backend
from .backends.base import Backend
from .checks import check_request
from .classifier import DigitClassifier
from .data import CLASS_NAMES
from .devices import describe_device, device_queue, resolve_device
from .engine import UnlearnConfig, save_model, unlearn
from .errors import Cancelled, Diverged, OutOfMemory, is_out_of_memory
from .evaluation import (
    Evaluation, OracleLevels, Reference, Return, SamplerSettings, draw, evaluate_samples, noise_and_denoise_return,
)
from .images import uint8_to_tensor
from .job_settings import EvalSettings
from .metrics import load_scorer
from .models import ModelInfo, oracle_folder, own_classifier, weights_stamp
from .objectives import METHODS
from .reports import StepEvent, UnlearnResult
from .sampling import Samples
from .stopping import UntilForgotten
from .teaching import neighbour_grid, trajectory_image, trajectory_strip

if TYPE_CHECKING:
    from .forget_set import ForgetSet

log = logging.getLogger(__name__)
T = TypeVar("T")

# ============================================================================ helpers of a job
class _Cache:
    """A small thread-safe LRU of what a job may reuse: the model does not change between jobs,
    so its "before" samples, the oracle's samples and evaluation and a forget set's reference
    need not be made again."""

    def __init__(self, capacity: int = 8) -> None:
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, key: tuple) -> Optional[object]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


# Samples of an unchanged model per (weights, device, sampler settings): "before" (the full set and
# the live curve's) and the oracle's; the oracle's evaluations per reference; forget-set references;
# the noise-and-denoise returns of an unchanged model (untrained, oracle) per forget set.
SAMPLES = _Cache(capacity=16)
ORACLE_EVALUATIONS = _Cache()
REFERENCES = _Cache()
RETURNS = _Cache()


def reference_key(model: ModelInfo, forget: ForgetSet, device: str) -> tuple:
    """What a forget set's reference depends on: the model, its scorer, the device and the sets."""
    return (model.cache_key, model.scorer, device, hashlib.sha256(forget.images.tobytes()).hexdigest(),
            hashlib.sha256(forget.retain_index.tobytes()).hexdigest())


def reference_for(model: ModelInfo, forget: ForgetSet, device: str = "cpu") -> Reference:
    """The evaluation reference of a model's forget set (`evaluation.Reference.build`: thresholds
    calibrated against its retain set, CLIP features on a seeded subset of it), scored with the
    model's CLIP scorer; kept for the next job with the same model, scorer and sets. Its `note`
    says when a fallback scorer is used."""
    key = reference_key(model, forget, device)
    reference = REFERENCES.get(key)
    if reference is None:
        scorer, note = load_scorer(model.scorer, device)
        forget_x0 = uint8_to_tensor(forget.images, channels_last=True)
        retain_x0 = uint8_to_tensor(model.training_data.images[forget.retain_index], channels_last=True)
        reference = Reference.build(forget_x0, retain_x0, scorer=scorer, note=note)
        REFERENCES.put(key, reference)
    return reference


def cached_samples(backend_of: Callable[[], Backend], weights: str, device: str, settings: SamplerSettings,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> Samples:
    """The samples of `settings` from the model whose weights stamp is `weights`, drawn once per
    process (`backend_of` loads the model only when they are not cached yet)."""
    key = (weights, device, settings)
    samples = SAMPLES.get(key)
    if samples is None:
        samples = draw(backend_of(), settings, on_batch=on_batch)
        SAMPLES.put(key, samples)
    return samples


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip `folder` (as one top-level folder inside the archive), written atomically."""
    # make_archive appends ".zip" to the name it is given: the temporary file's own name, less ".zip".
    return write_file_atomically(archive, lambda tmp: shutil.make_archive(
        str(tmp.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name))


# ============================================================================ the job
FINISHED_PHASES = ("done", "cancelled", "failed")


@dataclass
class LivePoint:
    """One point of the live memorisation curve: the live samples' copy rates after `step`
    training steps and, when the model has an oracle, their excess over the oracle's live samples;
    and how the forget images come back from noise (`evaluation.noise_and_denoise_return`, per t),
    a signal that moves where a rate of a few dozen samples sits at 0."""

    step: int
    rates: dict[str, float]
    excess: dict[str, float]
    seconds: float  # training seconds to this step (the live curve's own evaluations excluded)
    returns: dict[int, Return] = field(default_factory=dict)


@dataclass
class JobState:
    """A snapshot of a job, as the page shows it. `revision` grows with every change."""

    phase: str = "queued"  # queued, loading, before, training, saving, after, done, cancelled, failed
    message: str = "Waiting to start"
    progress: float = 0.0  # 0..1 over the whole job
    losses: list[StepEvent] = field(default_factory=list)
    before: Optional[Evaluation] = None
    after: Optional[Evaluation] = None
    oracle: Optional[Evaluation] = None  # the oracle's samples from the same seeds, when the model has one
    # before, after and oracle under the second, deterministic sampler (DDIM-50), same seeds, when asked for
    deterministic: dict[str, Optional[Evaluation]] = field(default_factory=dict)
    live: list[LivePoint] = field(default_factory=list)  # the live memorisation curve, step 0 first
    # With a classifier of the model's classes (the built-in model's): the share of each class among
    # the samples "before", "after" and "oracle" (the paper's sampler), and the classes' names.
    class_shares: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    oracle_returns: dict[int, Return] = field(default_factory=dict)  # the oracle's noise-and-denoise return
    live_seconds: float = 0.0  # spent on the live curve during training (not in the training time)
    grid_samples: int = 64  # the grids show the first this many samples
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


def watch_changes(changed: threading.Condition, revision: Callable[[], int], snapshot: Callable[[], T],
                  timeout: Optional[float], what: str) -> Iterator[T]:
    """Yield `snapshot()` after every change (`revision()` grew; `changed` is notified) until a
    snapshot is `finished`: how a job, or several in a row, is followed from another thread."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = -1
    while True:
        with changed:
            while revision() == seen:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{what} did not finish in {timeout} s")
                changed.wait(timeout=left)
            seen = revision()
            state = snapshot()
        yield state
        if state.finished:
            return


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
        self._state = JobState(grid_samples=evaluation.grid_samples)
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
            return replace(self._state, losses=list(self._state.losses), live=list(self._state.live))

    def watch(self, timeout: Optional[float] = None) -> Iterator[JobState]:
        """Yield a snapshot after every change until the job finishes (the last one is final)."""
        return watch_changes(self._changed, lambda: self._state.revision, self.snapshot, timeout, f"job {self.id}")

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
        """The run, phase by phase: load, sample "before" (and the oracle), train (drawing the live
        memorisation curve), save, sample "after"."""
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

        oracle_path = oracle_folder(self.model.path) if backend.family == "pixel" else None
        self._phase("before", f"Sampling {settings.n_samples} images before unlearning"
                              + (" and from the oracle" if oracle_path else ""))
        sampling_started = time.perf_counter()
        oracle, live_oracle, oracle_returns = self._oracle(
            oracle_path, reference, settings.sampler_settings(),
            settings.live_sampler_settings() if settings.live_every > 0 else None)
        levels, live_levels = (None if e is None else OracleLevels.from_evaluation(e) for e in (oracle, live_oracle))
        drawn_with = settings.sampler_settings().describe(self.device)
        before = evaluate_samples(self._samples(backend, settings.sampler_settings(), cached=True), reference, levels,
                                  prompt=settings.prompt, sampler=drawn_with)
        teaching_seed, teaching_flagged = before.teaching_seed()
        before_path = trajectory_strip(backend, teaching_seed, settings, cond)
        live = None
        if settings.live_every > 0:  # step 0 of the live curve: the untrained model's live samples
            self._set(oracle_returns=oracle_returns or {})
            self._add_live_point(0, 0.0, self._samples(backend, settings.live_sampler_settings(), cached=True),
                                 self._returns(lambda: backend, self.model.cache_key, reference), reference,
                                 live_levels)
            live = lambda event: self._live_point(event, backend, reference, live_levels)  # noqa: E731
        sampling_seconds = time.perf_counter() - sampling_started
        self._set(before=before, oracle=oracle, progress=_PHASE_SPAN["before"][1])

        self._phase("training", f"Training: {METHODS[config.method].title}, {config.steps} steps")
        forget_x0 = backend.encode(uint8_to_tensor(self.forget.images, channels_last=True))
        retain_x0 = backend.encode(uint8_to_tensor(data.images[self.forget.retain_index], channels_last=True))
        until = self._until_forgotten(backend, reference, oracle_path) if settings.until_forgotten else None
        result = unlearn(backend, forget_x0, retain_x0, config, forget_cond=training_cond, retain_cond=training_cond,
                         on_step=lambda event: self._on_step(event, sampling_seconds, live), cancel=self._cancel,
                         until=until)
        if result.neighbours is not None:
            self._set(neighbours=neighbour_grid(backend, self.forget, data, forget_x0, retain_x0, result.neighbours,
                                                result.neighbour_distances, seed=config.seed))

        self._phase("saving", "Saving and zipping the unlearned model")
        name = f"{self.model.path.name}-{config.method}"
        metadata = result.metadata(app_job=self.id, forget_sources=self.forget.sources,
                                   training_prompt=self.training_prompt or None,
                                   evaluation=vars(settings) | {"before_memorisation_rate": before.clip_rate},
                                   **({} if until is None else {"until_forgotten": until.record()}))
        model_dir = save_model(backend, self.output_dir / name, metadata)
        archive = zip_folder(model_dir, self.output_dir / f"{name}.zip")
        self._set(model_dir=model_dir, archive=archive, progress=_PHASE_SPAN["saving"][1])

        self._phase("after", f"Sampling the same {settings.n_samples} seeds after unlearning")
        after = evaluate_samples(self._samples(backend, settings.sampler_settings(), cached=False), reference, levels,
                                 prompt=settings.prompt, sampler=drawn_with)
        after_path = trajectory_strip(backend, teaching_seed, settings, cond)
        after_flagged = bool(after.clip_flags[after.samples.seeds.index(teaching_seed)])
        self._set(after=after, trajectory=trajectory_image(before_path, after_path, teaching_flagged, after_flagged),
                  teaching_note=_teaching_note(before, teaching_seed, teaching_flagged))
        self._set(**self._class_shares(before=before, after=after, oracle=oracle))
        if settings.deterministic:
            self._set(message=f"Sampling the same {settings.n_samples} seeds before and after with DDIM-50, the "
                              "second, deterministic sampler")
            self._set(deterministic=self._deterministic(backend, reference, oracle_path))
        returned = (return_sentence(self._state.live[-1].returns, self._state.oracle_returns, len(self.forget))
                    if self._state.live else "")
        self._set(phase="done", progress=1.0, message=_done_message(
            before, after, oracle, result, self._state.live_seconds, model_dir, self._state.deterministic)
            + (f"\n{returned} (after training)" if returned else "")
            + ("" if until is None else f"\nStop when forgotten: {until.outcome(config.steps)}"))

    def _class_shares(self, **evaluations: Optional[Evaluation]) -> dict:
        """JobState's `class_shares` and `class_names` of these evaluations under the model's own
        classifier (`models.own_classifier`: the built-in model's digits + T-shirt one), when it has
        one that takes its images; nothing otherwise."""
        folder = own_classifier(self.model.path)
        if folder is None or (self.model.image_size, self.model.channels) != (28, 1):
            return {}
        classifier = DigitClassifier.load(folder, device=self.device)
        shares = {name: e.class_shares(classifier) for name, e in evaluations.items() if e is not None}
        names = CLASS_NAMES if classifier.config["num_classes"] == len(CLASS_NAMES) else \
            tuple(str(i) for i in range(classifier.config["num_classes"]))
        return {"class_shares": shares, "class_names": tuple(names)}

    def _until_forgotten(self, backend: Backend, reference: Reference, oracle_path: Optional[Path]) -> UntilForgotten:
        """The stop rule at the live points (`retrack.stopping`), its level measured now, before training."""
        if backend.family != "pixel":
            raise ValueError("stop when forgotten measures pixel models only for now (not text-to-image models)")
        settings = self.evaluation
        self._set(message="Stop when forgotten: measuring the level to stop at"
                          + (" (the oracle's)" if oracle_path else " (the model's own retain images)"))
        oracle = None if oracle_path is None else load_backend(oracle_path, device=self.device)
        live = settings.live_sampler_settings()
        return UntilForgotten(backend, reference, oracle, every=settings.live_every, samples=live.n_samples,
                              sample_steps=live.steps, seed=live.seed, return_copies=settings.live_return_copies)

    def _deterministic(self, unlearned: Backend, reference: Reference, oracle_path: Optional[Path]) -> dict:
        """Before (the untrained model's samples, cached), after and the oracle's under DDIM-50 on the
        same seeds, read against the oracle's levels under that sampler."""
        settings = self.evaluation.deterministic_sampler_settings()
        oracle, _, _ = self._oracle(oracle_path, reference, settings, None)
        levels = None if oracle is None else OracleLevels.from_evaluation(oracle)
        untrained = lambda: load_backend(self.model.path, device=self.device)  # noqa: E731
        drawn_with = settings.describe(self.device)
        before = evaluate_samples(cached_samples(untrained, self.model.cache_key, self.device, settings,
                                                 on_batch=self._check_cancel), reference, levels,
                                  prompt=settings.prompt, sampler=drawn_with)
        after = evaluate_samples(self._samples(unlearned, settings, cached=False), reference, levels,
                                 prompt=settings.prompt, sampler=drawn_with)
        return {"before": before, "after": after, "oracle": oracle}

    def _on_step(self, event: StepEvent, sampling_seconds: float, live: Optional[Callable[[StepEvent], None]]) -> None:
        """Record a training step (and evaluate the live curve when it is due); the message
        carries an ETA: the remaining steps at the mean pace so far, the live evaluations left at
        their mean cost, plus sampling "after" as long as "before" took."""
        with self._changed:
            self._state.losses.append(event)
            per_step = sum(e.step_seconds for e in self._state.losses) / len(self._state.losses)
        if live is not None and self.evaluation.live_at(event.step, event.steps):
            live(event)
        state = self.snapshot()
        live_left = sum(self.evaluation.live_at(step, event.steps) for step in range(event.step + 1, event.steps + 1))
        per_live = state.live_seconds / max(1, len(state.live) - 1)
        left = (event.steps - event.step) * per_step + live_left * per_live + sampling_seconds
        start, end = _PHASE_SPAN["training"]
        returned = return_sentence(state.live[-1].returns, state.oracle_returns, len(self.forget)) if state.live else ""
        self._set(progress=start + (end - start) * event.step / event.steps,
                  message=f"Training step {event.step}/{event.steps} · loss {event.loss:.4g} "
                          f"(unlearn {event.unlearn:.4g}, retain {event.retain:.4g}) · "
                          f"{event.step_seconds:.2f} s/step · about {_seconds(left)} left"
                          + (f"\n{returned} (step {state.live[-1].step})" if returned else ""))

    def _live_point(self, event: StepEvent, backend: Backend, reference: Reference,
                    levels: Optional[OracleLevels]) -> None:
        """The live curve after this step: the same live seeds drawn from the model as it is now,
        and the forget images' noise-and-denoise return. Its cost is kept out of the training time
        the curve and the status report."""
        started = time.perf_counter()
        samples = self._samples(backend, self.evaluation.live_sampler_settings(), cached=False)
        returns = self._returns(lambda: backend, None, reference)
        self._add_live_point(event.step, event.seconds - self._state.live_seconds, samples, returns, reference,
                             levels, started=started)

    def _add_live_point(self, step: int, seconds: float, samples: Samples, returns: dict[int, Return],
                        reference: Reference, levels: Optional[OracleLevels], started: Optional[float] = None) -> None:
        """Measure one point's samples and publish it with its `returns`; the time since `started`
        (when the samples were drawn for it) counts as the live curve's cost."""
        result = evaluate_samples(samples, reference, levels)
        spent = 0.0 if started is None else time.perf_counter() - started
        point = LivePoint(step=step, rates=result.rates(), excess=result.excess(), seconds=round(seconds, 3),
                          returns=returns)
        self._set(live=self._state.live + [point], live_seconds=self._state.live_seconds + spent)

    def _returns(self, backend_of: Callable[[], Backend], weights: Optional[str],
                 reference: Reference) -> dict[int, Return]:
        """The forget images' noise-and-denoise return under a model, kept per process for an
        unchanged one (`weights`: its stamp; None for the model in training, never kept)."""
        copies = self.evaluation.live_return_copies
        if copies == 0:
            return {}
        key = None if weights is None else (weights, self.device, copies,
                                            reference_key(self.model, self.forget, self.device))
        returns = None if key is None else RETURNS.get(key)
        if returns is None:
            returns = noise_and_denoise_return(backend_of(), uint8_to_tensor(self.forget.images, channels_last=True),
                                               reference.l2_threshold, copies=copies)
            if key is not None:
                RETURNS.put(key, returns)
        self._check_cancel()
        return returns

    def _samples(self, backend: Backend, settings: SamplerSettings, cached: bool) -> Samples:
        """The model's samples of `settings`: from the cache when `cached` (the untrained model)."""
        if cached:
            samples = cached_samples(lambda: backend, self.model.cache_key, self.device, settings,
                                     on_batch=self._check_cancel)
        else:
            samples = draw(backend, settings, on_batch=self._check_cancel)
        self._check_cancel()
        return samples

    def _oracle(self, path: Optional[Path], reference: Reference, settings: SamplerSettings,
                live: Optional[SamplerSettings]) -> tuple[Optional[Evaluation], Optional[Evaluation], Optional[dict]]:
        """The oracle's evaluations on the same seeds (`settings`, and the live curve's `live` when
        given, with the oracle's noise-and-denoise return of the forget images), each made once per
        process per (oracle, device, sampler, reference); (None, None, None) when the model has no
        oracle. The oracle is loaded only when one is not cached yet."""
        if path is None:
            return None, None, None
        weights, loaded = weights_stamp(path), []

        def backend_of() -> Backend:
            if not loaded:
                loaded.append(load_backend(path, device=self.device))
            return loaded[0]

        def evaluation_of(settings: SamplerSettings) -> Evaluation:
            key = (weights, self.device, settings, reference_key(self.model, self.forget, self.device))
            result = ORACLE_EVALUATIONS.get(key)
            if result is None:
                samples = cached_samples(backend_of, weights, self.device, settings, on_batch=self._check_cancel)
                result = evaluate_samples(samples, reference)
                ORACLE_EVALUATIONS.put(key, result)
            return result

        if live is None:
            return evaluation_of(settings), None, None
        return evaluation_of(settings), evaluation_of(live), self._returns(backend_of, weights, reference)


def return_sentence(returns: dict[int, Return], oracle: dict[int, Return], images: int) -> str:
    """The noise-and-denoise return in words, for the status: 'Noise and denoise: of 16 noisy copies
    of the forget image, 16 come back as the image from t = 240 and 15 from t = 500 (the oracle: 16
    and 6); on average they land 4.9 and 7.4 from it (pixel L2; the oracle: 5.5 and 10.4)'."""
    if not returns:
        return ""
    values, both = list(returns.values()), " and ".join
    which, image = ("the forget image", "the image") if images == 1 else (f"the {images} forget images", "their image")
    distances = both(f"{r.distance:.1f}" for r in values)
    if oracle:
        distances += f" from it (pixel L2; the oracle: {both(f'{oracle[r.t].distance:.1f}' for r in values)})"
    else:
        distances += " from it (pixel L2)"
    if values[0].returned is None:  # no copy threshold to count them by
        return (f"Noise and denoise: {values[0].copies} noisy copies of {which}, noised to t = "
                f"{both(str(r.t) for r in values)}, land on average {distances}")
    counts = both([f"{values[0].returned} come back as {image} from t = {values[0].t}",
                   *(f"{r.returned} from t = {r.t}" for r in values[1:])])
    if oracle:
        counts += f" (the oracle: {both(str(oracle[r.t].returned) for r in values)})"
    return f"Noise and denoise: of {values[0].copies} noisy copies of {which}, {counts}; on average they land " + distances


def _teaching_note(before: Evaluation, seed: int, flagged: bool) -> str:
    """Why the teaching view follows this seed."""
    note = (f"Seed {seed}: its sample {'reproduced' if flagged else 'came closest to'} a "
            f"forget image before unlearning (score {before.clip_similarity.max():.2f}, threshold {before.clip_threshold:.2f})")
    if not flagged:
        note += "; no sample was above the threshold, so this is the nearest one"
    return note + "."


def _done_message(before: Evaluation, after: Evaluation, oracle: Optional[Evaluation], result: UnlearnResult,
                  live_seconds: float, model_dir: Path, deterministic: dict) -> str:
    """The status line of a finished job: the training time excludes the live curve's evaluations;
    the rates under the paper's sampler, then under DDIM-50 when it was drawn."""
    quality = "" if after.quality is None or before.quality is None else \
        f" · quality (CLIP Fréchet distance to the retain set) {before.quality:.3g} → {after.quality:.3g}"
    reading = "" if oracle is None else f" (the oracle: {oracle.clip_rate:.0%})"
    second = ""
    if deterministic.get("after") is not None:
        d_oracle = deterministic.get("oracle")
        second = (f"; under DDIM-50 {deterministic['before'].clip_rate:.0%} → {deterministic['after'].clip_rate:.0%}"
                  + ("" if d_oracle is None else f" (the oracle: {d_oracle.clip_rate:.0%})"))
    live = f" (+ {_seconds(live_seconds)} for the live memorisation curve)" if live_seconds else ""
    return (f"Done in {_seconds(result.seconds - live_seconds)}{live}: memorisation rate {before.clip_rate:.0%} → "
            f"{after.clip_rate:.0%}{reading} with the paper's sampler{second}{quality} · saved to {model_dir}")
