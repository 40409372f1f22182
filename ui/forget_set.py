"""Section 2 of the page: what to forget.

The picks text box is the single source of truth for the forget set: a click on a gallery tile
toggles that training item in it (`pick`), and the preview (`preview`) shows the forget set
`retrack.forget_set.build_forget_set` makes of the picks and the uploads, with the training
items found near a forget image (left out of the retain set unless "keep near-duplicates" is
ticked) and every upload that could not be used. Text-to-image models
get "Generate & split" (`generate`): generations of the memorised prompt become the training
data, the copies are picked, and `show_split` shows both sides.
"""

from __future__ import annotations

from typing import Optional

import gradio as gr

from retrack.forget_set import (
    ForgetSet, GalleryItem, build_forget_set, format_picks, generate_split, parse_picks, split_items, toggle_pick,
)
from retrack.models import TrainingData
from retrack.grids import display_grid
from retrack.split import PAPER_GENERATIONS

from .common import USER_ERRORS, Page, number, readable_errors, tiles, whole
from .model import model_view
from .settings import gpu_task


def pick(positions: list[int], picks: str, event: gr.SelectData) -> str:
    """A click on a tile: toggle the training item it shows in the picks."""
    return toggle_pick(picks, positions[event.index])


def near_duplicate_items(data: TrainingData, forget: ForgetSet, limit: int = 16) -> list[GalleryItem]:
    """One tile per distinct near-duplicate image (the first `limit`), captioned with its number,
    copies, distances and whether it stays in the retain set."""
    fate = "kept" if forget.near_duplicates_kept else "left out"
    items = []
    for item, copies in forget.near_duplicates.distinct()[:limit]:
        clip = "" if item.clip_similarity is None else f" CLIP {item.clip_similarity:.3f}"
        caption = f"#{item.index} {data.names[item.index]} ×{copies} L2 {item.pixel_l2:.2f}{clip} ({fate})"
        items.append(GalleryItem(item.index, data.images[item.index], copies, caption))
    return items


class ForgetSection:
    """Picks (gallery or typed numbers), uploads, the forget-set preview; for text-to-image
    models the prompts and "Generate & split" with its two galleries."""

    def __init__(self, page: Page, first: dict) -> None:
        self.page = page
        limits = page.settings.limits
        gr.Markdown("## 2 · What to forget")
        with gr.Group(visible=False) as self.prompt_group:  # shown for text-to-image models only
            with gr.Row():
                self.prompt_box = gr.Textbox(label="Memorised prompt", elem_id="prompt", scale=3,
                                             info="The prompt whose generations copy a training image; "
                                                  "before/after samples use it.")
                self.training_prompt_box = gr.Textbox(
                    label="Training prompt (optional)", elem_id="training-prompt", scale=3,
                    info="Fine-tune on this prompt instead, e.g. the prompt without the words that trigger the copy "
                         "(as the paper does).")
            with gr.Row():
                self.n_generations = gr.Number(
                    first["n_generations"], label="Generations to split", elem_id="n-generations", precision=0,
                    minimum=4, maximum=limits.generations if limits else 256, scale=1,
                    info="Images of the prompt (seeds 0, 1, ...) split into copies and the rest; an uploaded image, "
                         f"if any, marks which cluster is the copies. The paper uses {PAPER_GENERATIONS} (the default "
                         "on a GPU; 16 on a CPU).")
                self.generate_button = gr.Button("Generate & split", elem_id="generate-split", scale=1)
                self.split_note = gr.Markdown(elem_id="split-note")
            # The split as two sides; a click moves an image to the other side (edits the picks).
            with gr.Row():
                self.split_forget = gr.Gallery(label="Copies: to forget (click one to keep it)",
                                               elem_id="split-forget", columns=6, height=240, allow_preview=False,
                                               format="png", object_fit="contain")
                self.split_retain = gr.Gallery(label="The rest: kept (click one to forget it)",
                                               elem_id="split-retain", columns=6, height=240, allow_preview=False,
                                               format="png", object_fit="contain")
            self.split_forget_indices, self.split_retain_indices = gr.State([]), gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                self.gallery = gr.Gallery(label="Training items: click to add to or remove from the forget set",
                                          elem_id="training-gallery", columns=8, height=330, allow_preview=False,
                                          format="png", object_fit="contain")
                self.gallery_indices = gr.State([])  # training index of each gallery tile
            with gr.Column(scale=2):
                self.picks_box = gr.Textbox(label="Training items to forget", elem_id="forget-picks",
                                            info="Numbers of training items (click the gallery, or type them).")
                self.uploads = gr.File(label="Or upload images to forget", elem_id="forget-upload",
                                       file_count="multiple", file_types=["image"], type="filepath")
                self.keep_near_duplicates = gr.Checkbox(
                    False, label="Keep near-duplicates in the retain set", elem_id="keep-near-duplicates",
                    info="Training items that are a forget image up to small changes (brightness, a pixel's shift) "
                         "leave the retain set with its exact copies; tick to keep them.")
                self.forget_summary = gr.Markdown(elem_id="forget-summary")
                self.forget_preview = gr.Image(label="Forget set", elem_id="forget-preview", format="png",
                                               interactive=False)
                self.near_duplicates = gr.Gallery(label="Near-duplicates found in the training data",
                                                  elem_id="near-duplicates", columns=8, height=120,
                                                  allow_preview=False, format="png", object_fit="contain")

    @readable_errors
    def show_split(self, spec: str, data_folder: str, picks: str) -> tuple:
        """Text-to-image models: the training items as two sides, picked (forget) and kept."""
        try:
            model = self.page.open_model(spec, data_folder)
        except USER_ERRORS:
            return [], [], [], []
        if model.family != "latent" or model.training_data is None:
            return [], [], [], []
        forget_side, kept_side = split_items(model.training_data, parse_picks(picks))
        return (tiles(forget_side), [item.index for item in forget_side],
                tiles(kept_side), [item.index for item in kept_side])

    @readable_errors
    def preview(self, spec: str, data_folder: str, picks: str, files: Optional[list[str]],
                keep_near_duplicates: bool = False) -> tuple:
        """The forget set as it will be used (summary, grid, near-duplicate tiles), or why it cannot be."""
        try:
            model = self.page.open_model(spec, data_folder)
            forget = build_forget_set(model, parse_picks(picks), files or [],
                                      keep_near_duplicates=bool(keep_near_duplicates))
        except USER_ERRORS as exc:
            return (f"⚠ {exc}" if parse_picks(picks) or files else "Nothing picked yet."), None, []
        grid = display_grid(forget.images[:32], labels=[source[:14] for source in forget.sources[:32]])
        lines = [f"**{len(forget)} image(s) to forget**; {len(forget.retain_index):,} training images kept."]
        lines += [f"- ⚠ not used: {reason}" for reason in forget.refused]
        lines += [f"- {note}" for note in forget.notes]
        return "\n".join(lines), grid, tiles(near_duplicate_items(model.training_data, forget))

    @readable_errors
    def generate(self, spec: str, prompt: str, files: Optional[list[str]], count, sampling_value, guidance_value,
                 progress=gr.Progress()) -> list:
        """Text-to-image models: generations of the prompt become the training data; the
        cluster that copies a training image is picked to forget. Outputs: the training-data
        folder, a note, then what opening the model with those picks shows (`model_view`)."""
        model = self.page.open_model(spec, "")
        progress(0.0, desc="Waiting for the device")
        split = generate_split(model, prompt, self.page.settings.output_dir, n=whole(count), seed=0,
                               steps=whole(sampling_value), guidance=number(guidance_value),
                               reference=files[0] if files else None,
                               on_batch=lambda done, total: progress((done, total), desc="Generating"))
        chosen = ("closest to your first uploaded image" if split.rule == "reference"
                  else "the tighter cluster: near-copies of one image look alike")
        note = (f"{len(split.memorised)} of {whole(count)} generations look memorised ({chosen}); they are picked "
                f"to forget, the rest are kept. Click an image below to move it to the other side. {split.note}")
        return [str(split.folder), note, *model_view(self.page, spec, str(split.folder), format_picks(split.memorised))]

    def connect(self, model_box: gr.Textbox, data_box: gr.Textbox, view_outputs: list, sampling_steps: gr.Number,
                guidance: gr.Number, generate_seconds: int) -> None:
        """Clicks edit the picks; the picks and uploads redraw the preview and the split;
        "Generate & split" fills the training-data box and opens the model with its picks."""
        for gallery, indices in ((self.gallery, self.gallery_indices), (self.split_forget, self.split_forget_indices),
                                 (self.split_retain, self.split_retain_indices)):
            gallery.select(pick, [indices, self.picks_box], self.picks_box, api_visibility="private")
        split_inputs = [model_box, data_box, self.picks_box]
        split_outputs = [self.split_forget, self.split_forget_indices, self.split_retain, self.split_retain_indices]
        self.picks_box.change(self.show_split, split_inputs, split_outputs, api_name="split_view")
        preview_inputs = [model_box, data_box, self.picks_box, self.uploads, self.keep_near_duplicates]
        preview_outputs = [self.forget_summary, self.forget_preview, self.near_duplicates]
        self.picks_box.change(self.preview, preview_inputs, preview_outputs, api_name="preview_forget")
        for source in (self.uploads, self.keep_near_duplicates):
            source.change(self.preview, preview_inputs, preview_outputs, api_visibility="private")
        generate_inputs = [model_box, self.prompt_box, self.uploads, self.n_generations, sampling_steps, guidance]
        self.generate_button.click(gpu_task(generate_seconds)(self.generate), generate_inputs,
                                   [data_box, self.split_note] + view_outputs, api_name="generate_split") \
            .then(self.show_split, split_inputs, split_outputs, api_visibility="private")  # also for unchanged picks
