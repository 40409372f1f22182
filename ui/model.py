"""Section 1 of the page: the model, and what opening one sets in the other sections.

`model_view` opens a model (cached) and returns everything the page shows for it: its summary,
a gallery of its training items, the picks, whether the text-to-image boxes show, and its
family's run defaults. "Generate & split" reuses it with the split's picks.
"""

from __future__ import annotations

import gradio as gr

from retrack.forget_set import default_picks, gallery_items
from retrack.models import ModelInfo

from .common import USER_ERRORS, Page, cached_model, readable_errors, tiles

# Run-form fields whose defaults depend on the model family (set again whenever a model loads).
FAMILY_FIELDS = ("k", "lam", "lr", "steps", "batch_size", "grad_accum", "weight_decay", "beta1", "beta2", "eta",
                 "siss_c", "eval_seed")


def model_summary(model: ModelInfo) -> str:
    """A few lines of Markdown about a model and its training data."""
    colour = "grayscale" if model.channels == 1 else "RGB"
    lines = [f"**{model.path.name}**: {model.family} diffusion model, {model.image_size}×{model.image_size} {colour}, "
             f"published settings of the *{model.preset}* family."]
    if model.training_data is not None:
        lines.append(f"Training data: {model.training_data.origin}.")
    elif model.family == "latent":
        lines.append("Training data unknown: name a folder of images to keep (the retain set), including the "
                     "ones to forget, and type the memorised prompt below.")
    else:
        lines.append("Training data unknown: name the folder of images it was trained on (the retain set).")
    return "  \n".join(lines)


def model_view(page: Page, spec: str, data_folder: str, picks: str = "") -> tuple:
    """The outputs of opening a model (ModelSection.view_outputs, in that order): summary,
    gallery tiles, the training index of each tile, the picks (`picks`, else the model's
    `default_picks`: the built-in model's T-shirt), the text-to-image group's visibility, then the
    family defaults of FAMILY_FIELDS. A model that cannot be opened shows
    why and leaves the run form as it is."""
    try:
        model = page.open_model(spec, data_folder)
    except USER_ERRORS as exc:
        return (f"⚠ {exc}", gr.update(value=[]), [], "", gr.skip()) + tuple(gr.skip() for _ in FAMILY_FIELDS)
    items = gallery_items(model.training_data) if model.training_data is not None else []
    defaults = page.settings.run_defaults(model.preset)
    prompts = gr.update(visible=model.family == "latent")
    return ((model_summary(model), tiles(items), [item.index for item in items], picks or default_picks(model), prompts)
            + tuple(defaults[name] for name in FAMILY_FIELDS))


class ModelSection:
    """The model and training-data boxes, the Load button and the model's summary."""

    def __init__(self, page: Page) -> None:
        self.page = page
        gr.Markdown("## 1 · Model")
        with gr.Row():
            self.model_box = gr.Textbox(page.settings.model, label="Model", elem_id="model-path", scale=4,
                                        info="A diffusers folder (pixel DDPM or Stable Diffusion), or a Hub model id "
                                             "when online. Default: the built-in digits + T-shirt model.")
            self.data_box = gr.Textbox(page.settings.data, label="Training-data folder", elem_id="data-folder",
                                       scale=3,
                                       info="Only for your own model: the images it was trained on (the retain set).")
            self.load_button = gr.Button("Load", elem_id="load-model", scale=1)
        self.model_info = gr.Markdown(elem_id="model-info")

    @readable_errors
    def load(self, spec: str, data_folder: str) -> tuple:
        """Open a model: its summary, a gallery of its training items, its family's defaults."""
        return model_view(self.page, spec, data_folder)

    def reload(self, spec: str, data_folder: str) -> tuple:
        """The Load button: read the folders again (they may have changed on disk)."""
        cached_model.cache_clear()
        return self.load(spec, data_folder)

    def connect(self, demo: gr.Blocks, view_outputs: list) -> None:
        """Open the model when the page loads, on Load and on Enter in the model box."""
        sources = [self.model_box, self.data_box]
        demo.load(self.load, sources, view_outputs, api_name="load_model")
        self.load_button.click(self.reload, sources, view_outputs, api_visibility="private")
        self.model_box.submit(self.reload, sources, view_outputs, api_visibility="private")
