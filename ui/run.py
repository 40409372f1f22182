"""Sections 3 and 4 of the page: the method and its settings, and the run.

The run form's values arrive as one `RunForm` (page order, the order /unlearn takes them);
`RunForm.unlearn_config` and `RunForm.evaluation` map them to the library's settings in one
place. `RunSection.run` starts a `retrack.jobs.Job` and streams its state to the page until it
ends; Cancel (or closing the page) cancels it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional, Union

import gradio as gr

from retrack.comparison import Comparison
from retrack.engine import UnlearnConfig
from retrack.evaluation import RETURN_TIMESTEPS
from retrack.forget_set import ForgetSet, build_forget_set, parse_picks
from retrack.job_settings import MAX_EVAL_SAMPLES, EvalSettings
from retrack.jobs import Job, JobState
from retrack.models import ModelInfo
from retrack.objectives import METHODS
from retrack.presets import GUIDANCE

from .common import USER_ERRORS, Page, log, number, whole
from .results import render, status_only
from .settings import SpaceLimits, gpu_task, zero_gpu


@dataclass
class RunForm:
    """The run form's values in page order (sections 1 to 3): the inputs of /unlearn. Number
    boxes send floats, or None when empty through the API; `number` and `whole` check them.
    Section 2's "keep near-duplicates" box and section 3's "stop when forgotten" come last, with
    their defaults, so that callers of the API from before they existed keep working."""

    model: str
    data_folder: str
    picks: str
    uploads: Optional[list[str]]
    prompt: str
    training_prompt: str
    method: str
    k: Optional[float]
    lam: Optional[float]
    lr: Optional[float]
    steps: Optional[float]
    batch_size: Optional[float]
    grad_accum: Optional[float]
    weight_decay: Optional[float]
    beta1: Optional[float]
    beta2: Optional[float]
    eta: Optional[float]
    siss_c: Optional[float]
    seed: Optional[float]
    n_samples: Optional[float]
    sampling_steps: Optional[float]
    eval_seed: Optional[float]
    trajectory_points: Optional[float]
    guidance: Optional[float]
    keep_near_duplicates: bool = False
    until_forgotten: bool = False

    def unlearn_config(self) -> UnlearnConfig:
        """The training settings (checked by the Job)."""
        return UnlearnConfig(method=self.method, k=whole(self.k), lam=number(self.lam), lr=number(self.lr),
                             steps=whole(self.steps), batch_size=whole(self.batch_size),
                             grad_accum=whole(self.grad_accum), weight_decay=number(self.weight_decay),
                             betas=(number(self.beta1), number(self.beta2)), eta=number(self.eta),
                             siss_c=number(self.siss_c), seed=whole(self.seed))

    def evaluation(self, family: str, defaults: dict) -> EvalSettings:
        """How before and after are compared; the prompt only for text-to-image models. The grid
        size and the live curve's settings are the server's (`defaults`: AppSettings.run_defaults)."""
        return EvalSettings(n_samples=whole(self.n_samples), seed=whole(self.eval_seed),
                            sampling_steps=whole(self.sampling_steps), trajectory_points=whole(self.trajectory_points),
                            prompt=self.prompt if family == "latent" else "", guidance=number(self.guidance),
                            until_forgotten=bool(self.until_forgotten), **{name: defaults[name] for name in LIVE_DEFAULTS})


# Evaluation settings the page does not ask for: the server's defaults (AppSettings.run_defaults).
LIVE_DEFAULTS = ("grid_samples", "live_every", "live_samples", "live_steps", "live_return_copies")


def method_settings(first: dict, limits: Optional[SpaceLimits]) -> dict[str, gr.components.Component]:
    """Section 3's controls, keyed by their RunForm field, starting at the defaults `first`."""
    controls: dict[str, gr.components.Component] = {}
    gr.Markdown("## 3 · Method")
    with gr.Row():
        controls["method"] = gr.Dropdown([(method.label, name) for name, method in METHODS.items()], value="retrack",
                                         label="Method", elem_id="method",
                                         info="ReTrack, or a baseline for comparison (same data, steps and optimiser).")
        controls["k"] = gr.Number(first["k"], label="K neighbours", elem_id="k", precision=0, minimum=1,
                                  info="Retain images each forget image is redirected to.")
        controls["lam"] = gr.Number(first["lam"], label="λ (unlearning weight)", elem_id="lam", minimum=0, maximum=1,
                                    info="Weight of the unlearning term; the retain term gets 1 − λ.")
        controls["lr"] = gr.Number(first["lr"], label="Learning rate", elem_id="lr", info="AdamW, constant.")
        controls["steps"] = gr.Number(first["steps"], label="Steps", elem_id="steps", precision=0, minimum=1,
                                      maximum=limits.steps if limits else None, info="Optimiser steps.")
        controls["batch_size"] = gr.Number(first["batch_size"], label="Batch size", elem_id="batch-size", precision=0,
                                           minimum=1, info="Rows per branch (forget and retain) per micro-batch.")
    controls["until_forgotten"] = gr.Checkbox(
        False, label="Stop when forgotten", elem_id="until-forgotten",
        info="At each live point, check that the forget image's noisy copies land as far from it as the oracle's "
             "(or, without an oracle, as the model's own training images'), with no more copies and quality held "
             "under both samplers; stop at the first check that passes. Steps is then the cap.")
    with gr.Accordion("More settings", open=False, elem_id="more-settings"):
        with gr.Row():
            controls["grad_accum"] = gr.Number(first["grad_accum"], label="Gradient accumulation",
                                               elem_id="grad-accum", precision=0, minimum=1,
                                               info="Micro-batches per step.")
            controls["weight_decay"] = gr.Number(first["weight_decay"], label="Weight decay", elem_id="weight-decay",
                                                 info="AdamW weight decay.")
            controls["beta1"] = gr.Number(first["beta1"], label="AdamW β1", elem_id="beta1",
                                          info="First-moment decay.")
            controls["beta2"] = gr.Number(first["beta2"], label="AdamW β2", elem_id="beta2",
                                          info="Second-moment decay.")
            controls["seed"] = gr.Number(first["seed"], label="Training seed", elem_id="seed", precision=0, minimum=0,
                                         info="Seeds the batches and noise.")
        with gr.Row():
            controls["eta"] = gr.Number(first["eta"], label="EraseDiff η", elem_id="eta",
                                        info="EraseDiff's projection margin.")
            controls["siss_c"] = gr.Number(first["siss_c"], label="SISS C", elem_id="siss-c",
                                           info="SISS: norm the forget gradient is rescaled to.")
        with gr.Row():
            controls["n_samples"] = gr.Number(first["n_samples"], label="Samples to compare", elem_id="n-samples",
                                              precision=0, minimum=1,
                                              maximum=limits.samples if limits else MAX_EVAL_SAMPLES,
                                              info="Drawn before and after from the same seeds; the memorisation "
                                                   "rate is measured on all of them.")
            controls["sampling_steps"] = gr.Number(first["sampling_steps"], label="Sampler steps",
                                                   elem_id="sampling-steps", precision=0, minimum=1,
                                                   maximum=limits.sampling_steps if limits else None,
                                                   info="Sampler steps per sample.")
            controls["eval_seed"] = gr.Number(first["eval_seed"], label="First sample seed", elem_id="eval-seed",
                                              precision=0, minimum=0, info="Samples use seeds s, s+1, ...")
            controls["trajectory_points"] = gr.Number(first["trajectory_points"], label="Trajectory points",
                                                      elem_id="trajectory-points", precision=0, minimum=2, maximum=20,
                                                      info="Timesteps shown in the teaching view.")
            controls["guidance"] = gr.Number(GUIDANCE, label="Guidance scale", elem_id="guidance", minimum=0, maximum=50,
                                             info="Text-to-image models only: classifier-free guidance.")
    return controls


def show_method_settings(name: str) -> tuple:
    """K and λ are ReTrack's settings: shown for ReTrack only."""
    return gr.update(visible=name == "retrack"), gr.update(visible=name == "retrack")


# The live noise-and-denoise curve's colours: blue for the model, grey for the oracle; light for the
# lower t, dark for the higher.
RETURN_COLOURS = {**{f"t = {t}": colour for t, colour in zip(RETURN_TIMESTEPS, ("#60a5fa", "#1d4ed8"))},
                  **{f"oracle, t = {t}": colour for t, colour in zip(RETURN_TIMESTEPS, ("#d1d5db", "#6b7280"))}}


def prepare(page: Page, form: RunForm) -> tuple[ModelInfo, ForgetSet, UnlearnConfig, EvalSettings]:
    """What a run needs from the form: the model, the forget set (refused when an upload is
    unusable: the preview uses the good files, a run would forget less than asked for), the
    training and evaluation settings, checked against the server's limits."""
    model = page.open_model(form.model, form.data_folder)
    forget = build_forget_set(model, parse_picks(form.picks), form.uploads or [],
                              keep_near_duplicates=bool(form.keep_near_duplicates))
    if forget.refused:
        raise ValueError(f"{'; '.join(forget.refused)} (remove the file(s) above, or replace them, "
                         "and press Unlearn again)")
    config = form.unlearn_config()
    evaluation = form.evaluation(model.family, page.settings.run_defaults(model.preset))
    if page.settings.limits is not None:
        page.settings.limits.check(config, evaluation.n_samples, evaluation.sampling_steps)
    return model, forget, config, evaluation


def start_work(page: Page, form: RunForm, make: Callable[..., Union[Job, Comparison]]
               ) -> tuple[Optional[Union[Job, Comparison]], str]:
    """Start what `make(model, forget, config, evaluation, training_prompt)` builds from the form (a
    job or a comparison) and return it with ""; or None and the message the page shows instead:
    the user's mistake, or an unexpected error (logged; never a stack trace in the page)."""
    try:
        model, forget, config, evaluation = prepare(page, form)
        prompt = form.training_prompt if model.family == "latent" else ""
        return make(model, forget, config, evaluation, prompt).start(), ""
    except USER_ERRORS as exc:
        return None, f"⚠ {exc}"
    except Exception as exc:
        log.exception("could not start")
        return None, f"⚠ Unexpected error ({type(exc).__name__}: {exc})"


def stream(page: Page, session: str, work: Union[Job, Comparison], progress: gr.Progress,
           show: Callable[[Any], tuple]) -> Iterator[tuple]:
    """`show` each state of `work` (a started job or comparison) on the page until it ends, with
    gradio's progress bar; meanwhile it is this visitor's running work, which Cancel stops, and
    it is stopped when the page is closed or the event is stopped."""
    with page.lock:
        page.running[session] = work
    try:
        for state in work.watch():
            progress(state.progress, desc=state.message)
            yield show(state)
    finally:
        work.cancel()
        with page.lock:
            if page.running.get(session) is work:
                del page.running[session]


class RunSection:
    """The method settings (section 3), Unlearn and Cancel, the status line, the loss plot and the
    two live curves (section 4)."""

    def __init__(self, page: Page, first: dict) -> None:
        self.page = page
        self.controls = method_settings(first, page.settings.limits)
        gr.Markdown("## 4 · Run")
        with gr.Row():
            self.run_button = gr.Button("Unlearn", variant="primary", elem_id="run")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        self.status = gr.Textbox(label="Status", elem_id="status", interactive=False, lines=3)
        # The colours are named in the label: gradio draws the legend below the chart and clips it.
        live = page.settings.run_defaults("mnist")
        with gr.Row():
            self.loss_plot = gr.LinePlot(x="step", y="log_loss", color="term", elem_id="loss-plot", x_title="step",
                                         label="Loss per step, log scale: total (black), unlearning term (orange), "
                                               "retain term (blue)", y_title="log10(1 + loss)", height=300,
                                         color_map={"total": "#111827", "unlearning term": "#f97316",
                                                    "retain term": "#2563eb"},
                                         tooltip=["step", "term", "loss"])
            self.memorisation_plot = gr.LinePlot(
                x="step", y="percent", color="measure", elem_id="memorisation-plot", x_title="step",
                y_title="% of samples", height=300, color_map={"pixel L2": "#111827", "CLIP": "#f97316"},
                tooltip=["step", "measure", "percent", "rate", "seconds"],
                label=f"Memorisation while training: {live['live_samples']} fixed samples "
                      f"({live['live_steps'] or live['sampling_steps']} sampler steps) every {live['live_every']} steps; "
                      "the excess over the oracle where the model "
                      "has one (0: no more near-copies than a model that never saw the image), else the copy rate; "
                      "pixel L2 (black), CLIP (orange)")
        low, high = RETURN_TIMESTEPS
        self.return_plot = gr.LinePlot(
            x="step", y="distance", color="curve", elem_id="return-plot", x_title="step",
            y_title="mean distance to the image (pixel L2)", height=300, color_map=RETURN_COLOURS,
            tooltip=["step", "curve", "distance", "back"],
            label=f"Noise and denoise while training: the forget image noised to t = {low} (light blue) and "
                  f"t = {high} (dark blue) with {live['live_return_copies']} fixed seeds, then denoised; how far "
                  "the copies land from it on average. Near 0: the model brings the image back; rising: it "
                  "forgets. Grey: the oracle's level, where the model has one (a model that never saw the image)")

    def run(self, request: gr.Request, progress=gr.Progress(), *values) -> Iterator[tuple]:
        """Start a job with the RunForm `values` and stream its state to the page until it ends
        (gradio puts the request and progress first, then the form's values)."""
        output_root = self.page.settings.output_dir
        job, error = start_work(self.page, RunForm(*values), lambda model, forget, config, evaluation, prompt: Job(
            model, forget, config, evaluation, output_root, training_prompt=prompt))
        if job is None:
            yield status_only(error)
            return
        sent: dict[str, object] = {}

        def show(state: JobState) -> tuple:
            if state.model_dir is not None:  # the teaching views' "after"
                self.page.unlearned[request.session_hash or job.id] = str(state.model_dir)
            return render(state, sent)

        yield from stream(self.page, request.session_hash or job.id, job, progress, show)

    def cancel(self, request: gr.Request) -> str:
        """Cancel this visitor's running job or comparison."""
        with self.page.lock:
            work = self.page.running.get(request.session_hash)
        if work is None:
            return "Nothing is running."
        work.cancel()
        return "Cancelling..."

    def connect(self, form_sources: dict[str, gr.components.Component], outputs: list) -> None:
        """Unlearn runs a job from the form (`form_sources`: sections 1 and 2's boxes by RunForm
        field) into the JOB_OUTPUTS `outputs`; Cancel stops it; the method shows its settings."""
        sources = form_sources | self.controls
        limits = self.page.settings.limits
        self.controls["method"].change(show_method_settings, self.controls["method"],
                                       [self.controls["k"], self.controls["lam"]], api_visibility="private")
        # Jobs queue per device inside retrack.jobs (one training job per device at a time, and a
        # waiting job can still be cancelled), so gradio may start several run events.
        run_event = self.run_button.click(gpu_task(limits.gpu_seconds if limits else 120)(self.run),
                                          [sources[f.name] for f in fields(RunForm)], outputs, api_name="unlearn",
                                          show_progress_on=[self.status],
                                          concurrency_limit=limits.concurrent_runs if limits else 16,
                                          concurrency_id="unlearn")
        # On ZeroGPU the job runs in the process lent the GPU, out of this one's reach: Cancel also
        # stops the event, and spaces then closes the job's stream there, which cancels the job.
        self.cancel_button.click(self.cancel, None, self.status, api_name="cancel", concurrency_limit=None,
                                 show_progress="hidden", cancels=[run_event] if zero_gpu() else None)
