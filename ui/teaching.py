"""Section 7 of the page: the teaching view.

A job's denoising trajectory (drawn by the job, shown here), then noise-and-denoise and the
likelihood of the forget image under the models before / after / oracle. The handlers only call
`retrack.teaching` (teaching_images, teaching_models, renoise_view, likelihood_view); this
module is layout and wiring.
"""

from __future__ import annotations

from typing import Iterator, Optional

import gradio as gr

from retrack.devices import describe_device
from retrack.forget_set import parse_picks
from retrack.likelihood import NLLSettings, likelihood_table
from retrack.teaching import RENOISE_STEPS, TeachingImages, likelihood_view, renoise_view, teaching_images, teaching_models

from .common import USER_ERRORS, Page, log, readable_errors, whole
from .settings import gpu_task


def app_nll_settings(quick: bool) -> NLLSettings:
    """The app's likelihood setting: NLLSettings.cheap() (rtol = atol = 1e-3, 2 repeats); with
    --quick, looser still, so a test sees the table in seconds."""
    return NLLSettings.rough() if quick else NLLSettings.cheap()


class TeachingSection:
    """The trajectory of a job, and the noise-and-denoise and likelihood views with their buttons."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.nll_settings = app_nll_settings(page.settings.quick)
        self.n_retain = 1 if page.settings.quick else 2
        gr.Markdown("## 7 · Teaching view\nThe model's guess of the clean image at several timesteps while it "
                    "denoises one seed, from pure noise (left) to the final sample (right), before and after.")
        self.teaching_note = gr.Markdown(elem_id="teaching-note")
        self.trajectory = gr.Image(label="Denoising trajectory: before (top), after (bottom)", elem_id="trajectory",
                                   format="png", interactive=False)
        gr.Markdown("### Noise and denoise\nThe first forget image (by default the training image copied most "
                    "often) is noised to timestep *t* and denoised again by each model, all from the same noise. A "
                    "model that memorised the image brings it back; after unlearning it should not (the oracle, "
                    "retrained without it, shows what a model that never saw it does).")
        with gr.Row():
            self.after_box = gr.Textbox(label="Unlearned model (after)", elem_id="teach-after-model", scale=3,
                                        info="Filled in when a run above has saved its model; or type a model folder.")
            self.t_slider = gr.Slider(0, 980, value=500, step=20, label="t (noise level, 0..980)", elem_id="renoise-t",
                                      scale=3, info=f"Moves to the {RENOISE_STEPS}-step DDIM grid; 0: no noise.")
            self.noise_seed = gr.Number(0, label="Noise seed", elem_id="renoise-seed", precision=0, minimum=0, scale=1)
            self.renoise_button = gr.Button("Noise and denoise", elem_id="renoise-run", scale=1)
        self.renoise_note = gr.Markdown(elem_id="renoise-note")
        self.renoise_picture = gr.Image(label="The image, noised to t, then each model's result (before, after, "
                                              "oracle)", elem_id="renoise-grid", format="png", interactive=False)
        gr.Markdown("### Likelihood of the forget image\nBits per dimension (lower: the model finds the image more "
                    "likely) of the forget image and a few retain images, by the probability-flow ODE. Forgetting "
                    "should raise the forget image's value toward the oracle's while the retain images' stay. *The "
                    f"page uses a cheap setting (ODE tolerances {self.nll_settings.rtol:g}, "
                    f"{self.nll_settings.repeats} repeats per image), coarser than the benchmark's (Song et al.'s "
                    "1e-5, 4 repeats); ± is the estimator's standard error.*")
        with gr.Row():
            self.nll_button = gr.Button("Compute the likelihood", elem_id="nll-run")
        self.nll_table = gr.Markdown(elem_id="nll-table")

    def models_and_images(self, spec: str, data_folder: str, picks: str, files: Optional[list[str]],
                          after: str) -> tuple[list, TeachingImages]:
        """The models to compare and the images to look at, from what the page holds."""
        model = self.page.open_model(spec, data_folder)
        self.page.settings.check_folders(after, "")  # the "after" folder is a model folder a visitor may type
        return (teaching_models(model, after or ""),
                teaching_images(model, parse_picks(picks), files or [], self.n_retain))

    @readable_errors
    def show_renoise(self, spec: str, data_folder: str, picks: str, files: Optional[list[str]], after: str, t, seed):
        """The noise-and-denoise picture and its note."""
        models, images = self.models_and_images(spec, data_folder, picks, files, after)
        picture, note = renoise_view(models, images.images[0], whole(t), whole(seed))
        return picture, note

    def show_likelihood(self, spec: str, data_folder: str, picks: str, files: Optional[list[str]], after: str,
                        progress=gr.Progress()) -> Iterator[str]:
        """The table grows model by model (a generator: its errors are caught here, not by readable_errors)."""
        try:
            models, images = self.models_and_images(spec, data_folder, picks, files, after)
            progress(0.0, desc=f"Likelihood under {models[0][0]}")
            for done, rows in enumerate(likelihood_view(models, images, self.nll_settings), start=1):
                seconds = sum(row.result.seconds for row in rows) / len(rows)
                if done < len(models):
                    progress(done / len(models), desc=f"Likelihood under {models[done][0]}")
                yield likelihood_table(rows) + f"\n\n*{seconds:.0f} s per image on {describe_device()}.*"
        except USER_ERRORS as exc:
            yield f"⚠ {exc}"
        except Exception as exc:  # never a stack trace in the page
            log.exception("the likelihood failed")
            yield f"⚠ Unexpected error ({type(exc).__name__}: {exc}); details are in the server log"

    def show_unlearned(self, request: gr.Request):
        """The "after" model: the folder this visitor's last job saved."""
        return self.page.unlearned.get(request.session_hash, gr.skip())

    def connect(self, sources: list, download: gr.File) -> None:
        """The two views read the model, picks and uploads (`sources`) and the "after" box, which
        a finished job fills (its zip appearing in `download` is the signal)."""
        sources = sources + [self.after_box]
        self.renoise_button.click(gpu_task(60)(self.show_renoise), sources + [self.t_slider, self.noise_seed],
                                  [self.renoise_picture, self.renoise_note], api_name="renoise")
        self.nll_button.click(gpu_task(120)(self.show_likelihood), sources, self.nll_table, api_name="likelihood",
                              show_progress_on=[self.nll_table])
        download.change(self.show_unlearned, None, self.after_box, api_visibility="private")
