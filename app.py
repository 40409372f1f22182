"""The retrack web app: make a diffusion model forget images, in the browser.

    python app.py                          # the built-in digits + T-shirt model, http://127.0.0.1:7860
    python app.py --model path/to/ddpm     # your own pixel DDPM folder (or a Hub id, when online)
    python app.py --model m --data train/  # ... with the folder of images it was trained on
    python app.py --quick                  # tiny settings: a run takes seconds (for tests, demos)

    python app.py --host 0.0.0.0 --folders /srv/models --auth USER:PASSWORD   # before sharing it
    python app.py --space                  # as on a Hugging Face Space: job limits, queue size

Every option also reads an environment variable (RETRACK_APP_MODEL, RETRACK_APP_DATA,
RETRACK_APP_HOST, RETRACK_APP_PORT, RETRACK_APP_OUTPUT, RETRACK_APP_QUICK, RETRACK_APP_FOLDERS,
RETRACK_APP_AUTH; the variable keeps a password out of the process list). On a Hugging Face Space
(SPACE_ID is set there) `--space` is on by default: see `SpaceLimits`. When the `spaces` package is
installed (ZeroGPU Spaces come with it; this project does not depend on it), the GPU-bound
handlers carry its ZeroGPU decorator, which on ZeroGPU hardware attaches a GPU for each call and
elsewhere does nothing.

This file is the page only. What the page does (open a model and its training data, build the
forget set, run a job in the background, sample, score) lives in `retrack.session`, which
never imports gradio. The page reads top to bottom in the order a user works: model, forget
set, method, run, results, teaching view.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outside look-ups at launch

try:  # Hugging Face's ZeroGPU decorator: there on ZeroGPU Spaces, not a dependency of this project.
    import spaces  # before torch: on ZeroGPU hardware it prepares torch for GPUs lent per call
except ImportError:
    spaces = None

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from retrack import paths  # noqa: E402
from retrack.engine import UnlearnConfig, check_range, resolve_device  # noqa: E402
from retrack.likelihood import NLLSettings, likelihood_table  # noqa: E402
from retrack.split import PAPER_GENERATIONS, default_generations  # noqa: E402
from retrack.session import (  # noqa: E402
    METHOD_LABELS, RENOISE_STEPS, EvalSettings, GalleryItem, Job, JobState, ModelInfo, build_forget_set,
    describe_device, display_grid, gallery_items, generate_split, likelihood_view, open_model, parse_picks,
    renoise_view, split_items, teaching_images, teaching_models, toggle_pick,
)

log = logging.getLogger("retrack.app")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


# ============================================================================ settings
@dataclass(frozen=True)
class SpaceLimits:
    """What one visitor may ask of a shared public server (a Hugging Face Space), in one place.

    Every published preset fits within them (the longest is CIFAR-10's 60 steps of 128 rows); the
    MNIST preset's 50 steps take about 100 s on a 2-core CPU (README's benchmark), the size of a
    free CPU Space. The page shows them, its number boxes stop at them, and `check` refuses a run
    over them before it starts.
    """

    queue_size: int  # visitors waiting in gradio's queue; more are asked to try again later
    concurrent_runs: int  # unlearning events at once (jobs still train one at a time per device)
    steps: int  # optimiser steps per job
    rows_per_step: int  # batch size x gradient accumulation
    samples: int  # before/after samples per job
    sampling_steps: int  # DDIM steps per sample
    generations: int  # text-to-image: generations to split
    gpu_seconds: int  # ZeroGPU: how long one unlearning job may hold a GPU
    generate_gpu_seconds: int  # ZeroGPU: the same for one "Generate & split"

    @classmethod
    def for_hardware(cls, on_gpu: bool) -> "SpaceLimits":
        """The limits for a Space with a GPU (ZeroGPU or a dedicated one) or on CPU hardware."""
        if on_gpu:
            return cls(queue_size=32, concurrent_runs=4, steps=200, rows_per_step=256, samples=64,
                       sampling_steps=50, generations=32, gpu_seconds=120, generate_gpu_seconds=60)
        return cls(queue_size=16, concurrent_runs=2, steps=60, rows_per_step=128, samples=16, sampling_steps=25,
                   generations=8, gpu_seconds=120, generate_gpu_seconds=60)

    def check(self, config: UnlearnConfig, n_samples: int, sampling_steps: int) -> None:
        """Refuse (ValueError) a job over the limits."""
        check_range("on this Space, steps", config.steps, 1, self.steps)
        check_range("on this Space, batch size × gradient accumulation", config.batch_size * config.grad_accum,
                    1, self.rows_per_step)
        check_range("on this Space, samples to compare", n_samples, 1, self.samples)
        check_range("on this Space, DDIM steps", sampling_steps, 1, self.sampling_steps)

    def describe(self) -> str:
        """One line of Markdown for the page."""
        return (f"**Limits of this Space:** up to {self.steps} steps of {self.rows_per_step} rows "
                f"(batch size × accumulation), {self.samples} samples with {self.sampling_steps} DDIM steps, "
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
        fewer eval samples and DDIM steps than a paper would use, so a CPU run stays short.
        Text-to-image splits start from the paper's 128 generations on a GPU, 16 on a CPU."""
        training = UnlearnConfig.preset(preset)  # the one source of training defaults
        device = resolve_device("auto")
        on_gpu = device != "cpu"
        defaults = dict(k=training.k, lam=training.lam, lr=training.lr, steps=training.steps,
                        batch_size=training.batch_size, grad_accum=training.grad_accum,
                        weight_decay=training.weight_decay, beta1=training.betas[0], beta2=training.betas[1],
                        eta=training.eta, siss_c=training.siss_c, seed=training.seed,
                        n_samples=32 if on_gpu else 16, sampling_steps=25, trajectory_points=6,
                        n_generations=default_generations(device),
                        # text-to-image: before/after use other seeds than the split's generations (0, 1, ...)
                        eval_seed=1000 if preset == "sd" else 0)
        if self.quick:
            defaults.update(steps=3, batch_size=8, grad_accum=1, n_samples=4, sampling_steps=5, trajectory_points=4,
                            n_generations=8)
        if self.limits is not None:  # the published settings fit; only evaluation may need trimming
            defaults.update(n_samples=min(defaults["n_samples"], self.limits.samples),
                            sampling_steps=min(defaults["sampling_steps"], self.limits.sampling_steps),
                            n_generations=min(defaults["n_generations"], self.limits.generations))
        return defaults


def settings_from_args(argv: Optional[list[str]] = None) -> tuple[AppSettings, str, int]:
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


# ============================================================================ helpers
@functools.lru_cache(maxsize=4)
def cached_model(spec: str, data_folder: str) -> ModelInfo:
    """Opened models, so each click does not rebuild the training data (the Load button clears it)."""
    return open_model(spec, data_folder)


def readable_errors(handler: Callable) -> Callable:
    """Show failures as a short message in the page, never a stack trace (which goes to the log)."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}); details are in the server log",
                           print_exception=False) from None
    return wrapper


def symlog10(value: float) -> float:
    """sign(x)·log10(1 + |x|): a log scale that also takes the negative losses of gradient ascent."""
    return math.copysign(math.log10(1.0 + abs(value)), value)


def loss_frame(state: JobState) -> pd.DataFrame:
    """The loss history in long form, one row per (step, term), for the line plot. The terms
    differ by orders of magnitude (ReTrack's unlearning term is often 10-50x its retain term),
    so the plot draws them on a log scale; the tooltip shows the plain values."""
    rows = []
    for event in state.losses:
        for term, value in (("total", event.loss), ("unlearning term", event.unlearn), ("retain term", event.retain)):
            rows.append(dict(step=event.step, log_loss=symlog10(value), term=term, loss=value))
    return pd.DataFrame(rows, columns=["step", "log_loss", "term", "loss"])


def metrics_table(state: JobState) -> str:
    """Before/after memorisation rate and quality as a Markdown table."""
    before, after = state.before, state.after
    if before is None:
        return ""

    def rate(evaluation) -> str:
        return "…" if evaluation is None else \
            f"{evaluation.rate:.0%} ({int(evaluation.flags.sum())} of {len(evaluation.scores)})"

    def quality(evaluation) -> str:
        return "…" if evaluation is None or evaluation.quality is None else f"{evaluation.quality:.3g}"

    def top(evaluation) -> str:
        return "…" if evaluation is None else f"{evaluation.scores.max():.2f}"

    note = f"\n\n*{state.scorer_note}*" if state.scorer_note else ""
    return "\n".join([
        "| | before | after |", "|---|---|---|",
        f"| memorisation rate (samples scoring above {before.threshold:.2f}) | {rate(before)} | {rate(after)} |",
        f"| highest memorisation score | {top(before)} | {top(after)} |",
        f"| quality: CLIP Fréchet distance to the retain set (lower is better) | {quality(before)} | {quality(after)} |",
    ]) + note


# ============================================================================ the page
def tiles(items: list[GalleryItem]) -> list[tuple]:
    """Gallery tiles (image, caption); grey images as 2-D arrays."""
    return [(item.image[..., 0] if item.image.shape[-1] == 1 else item.image, item.caption) for item in items]


def build_app(settings: AppSettings) -> gr.Blocks:
    """The whole page; `settings` picks the model shown first and the run defaults."""
    running: dict[str, Job] = {}  # browser session -> its job, so Cancel finds it
    running_lock = threading.Lock()
    unlearned: dict[str, str] = {}  # browser session -> folder of its last unlearned model (teaching views)
    first = settings.run_defaults("mnist")
    limits = settings.limits

    def open_checked(spec: str, data_folder: str) -> ModelInfo:
        """cached_model, for what a visitor typed: only folders the server allows."""
        settings.check_folders(spec, data_folder)
        return cached_model(spec, data_folder)

    with gr.Blocks(title="retrack: make a diffusion model forget") as demo:
        gr.Markdown("# retrack: make a diffusion model forget images\n"
                    "Pick images the model should no longer generate, fine-tune it with **ReTrack** (or a baseline) "
                    "and compare samples from the same seeds before and after.")
        gr.Markdown(f"**Device:** {describe_device()}", elem_id="device")
        if settings.limits is not None:
            gr.Markdown(settings.limits.describe(), elem_id="space-limits")

        # --- 1. model ---------------------------------------------------------------------
        gr.Markdown("## 1 · Model")
        with gr.Row():
            model_box = gr.Textbox(settings.model, label="Model", elem_id="model-path", scale=4,
                                   info="A diffusers folder (pixel DDPM or Stable Diffusion), or a Hub model id "
                                        "when online. Default: the built-in digits + T-shirt model.")
            data_box = gr.Textbox(settings.data, label="Training-data folder", elem_id="data-folder", scale=3,
                                  info="Only for your own model: the images it was trained on (the retain set).")
            load_button = gr.Button("Load", elem_id="load-model", scale=1)
        model_info = gr.Markdown(elem_id="model-info")

        # --- 2. forget set ----------------------------------------------------------------
        gr.Markdown("## 2 · What to forget")
        with gr.Group(visible=False) as prompt_group:  # shown for text-to-image models only
            with gr.Row():
                prompt_box = gr.Textbox(label="Memorised prompt", elem_id="prompt", scale=3,
                                        info="The prompt whose generations copy a training image; "
                                             "before/after samples use it.")
                training_prompt_box = gr.Textbox(label="Training prompt (optional)", elem_id="training-prompt",
                                                 scale=3, info="Fine-tune on this prompt instead, e.g. the prompt "
                                                               "without the words that trigger the copy (as the "
                                                               "paper does).")
            with gr.Row():
                n_generations = gr.Number(first["n_generations"], label="Generations to split",
                                          elem_id="n-generations", precision=0, minimum=4,
                                          maximum=limits.generations if limits else 256, scale=1,
                                          info="Images of the prompt (seeds 0, 1, ...) split into copies and the rest; "
                                               "an uploaded image, if any, marks which cluster is the copies. The "
                                               f"paper uses {PAPER_GENERATIONS} (the default on a GPU; 16 on a CPU).")
                generate_button = gr.Button("Generate & split", elem_id="generate-split", scale=1)
                split_note = gr.Markdown(elem_id="split-note")
            # The split as two sides; a click moves an image to the other side (edits the picks).
            with gr.Row():
                split_forget = gr.Gallery(label="Copies: to forget (click one to keep it)", elem_id="split-forget",
                                          columns=6, height=240, allow_preview=False, format="png",
                                          object_fit="contain")
                split_retain = gr.Gallery(label="The rest: kept (click one to forget it)", elem_id="split-retain",
                                          columns=6, height=240, allow_preview=False, format="png",
                                          object_fit="contain")
            split_forget_indices, split_retain_indices = gr.State([]), gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Training items: click to add to or remove from the forget set",
                                     elem_id="training-gallery", columns=8, height=330, allow_preview=False,
                                     format="png", object_fit="contain")
                gallery_indices = gr.State([])  # training index of each gallery tile
            with gr.Column(scale=2):
                picks_box = gr.Textbox(label="Training items to forget", elem_id="forget-picks",
                                       info="Numbers of training items (click the gallery, or type them).")
                uploads = gr.File(label="Or upload images to forget", elem_id="forget-upload",
                                  file_count="multiple", file_types=["image"], type="filepath")
                forget_summary = gr.Markdown(elem_id="forget-summary")
                forget_preview = gr.Image(label="Forget set", elem_id="forget-preview", format="png",
                                          interactive=False)

        # --- 3. method --------------------------------------------------------------------
        gr.Markdown("## 3 · Method")
        with gr.Row():
            method = gr.Dropdown([(label, name) for name, label in METHOD_LABELS.items()], value="retrack",
                                 label="Method", elem_id="method",
                                 info="ReTrack, or a baseline for comparison (same data, steps and optimiser).")
            k = gr.Number(first["k"], label="K neighbours", elem_id="k", precision=0, minimum=1,
                          info="Retain images each forget image is redirected to.")
            lam = gr.Number(first["lam"], label="λ (unlearning weight)", elem_id="lam", minimum=0, maximum=1,
                            info="Weight of the unlearning term; the retain term gets 1 − λ.")
            lr = gr.Number(first["lr"], label="Learning rate", elem_id="lr", info="AdamW, constant.")
            steps = gr.Number(first["steps"], label="Steps", elem_id="steps", precision=0, minimum=1,
                              maximum=limits.steps if limits else None,
                              info="Optimiser steps.")
            batch_size = gr.Number(first["batch_size"], label="Batch size", elem_id="batch-size", precision=0,
                                   minimum=1, info="Rows per branch (forget and retain) per micro-batch.")
        with gr.Accordion("More settings", open=False, elem_id="more-settings"):
            with gr.Row():
                grad_accum = gr.Number(first["grad_accum"], label="Gradient accumulation", elem_id="grad-accum",
                                       precision=0, minimum=1, info="Micro-batches per step.")
                weight_decay = gr.Number(first["weight_decay"], label="Weight decay", elem_id="weight-decay",
                                         info="AdamW weight decay.")
                beta1 = gr.Number(first["beta1"], label="AdamW β1", elem_id="beta1", info="First-moment decay.")
                beta2 = gr.Number(first["beta2"], label="AdamW β2", elem_id="beta2", info="Second-moment decay.")
                seed = gr.Number(first["seed"], label="Training seed", elem_id="seed", precision=0, minimum=0,
                                 info="Seeds the batches and noise.")
            with gr.Row():
                eta = gr.Number(first["eta"], label="EraseDiff η", elem_id="eta", info="EraseDiff's projection margin.")
                siss_c = gr.Number(first["siss_c"], label="SISS C", elem_id="siss-c",
                                   info="SISS: norm the forget gradient is rescaled to.")
            with gr.Row():
                n_samples = gr.Number(first["n_samples"], label="Samples to compare", elem_id="n-samples",
                                      precision=0, minimum=1, maximum=limits.samples if limits else 256,
                                      info="Drawn before and after from the same seeds.")
                sampling_steps = gr.Number(first["sampling_steps"], label="DDIM steps", elem_id="sampling-steps",
                                           precision=0, minimum=1, maximum=limits.sampling_steps if limits else None,
                                           info="Sampler steps per sample.")
                eval_seed = gr.Number(first["eval_seed"], label="First sample seed", elem_id="eval-seed",
                                      precision=0, minimum=0, info="Samples use seeds s, s+1, ...")
                trajectory_points = gr.Number(first["trajectory_points"], label="Trajectory points",
                                              elem_id="trajectory-points", precision=0, minimum=2, maximum=20,
                                              info="Timesteps shown in the teaching view.")
                guidance = gr.Number(7.5, label="Guidance scale", elem_id="guidance", minimum=0, maximum=50,
                                     info="Text-to-image models only: classifier-free guidance.")

        # --- 4. run -----------------------------------------------------------------------
        gr.Markdown("## 4 · Run")
        with gr.Row():
            run_button = gr.Button("Unlearn", variant="primary", elem_id="run")
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        status = gr.Textbox(label="Status", elem_id="status", interactive=False, lines=2)
        # The colours are named in the label: gradio draws the legend below the chart and clips it.
        loss_plot = gr.LinePlot(x="step", y="log_loss", color="term", elem_id="loss-plot", x_title="step",
                                label="Loss per step, log scale: total (black), unlearning term (orange), "
                                      "retain term (blue)", y_title="log10(1 + loss)", height=300,
                                color_map={"total": "#111827", "unlearning term": "#f97316",
                                           "retain term": "#2563eb"},
                                tooltip=["step", "term", "loss"])

        # --- 5. results -------------------------------------------------------------------
        gr.Markdown("## 5 · Results\nSamples from the same seeds, captioned *seed: memorisation score*; "
                    "red frames mark samples above the threshold (they reproduce a forget image).")
        with gr.Row():
            before_grid = gr.Image(label="Before", elem_id="before-grid", format="png", interactive=False)
            after_grid = gr.Image(label="After", elem_id="after-grid", format="png", interactive=False)
        metrics = gr.Markdown(elem_id="metrics")
        neighbours = gr.Image(label="Where the trajectories go: each forget image (red), then its nearest retain "
                                    "images; w = ReTrack weight, d = distance", elem_id="neighbours", format="png",
                              interactive=False)
        download = gr.File(label="Unlearned model (zip)", elem_id="download", interactive=False)

        # --- 6. teaching view -------------------------------------------------------------
        gr.Markdown("## 6 · Teaching view\nThe model's guess of the clean image at several timesteps while it "
                    "denoises one seed, from pure noise (left) to the final sample (right), before and after.")
        teaching_note = gr.Markdown(elem_id="teaching-note")
        trajectory = gr.Image(label="Denoising trajectory: before (top), after (bottom)", elem_id="trajectory",
                              format="png", interactive=False)
        after_model = teaching_views(settings, open_checked, model_box, data_box, picks_box, uploads)

        # ============================================================================ events
        # Controls whose defaults depend on the model family (set again whenever a model loads).
        family_fields = ["k", "lam", "lr", "steps", "batch_size", "grad_accum", "weight_decay", "beta1", "beta2", "eta",
                         "siss_c", "eval_seed"]
        family_controls = [k, lam, lr, steps, batch_size, grad_accum, weight_decay, beta1, beta2, eta, siss_c, eval_seed]

        @readable_errors
        def load(spec: str, data_folder: str):
            """Open a model: its summary, a gallery of its training items, its family's defaults."""
            try:
                model = open_checked(spec.strip(), data_folder.strip())
            except USER_ERRORS as exc:
                return (f"⚠ {exc}", gr.update(value=[]), [], "", gr.skip()) + tuple(gr.skip() for _ in family_controls)
            items = gallery_items(model.training_data) if model.training_data is not None else []
            defaults = settings.run_defaults(model.preset)
            values = [defaults[name] for name in family_fields]
            prompts = gr.update(visible=model.family == "latent")
            return (model.summary(), tiles(items), [item.index for item in items], "", prompts) + tuple(values)

        def reload(spec: str, data_folder: str):
            """The Load button: read the folders again (they may have changed on disk)."""
            cached_model.cache_clear()
            return load(spec, data_folder)

        load_outputs = [model_info, gallery, gallery_indices, picks_box, prompt_group] + family_controls
        demo.load(load, [model_box, data_box], load_outputs, api_name="load_model")
        load_button.click(reload, [model_box, data_box], load_outputs, api_visibility="private")
        model_box.submit(reload, [model_box, data_box], load_outputs, api_visibility="private")

        def pick(positions: list[int], picks: str, event: gr.SelectData) -> str:
            return toggle_pick(picks, positions[event.index])

        gallery.select(pick, [gallery_indices, picks_box], picks_box, api_visibility="private")
        split_forget.select(pick, [split_forget_indices, picks_box], picks_box, api_visibility="private")
        split_retain.select(pick, [split_retain_indices, picks_box], picks_box, api_visibility="private")

        @readable_errors
        def show_split(spec: str, data_folder: str, picks: str):
            """Text-to-image models: the training items as two sides, picked (forget) and kept."""
            try:
                model = open_checked(spec.strip(), data_folder.strip())
            except USER_ERRORS:
                return [], [], [], []
            if model.family != "latent" or model.training_data is None:
                return [], [], [], []
            forget_side, kept_side = split_items(model.training_data, parse_picks(picks))
            return (tiles(forget_side), [item.index for item in forget_side],
                    tiles(kept_side), [item.index for item in kept_side])

        split_inputs = [model_box, data_box, picks_box]
        split_outputs = [split_forget, split_forget_indices, split_retain, split_retain_indices]
        picks_box.change(show_split, split_inputs, split_outputs, api_name="split_view")

        @readable_errors
        def preview(spec: str, data_folder: str, picks: str, files: Optional[list[str]]):
            """The forget set as it will be used, or why it cannot be."""
            try:
                model = open_checked(spec.strip(), data_folder.strip())
                forget = build_forget_set(model, parse_picks(picks), files or [])
            except USER_ERRORS as exc:
                return (f"⚠ {exc}" if parse_picks(picks) or files else "Nothing picked yet."), None
            tiles = display_grid(forget.images[:32], labels=[source[:14] for source in forget.sources[:32]])
            lines = [f"**{len(forget)} image(s) to forget**; {len(forget.retain_index):,} training images kept."]
            lines += [f"- {note}" for note in forget.notes]
            return "\n".join(lines), tiles

        preview_inputs = [model_box, data_box, picks_box, uploads]
        picks_box.change(preview, preview_inputs, [forget_summary, forget_preview], api_name="preview_forget")
        uploads.change(preview, preview_inputs, [forget_summary, forget_preview], api_visibility="private")

        @gpu_task(limits.generate_gpu_seconds if limits else 60)
        @readable_errors
        def generate(spec: str, prompt: str, files: Optional[list[str]], count, sampling_value, guidance_value,
                     progress=gr.Progress()):
            """Text-to-image models: generations of the prompt become the training data; the
            cluster that copies a training image is picked to forget."""
            model = open_checked(spec.strip(), "")
            progress(0.0, desc="Waiting for the device")
            split = generate_split(model, prompt, settings.output_dir, n=whole(count), seed=0,
                                   steps=whole(sampling_value), guidance=number(guidance_value),
                                   reference=files[0] if files else None,
                                   on_batch=lambda done, total: progress((done, total), desc="Generating"))
            chosen = ("closest to your first uploaded image" if split.rule == "reference"
                      else "the tighter cluster: near-copies of one image look alike")
            note = (f"{len(split.memorised)} of {whole(count)} generations look memorised ({chosen}); they are picked "
                    f"to forget, the rest are kept. Click an image below to move it to the other side. {split.note}")
            loaded = list(load(spec, str(split.folder)))
            loaded[3] = ", ".join(f"#{i}" for i in split.memorised)  # the picks box
            return [str(split.folder), note] + loaded

        generate_button.click(generate, [model_box, prompt_box, uploads, n_generations, sampling_steps, guidance],
                              [data_box, split_note] + load_outputs, api_name="generate_split") \
            .then(show_split, split_inputs, split_outputs, api_visibility="private")  # also when the picks are unchanged

        def show_method_settings(name: str):
            return gr.update(visible=name == "retrack"), gr.update(visible=name == "retrack")

        method.change(show_method_settings, method, [k, lam], api_visibility="private")

        run_outputs = [status, loss_plot, before_grid, after_grid, metrics, neighbours, download,
                       teaching_note, trajectory]

        @gpu_task(limits.gpu_seconds if limits else 120)
        def run(spec: str, data_folder: str, picks: str, files: Optional[list[str]], prompt: str,
                training_prompt: str, method_name: str, k_value, lam_value, lr_value, steps_value, batch_value,
                accum_value, wd_value, beta1_value, beta2_value, eta_value, siss_c_value, seed_value, n_value,
                sampling_value, eval_seed_value, trajectory_value, guidance_value, request: gr.Request,
                progress=gr.Progress()) -> Iterator[tuple]:
            """Start a job and stream its state to the page until it ends."""
            try:
                model = open_checked(spec.strip(), data_folder.strip())
                forget = build_forget_set(model, parse_picks(picks), files or [])
                config = UnlearnConfig(method=method_name, k=whole(k_value), lam=number(lam_value), lr=number(lr_value),
                                       steps=whole(steps_value), batch_size=whole(batch_value),
                                       grad_accum=whole(accum_value), weight_decay=number(wd_value),
                                       betas=(number(beta1_value), number(beta2_value)), eta=number(eta_value),
                                       siss_c=number(siss_c_value), seed=whole(seed_value))
                evaluation = EvalSettings(n_samples=whole(n_value), seed=whole(eval_seed_value),
                                          sampling_steps=whole(sampling_value),
                                          trajectory_points=whole(trajectory_value),
                                          prompt=prompt if model.family == "latent" else "",
                                          guidance=number(guidance_value))
                if limits is not None:
                    limits.check(config, evaluation.n_samples, evaluation.sampling_steps)
                job = Job(model, forget, config, evaluation, settings.output_dir,
                          training_prompt=training_prompt if model.family == "latent" else "").start()
            except USER_ERRORS as exc:
                yield (f"⚠ {exc}",) + tuple(gr.skip() for _ in run_outputs[1:])
                return
            except Exception as exc:  # never a stack trace in the page
                log.exception("could not start a job")
                yield (f"⚠ Unexpected error ({type(exc).__name__}: {exc})",) + tuple(gr.skip() for _ in run_outputs[1:])
                return
            session = request.session_hash or job.id
            with running_lock:
                running[session] = job
            sent: dict[str, object] = {}
            try:
                for state in job.watch():
                    progress(state.progress, desc=state.message)
                    if state.model_dir is not None:
                        unlearned[session] = str(state.model_dir)
                    yield render(state, sent)
            finally:
                # The page was closed or the event was stopped: stop the job too.
                job.cancel()
                with running_lock:
                    if running.get(session) is job:
                        del running[session]

        def render(state: JobState, sent: dict[str, object]) -> tuple:
            """Outputs for one state; pictures only when they changed (they are sent as files)."""
            def once(name: str, value: object, make: Callable[[], object]):
                if value is None or sent.get(name) is value:
                    return gr.skip()
                sent[name] = value
                return make()

            before = once("before", state.before, lambda: state.before.grid())
            after = once("after", state.after, lambda: state.after.grid())
            nearest = once("neighbours", state.neighbours, lambda: state.neighbours)
            archive = once("archive", state.archive, lambda: str(state.archive))
            picture = once("trajectory", state.trajectory, lambda: state.trajectory)
            table = metrics_table(state) or gr.skip()
            losses = loss_frame(state) if state.losses else gr.skip()  # an empty frame would fix the axes as categories
            return (state.message, losses, before, after, table, nearest, archive,
                    state.teaching_note or gr.skip(), picture)

        run_inputs = [model_box, data_box, picks_box, uploads, prompt_box, training_prompt_box, method, k, lam, lr, steps,
                      batch_size, grad_accum, weight_decay, beta1, beta2, eta, siss_c, seed, n_samples, sampling_steps,
                      eval_seed, trajectory_points, guidance]
        # Jobs queue per device inside retrack.session (one training job per device at a time,
        # and a waiting job can still be cancelled), so gradio may start several run events.
        run_event = run_button.click(run, run_inputs, run_outputs, api_name="unlearn", show_progress_on=[status],
                                     concurrency_limit=limits.concurrent_runs if limits else 16,
                                     concurrency_id="unlearn")

        def cancel(request: gr.Request) -> str:
            with running_lock:
                job = running.get(request.session_hash)
            if job is None:
                return "Nothing is running."
            job.cancel()
            return "Cancelling..."

        # On ZeroGPU the job runs in the process lent the GPU, out of this one's reach: Cancel also
        # stops the event, and spaces then closes the job's stream there, which cancels the job.
        cancel_button.click(cancel, None, status, api_name="cancel", concurrency_limit=None, show_progress="hidden",
                            cancels=[run_event] if zero_gpu() else None)

        def show_unlearned(request: gr.Request):
            """The teaching views' "after" model: the folder this visitor's last job saved."""
            return unlearned.get(request.session_hash, gr.skip())

        download.change(show_unlearned, None, after_model, api_visibility="private")
    return demo


# ============================================================================ teaching views
# Noise-and-denoise and the likelihood of the forget image, before / after / oracle. The
# handlers only call retrack.session (teaching_images, teaching_models, renoise_view,
# likelihood_view); this section is layout and wiring.
def app_nll_settings(quick: bool) -> NLLSettings:
    """The app's likelihood setting: NLLSettings.cheap() (rtol = atol = 1e-3, 2 repeats); with
    --quick, looser still, so a test sees the table in seconds."""
    return NLLSettings.rough() if quick else NLLSettings.cheap()


def teaching_views(settings: AppSettings, open_checked: Callable[[str, str], ModelInfo], model_box: gr.Textbox,
                   data_box: gr.Textbox, picks_box: gr.Textbox, uploads: gr.File) -> gr.Textbox:
    """Layout and events of the two teaching views; returns the "after" model box (the page fills
    it when a job has saved its model)."""
    nll_settings = app_nll_settings(settings.quick)
    n_retain = 1 if settings.quick else 2
    gr.Markdown("### Noise and denoise\nThe first forget image (by default the training image copied most often) "
                "is noised to timestep *t* and denoised again by each model, all from the same noise. A model that "
                "memorised the image brings it back; after unlearning it should not (the oracle, retrained without "
                "it, shows what a model that never saw it does).")
    with gr.Row():
        after_box = gr.Textbox(label="Unlearned model (after)", elem_id="teach-after-model", scale=3,
                               info="Filled in when a run above has saved its model; or type a model folder.")
        t_slider = gr.Slider(0, 980, value=500, step=20, label="t (noise level, 0..980)", elem_id="renoise-t",
                             scale=3, info=f"Moves to the {RENOISE_STEPS}-step DDIM grid; 0: no noise.")
        noise_seed = gr.Number(0, label="Noise seed", elem_id="renoise-seed", precision=0, minimum=0, scale=1)
        renoise_button = gr.Button("Noise and denoise", elem_id="renoise-run", scale=1)
    renoise_note = gr.Markdown(elem_id="renoise-note")
    renoise_picture = gr.Image(label="The image, noised to t, then each model's result (before, after, oracle)",
                               elem_id="renoise-grid", format="png", interactive=False)
    gr.Markdown("### Likelihood of the forget image\nBits per dimension (lower: the model finds the image more "
                "likely) of the forget image and a few retain images, by the probability-flow ODE. Forgetting should "
                "raise the forget image's value toward the oracle's while the retain images' stay. *The page uses a "
                f"cheap setting (ODE tolerances {nll_settings.rtol:g}, {nll_settings.repeats} repeats per image), "
                "coarser than the benchmark's (Song et al.'s 1e-5, 4 repeats); ± is the estimator's standard "
                "error.*")
    with gr.Row():
        nll_button = gr.Button("Compute the likelihood", elem_id="nll-run")
    nll_table = gr.Markdown(elem_id="nll-table")

    def models_and_images(spec: str, data_folder: str, picks: str, files: Optional[list[str]], after: str):
        model = open_checked(spec.strip(), data_folder.strip())
        settings.check_folders(after, "")  # the "after" folder is a model folder a visitor may type
        return teaching_models(model, after or ""), teaching_images(model, parse_picks(picks), files or [], n_retain)

    @gpu_task(60)
    @readable_errors
    def show_renoise(spec: str, data_folder: str, picks: str, files: Optional[list[str]], after: str, t, seed):
        models, images = models_and_images(spec, data_folder, picks, files, after)
        picture, note = renoise_view(models, images.images[0], whole(t), whole(seed))
        return picture, note

    @gpu_task(120)
    def show_likelihood(spec: str, data_folder: str, picks: str, files: Optional[list[str]], after: str,
                        progress=gr.Progress()) -> Iterator[str]:
        """The table grows model by model (a generator: its errors are caught here, not by readable_errors)."""
        try:
            models, images = models_and_images(spec, data_folder, picks, files, after)
            progress(0.0, desc=f"Likelihood under {models[0][0]}")
            for done, rows in enumerate(likelihood_view(models, images, nll_settings), start=1):
                seconds = sum(row.result.seconds for row in rows) / len(rows)
                if done < len(models):
                    progress(done / len(models), desc=f"Likelihood under {models[done][0]}")
                yield likelihood_table(rows) + f"\n\n*{seconds:.0f} s per image on {describe_device()}.*"
        except USER_ERRORS as exc:
            yield f"⚠ {exc}"
        except Exception as exc:  # never a stack trace in the page
            log.exception("the likelihood failed")
            yield f"⚠ Unexpected error ({type(exc).__name__}: {exc}); details are in the server log"

    sources = [model_box, data_box, picks_box, uploads, after_box]
    renoise_button.click(show_renoise, sources + [t_slider, noise_seed], [renoise_picture, renoise_note],
                         api_name="renoise")
    nll_button.click(show_likelihood, sources, nll_table, api_name="likelihood", show_progress_on=[nll_table])
    return after_box


def number(value) -> float:
    """A number from a number box; an empty box (None, possible through the API) is refused."""
    if value is None:
        raise ValueError("a number box is empty")
    return float(value)


def whole(value) -> int:
    """A whole number from a number box (which may send 3.0); refuses 2.5."""
    if not number(value).is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(number(value))


def launch(settings: AppSettings, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the server; returns gradio's (app, local_url, share_url)."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    try:  # open the default model now, so the first page view is quick (and problems show here)
        log.info("opening %s", settings.model)
        cached_model(settings.model.strip(), settings.data.strip())
    except USER_ERRORS as exc:
        log.warning("the default model cannot be opened: %s", exc)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1, max_size=settings.limits.queue_size if settings.limits else None)
    for attempt in range(3):
        try:
            return demo.launch(server_name=host, server_port=port, max_file_size=settings.max_file_size,
                               allowed_paths=[str(settings.output_dir)], prevent_thread_lock=not block,
                               auth=settings.auth,
                               show_error=True, footer_links=["api"])
        except ValueError as exc:
            # gradio probes its own page once with a 3 s timeout; on a busy machine the probe can
            # time out although the server is fine. Start again rather than give up.
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            log.warning("the server did not answer gradio's start-up probe in time; starting again")
            demo.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    app_settings, app_host, app_port = settings_from_args()
    launch(app_settings, app_host, app_port)
