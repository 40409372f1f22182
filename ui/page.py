"""The whole page: its sections top to bottom, how they are wired, and the server.

The page reads in the order a user works: model, forget set, method and run, results, methods
side by side, teaching view; each section is a module of this package with its handlers. `build_app` lays them out and
connects them; `launch` starts the server.
"""

from __future__ import annotations

import gradio as gr

from retrack.devices import describe_device
from retrack.forget_set import near_duplicate_index

from .common import USER_ERRORS, Page, cached_model, log
from .compare import CompareSection
from .forget_set import ForgetSection
from .model import FAMILY_FIELDS, ModelSection
from .results import JOB_OUTPUTS, ResultsSection
from .run import RunSection
from .settings import AppSettings
from .teaching import TeachingSection


def build_app(settings: AppSettings) -> gr.Blocks:
    """The whole page; `settings` picks the model shown first and the run defaults."""
    page = Page(settings)
    first = settings.run_defaults("mnist")
    with gr.Blocks(title="retrack: make a diffusion model forget") as demo:
        gr.Markdown("# retrack: make a diffusion model forget images\n"
                    "Pick images the model should no longer generate, fine-tune it with **ReTrack** (or a baseline) "
                    "and compare samples from the same seeds before and after.")
        gr.Markdown(f"**Device:** {describe_device()}", elem_id="device")
        if settings.limits is not None:
            gr.Markdown(settings.limits.describe(), elem_id="space-limits")
        model = ModelSection(page)
        forget = ForgetSection(page, first)
        run = RunSection(page, first)
        results = ResultsSection(first["grid_samples"])
        compare = CompareSection(page, first)
        teaching = TeachingSection(page)

        # What opening a model sets (ui.model.model_view): its summary, the gallery, the picks,
        # the text-to-image boxes and the family's defaults in the run form.
        view_outputs = [model.model_info, forget.gallery, forget.gallery_indices, forget.picks_box,
                        forget.prompt_group] + [run.controls[name] for name in FAMILY_FIELDS]
        teaching.connect([model.model_box, model.data_box, forget.picks_box, forget.uploads], results.download)
        model.connect(demo, view_outputs)
        limits = settings.limits
        forget.connect(model.model_box, model.data_box, view_outputs, run.controls["sampling_steps"],
                       run.controls["guidance"], generate_seconds=limits.generate_gpu_seconds if limits else 60)
        form_sources = {"model": model.model_box, "data_folder": model.data_box, "picks": forget.picks_box,
                        "uploads": forget.uploads, "prompt": forget.prompt_box,
                        "training_prompt": forget.training_prompt_box,
                        "keep_near_duplicates": forget.keep_near_duplicates}
        # A job streams into components of three sections, named by ui.results.JOB_OUTPUTS.
        components = {**vars(run), **vars(results), **vars(teaching)}
        run.connect(form_sources, [components[name] for name in JOB_OUTPUTS])
        compare.connect(form_sources | run.controls, run.cancel)
    return demo


def launch(settings: AppSettings, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the server; returns gradio's (app, local_url, share_url)."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    try:  # open the default model now, so the first page view is quick (and problems show here)
        log.info("opening %s", settings.model)
        model = cached_model(settings.model.strip(), settings.data.strip())
        if model.training_data is not None:  # and its near-duplicate search, which the first preview uses
            near_duplicate_index(model)
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
