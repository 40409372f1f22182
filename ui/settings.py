"""What the app was started with, and what a shared public server (a Hugging Face Space) allows.

`AppSettings` (from `settings_from_args`: command line and RETRACK_APP_* variables) picks the
model shown first, the output folder, the folders visitors may open and the run defaults;
`SpaceLimits` bounds one visitor's job on a Space; `gpu_task` is ZeroGPU's decorator when the
`spaces` package is installed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

try:  # Hugging Face's ZeroGPU decorator: there on ZeroGPU Spaces, not a dependency of this project.
    import spaces  # before torch: on ZeroGPU hardware it prepares torch for GPUs lent per call
except ImportError:
    spaces = None

from retrack import paths  # noqa: E402
from retrack.checks import check_range  # noqa: E402
from retrack.devices import resolve_device  # noqa: E402
from retrack.engine import UnlearnConfig  # noqa: E402
from retrack.job_settings import EvalSettings  # noqa: E402
from retrack.split import default_generations  # noqa: E402


EVAL = EvalSettings()  # the evaluation's defaults


@dataclass(frozen=True)
class SpaceLimits:
    """What one visitor may ask of a shared public server (a Hugging Face Space), in one place.

    Every published preset fits within them (the longest is CIFAR-10's 60 steps of 128 rows); the
    MNIST preset's 50 steps take about 130 s on a 2-core CPU (docs/RESULTS.md), the size of a
    free CPU Space. The sampler steps allow the evaluation's default (50, the paper's for MNIST-like
    models): fewer change the rates. The page shows them, its number boxes stop at them, and `check` refuses a run
    over them before it starts.
    """

    queue_size: int  # visitors waiting in gradio's queue; more are asked to try again later
    concurrent_runs: int  # unlearning events at once (jobs still train one at a time per device)
    steps: int  # optimiser steps per job
    rows_per_step: int  # batch size x gradient accumulation
    samples: int  # before/after samples per job
    sampling_steps: int  # sampler steps per sample (the paper's ancestral sampler, and DDIM-50 beside it)
    generations: int  # text-to-image: generations to split
    gpu_seconds: int  # ZeroGPU: how long one unlearning job may hold a GPU
    generate_gpu_seconds: int  # ZeroGPU: the same for one "Generate & split"

    @classmethod
    def for_hardware(cls, on_gpu: bool) -> "SpaceLimits":
        """The limits for a Space with a GPU (ZeroGPU or a dedicated one) or on CPU hardware."""
        if on_gpu:
            return cls(queue_size=32, concurrent_runs=4, steps=200, rows_per_step=256, samples=1024,
                       sampling_steps=50, generations=32, gpu_seconds=120, generate_gpu_seconds=60)
        return cls(queue_size=16, concurrent_runs=2, steps=60, rows_per_step=128, samples=256, sampling_steps=50,
                   generations=8, gpu_seconds=120, generate_gpu_seconds=60)

    def check(self, config: UnlearnConfig, n_samples: int, sampling_steps: int) -> None:
        """Refuse (ValueError) a job over the limits."""
        check_range("on this Space, steps", config.steps, 1, self.steps)
        check_range("on this Space, batch size × gradient accumulation", config.batch_size * config.grad_accum,
                    1, self.rows_per_step)
        check_range("on this Space, samples to compare", n_samples, 1, self.samples)
        check_range("on this Space, sampler steps", sampling_steps, 1, self.sampling_steps)

    def describe(self) -> str:
        """One line of Markdown for the page."""
        return (f"**Limits of this Space:** up to {self.steps} steps of {self.rows_per_step} rows "
                f"(batch size × accumulation), {self.samples} samples with {self.sampling_steps} sampler steps, "
                f"{self.generations} generations to split; {self.queue_size} visitors in the queue"
                + (f"; a job holds a ZeroGPU for at most {self.gpu_seconds} s." if zero_gpu() else "."))


def zero_gpu() -> bool:
    """Whether this is a ZeroGPU Space (the `spaces` package is there and the Space says so)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_task(seconds: int) -> Callable[[Callable], Callable]:
    """ZeroGPU's decorator, `spaces.GPU(duration=seconds)`, when `spaces` is installed: on ZeroGPU
    hardware it runs each call in a process lent a GPU for that long; elsewhere it returns the
    function as it is. Without `spaces`, nothing is decorated."""
    if spaces is None:
        return lambda handler: handler
    return spaces.GPU(duration=seconds)


@dataclass(frozen=True)
class AppSettings:
    """What `python app.py` was started with."""

    model: str = str(paths.BUILTIN_MODEL)
    data: str = ""  # training-data folder for a model that is not the built-in one
    output_dir: Path = Path("outputs/app")
    quick: bool = False  # tiny run settings (tests, demos): seconds instead of minutes on a CPU
    max_file_size: str = "20mb"
    # When set, the page may open model and training-data folders under these roots only (plus the
    # start-up model and data, and the output folder where generated splits are written).
    folders: tuple[Path, ...] = ()
    auth: Optional[tuple[str, str]] = None  # (user, password) for gradio's login page
    limits: Optional[SpaceLimits] = None  # set on a shared public server (a Hugging Face Space)

    def check_folders(self, spec: str, data_folder: str) -> None:
        """Refuse (ValueError) a model or training-data folder outside `folders`, when set."""
        if not self.folders:
            return
        allowed = [*self.folders, self.output_dir, Path(self.model).expanduser()]
        if self.data:
            allowed.append(Path(self.data).expanduser())
        allowed = [root.absolute().resolve() for root in allowed]
        for what, text in (("model folder", spec), ("training-data folder", data_folder)):
            if not text.strip():
                continue
            where = Path(text.strip()).expanduser().absolute().resolve()
            if not any(where == root or root in where.parents for root in allowed):
                raise ValueError(f"this server opens folders under {', '.join(str(f) for f in self.folders)} only; "
                                 f"the {what} {text.strip()} is not one of them")

    def run_defaults(self, preset: str) -> dict:
        """Training and evaluation defaults for a model family: the published training settings;
        the evaluation's defaults (`EvalSettings`: 256 samples, the first 64 in the grids, a live
        curve of 32 samples and 16 noisy copies of each forget image every 10 steps; the paper's
        sampler with 50 steps and DDIM-50 beside it, fewer samples than a paper would use, so a CPU
        run stays short; benchmarks/results/app_cost.md and live_return.md have the cost).
        Text-to-image splits start from the paper's 128 generations on a GPU, 16 on a CPU."""
        training = UnlearnConfig.preset(preset)  # the one source of training defaults
        device = resolve_device("auto")
        defaults = dict(k=training.k, lam=training.lam, lr=training.lr, steps=training.steps,
                        batch_size=training.batch_size, grad_accum=training.grad_accum,
                        weight_decay=training.weight_decay, beta1=training.betas[0], beta2=training.betas[1],
                        eta=training.eta, siss_c=training.siss_c, seed=training.seed,
                        n_samples=EVAL.n_samples, grid_samples=EVAL.grid_samples, sampling_steps=EVAL.sampling_steps,
                        trajectory_points=EVAL.trajectory_points, live_every=EVAL.live_every,
                        live_samples=EVAL.live_samples, live_steps=EVAL.live_steps,
                        live_return_copies=EVAL.live_return_copies,
                        n_generations=default_generations(device),
                        # text-to-image: before/after use other seeds than the split's generations (0, 1, ...)
                        eval_seed=1000 if preset == "sd" else 0)
        if self.quick:
            defaults.update(steps=3, batch_size=8, grad_accum=1, n_samples=4, grid_samples=4, sampling_steps=5,
                            trajectory_points=4, n_generations=8, live_every=1, live_samples=4, live_steps=2,
                            live_return_copies=4)
        if self.limits is not None:  # the published settings fit; only evaluation may need trimming
            defaults.update(n_samples=min(defaults["n_samples"], self.limits.samples),
                            sampling_steps=min(defaults["sampling_steps"], self.limits.sampling_steps),
                            n_generations=min(defaults["n_generations"], self.limits.generations))
        return defaults


def settings_from_args(argv: Optional[list[str]] = None) -> tuple[AppSettings, str, int]:
    """(settings, host, port) from the command line, each option defaulting to its RETRACK_APP_* variable."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="The retrack web app: make a diffusion model forget images.")
    parser.add_argument("--model", default=env("RETRACK_APP_MODEL", str(paths.BUILTIN_MODEL)),
                        help="diffusers model folder or Hub id (default: the built-in digits + T-shirt DDPM)")
    parser.add_argument("--data", default=env("RETRACK_APP_DATA", ""),
                        help="folder of the images the model was trained on (not needed for the built-in model)")
    parser.add_argument("--host", default=env("RETRACK_APP_HOST", ""),
                        help="address to listen on (default 127.0.0.1: this machine only; with --space 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(env("RETRACK_APP_PORT", "7860")),
                        help="port (default 7860)")
    parser.add_argument("--output-dir", default=env("RETRACK_APP_OUTPUT", "outputs/app"),
                        help="where unlearned models and their zips are written (default outputs/app)")
    parser.add_argument("--quick", action="store_true", default=env("RETRACK_APP_QUICK", "") not in ("", "0"),
                        help="tiny default settings so a run takes seconds (tests, demos)")
    parser.add_argument("--folders", nargs="+", metavar="ROOT",
                        default=[f for f in env("RETRACK_APP_FOLDERS", "").split(os.pathsep) if f],
                        help="open model and training-data folders under these roots only (default: any folder "
                             "this process can read); RETRACK_APP_FOLDERS separates them with '%s'" % os.pathsep)
    parser.add_argument("--auth", default=env("RETRACK_APP_AUTH", ""), metavar="USER:PASSWORD",
                        help="ask for this user name and password before showing the page")
    parser.add_argument("--space", action="store_true", default=bool(env("SPACE_ID")),
                        help="run as a shared public Space: job limits, a bounded queue, only the start-up model "
                             "and the built-in assets can be opened (default on when SPACE_ID is set, as on "
                             "Hugging Face Spaces)")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, colon, password = args.auth.partition(":")
        if not (user and colon and password):
            parser.error("--auth takes USER:PASSWORD, both non-empty")
        auth = (user, password)
    folders = [Path(f).expanduser().absolute() for f in args.folders]
    if args.space and not folders:
        folders = [paths.ASSETS]  # visitors may not open other folders of the Space's disk, nor Hub ids
    limits = SpaceLimits.for_hardware(on_gpu=resolve_device("auto") != "cpu") if args.space else None
    settings = AppSettings(model=args.model, data=args.data, output_dir=Path(args.output_dir).absolute(),
                           quick=args.quick, folders=tuple(folders), auth=auth, limits=limits)
    host = args.host or ("0.0.0.0" if args.space else "127.0.0.1")  # a Space reaches the app from outside
    return settings, host, args.port

