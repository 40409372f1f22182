"""Section 6 of the page: methods side by side.

Up to three methods run one after another (`retrack.comparison.Comparison`) from the model,
forget set and settings of sections 1 to 3 (only the method differs) and the same seeds. The live
curves of all of them share one plot each, the table has a column per method between "before"
and the oracle, the after-grids sit side by side, the samples nearest the forget images have a
row per model, and every unlearned model can be downloaded. `render_comparison` turns one
`ComparisonState` into the outputs of the /compare event, in the order COMPARE_OUTPUTS names.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Iterator, Optional

import gradio as gr
import pandas as pd

from retrack.comparison import MAX_METHODS, Comparison, ComparisonState
from retrack.evaluation import RETURN_TIMESTEPS, Evaluation
from retrack.grids import samples_grid
from retrack.jobs import JobState
from retrack.objectives import METHODS

from .common import Page
from .results import LIVE_MEASURES, nearest_picture, rates_table
from .run import RunForm, start_work, stream
from .settings import gpu_task

COMPARE_OUTPUTS = ("status", "memorisation_plot", "return_plot", "table", *(f"grid_{i}" for i in range(MAX_METHODS)),
                   "nearest_paper", "nearest_ddim", "downloads")
DEFAULT_METHODS = ["retrack", "siss", "vanilla"]  # the and the paper's headline comparison
# One colour per method on both overlaid plots, the oracle in grey (COLOUR_NAMES says so in words).
METHOD_COLOURS = {METHODS["retrack"].title: "#2563eb", METHODS["siss"].title: "#16a34a",
                  METHODS["vanilla"].title: "#f97316", METHODS["neggrad"].title: "#dc2626",
                  METHODS["erasediff"].title: "#9333ea", "oracle": "#9ca3af"}
COLOUR_NAMES = "ReTrack blue, SISS green, Vanilla orange, NegGrad red, EraseDiff purple"
RETURN_T = max(RETURN_TIMESTEPS)  # the overlay shows the higher t: there the methods differ most


class CompareSection:
    """The methods to compare, Run side by side and Cancel, its status, the overlaid live curves,
    the table, the grids side by side, the nearest samples and the downloads."""

    def __init__(self, page: Page, first: dict) -> None:
        self.page = page
        gr.Markdown(f"## 6 · Methods side by side\nRun up to {MAX_METHODS} methods one after another on the "
                    "model and images above, with the settings of section 3 (only the method differs) and the same "
                    "seeds: \"before\" and the oracle are the same samples for all of them.")
        with gr.Row():
            self.methods = gr.CheckboxGroup([(method.title, name) for name, method in METHODS.items()],
                                            value=DEFAULT_METHODS, label=f"Methods (up to {MAX_METHODS})",
                                            elem_id="compare-methods")
            self.run_button = gr.Button("Run side by side", variant="primary", elem_id="compare-run")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
        self.status = gr.Textbox(label="Status, one line per method", elem_id="compare-status", interactive=False,
                                 lines=MAX_METHODS)
        with gr.Row():
            self.memorisation_plot = gr.LinePlot(
                x="step", y="percent", color="model", elem_id="compare-memorisation", x_title="step",
                y_title="% of samples", height=300, color_map=METHOD_COLOURS, tooltip=["step", "model", "percent"],
                label=f"Memorisation while training, every method: {first['live_samples']} fixed samples every "
                      f"{first['live_every']} steps; pixel L2's excess over the oracle where the model has one, "
                      f"else its copy rate ({COLOUR_NAMES})")
            self.return_plot = gr.LinePlot(
                x="step", y="distance", color="model", elem_id="compare-return", x_title="step",
                y_title="mean distance to the image (pixel L2)", height=300, color_map=METHOD_COLOURS,
                tooltip=["step", "model", "distance"],
                label=f"Noise and denoise while training, every method: the forget images noised to t = {RETURN_T} "
                      f"and denoised, how far they land from the image (rising: forgetting; {COLOUR_NAMES}; the oracle grey)")
        self.table = gr.Markdown(elem_id="compare-table")
        with gr.Row():
            self.grids = [gr.Image(label=f"After: {METHODS[name].title}" if i < len(DEFAULT_METHODS) else "After",
                                   elem_id=f"compare-grid-{i}", format="png", interactive=False)
                          for i, name in enumerate(DEFAULT_METHODS + [""] * (MAX_METHODS - len(DEFAULT_METHODS)))]
        with gr.Row():
            self.nearest_paper = gr.Image(label="Nearest the forget images, the paper's sampler: before, each "
                                                "method, the oracle", elem_id="compare-nearest-paper", format="png",
                                          interactive=False)
            self.nearest_ddim = gr.Image(label="Nearest the forget images, DDIM-50 on the same seeds",
                                         elem_id="compare-nearest-ddim", format="png", interactive=False)
        self.downloads = gr.File(label="The unlearned models (a zip each)", file_count="multiple",
                                 elem_id="compare-downloads", interactive=False)

    def outputs(self) -> list:
        """The components of COMPARE_OUTPUTS, in order."""
        named = {**vars(self), **{f"grid_{i}": grid for i, grid in enumerate(self.grids)}}
        return [named[name] for name in COMPARE_OUTPUTS]

    def compare(self, request: gr.Request, progress=gr.Progress(), methods: Optional[list[str]] = None,
                *values) -> Iterator[tuple]:
        """Start a comparison of `methods` with the RunForm `values` and stream its state to the
        page until it ends (gradio puts the request and progress first, then the inputs)."""
        output_root = self.page.settings.output_dir
        comparison, error = start_work(
            self.page, RunForm(*values), lambda model, forget, config, evaluation, prompt: Comparison(
                model, forget, config, tuple(methods or ()), evaluation, output_root, training_prompt=prompt))
        if comparison is None:
            yield comparison_status_only(error)
            return
        sent: dict[str, object] = {}
        yield from stream(self.page, request.session_hash or comparison.id, comparison, progress,
                          lambda state: render_comparison(state, sent))

    def connect(self, form_sources: dict[str, gr.components.Component], cancel: Callable) -> None:
        """Run side by side takes the methods and every RunForm box (`form_sources`); Cancel stops it."""
        limits = self.page.settings.limits
        self.run_button.click(gpu_task(MAX_METHODS * (limits.gpu_seconds if limits else 120))(self.compare),
                              [self.methods] + [form_sources[f.name] for f in fields(RunForm)], self.outputs(),
                              api_name="compare", show_progress_on=[self.status],
                              concurrency_limit=limits.concurrent_runs if limits else 16, concurrency_id="unlearn")
        self.cancel_button.click(cancel, None, self.status, api_name="cancel_comparison", concurrency_limit=None,
                                 show_progress="hidden")


def comparison_status_only(message: str) -> tuple:
    """The COMPARE_OUTPUTS when a comparison could not start: the message, everything else unchanged."""
    return (message,) + tuple(gr.skip() for _ in COMPARE_OUTPUTS[1:])


def shared(state: ComparisonState) -> Optional[JobState]:
    """The state that holds "before" and the oracle (the same for every method): the first job's
    that drew them, or None before any did."""
    return next((s for s in state.states if s.before is not None), None)


def labels(state: ComparisonState) -> list[str]:
    return [METHODS[method].title for method in state.methods]


def render_comparison(state: ComparisonState, sent: dict[str, object]) -> tuple:
    """The COMPARE_OUTPUTS for one state; pictures only when they changed. `sent` remembers, per
    event, what was sent already (by the evaluations' identity)."""
    def once(name: str, key: tuple, make: Callable[[], object]):
        if all(k is None for k in key) or sent.get(name) == key:
            return gr.skip()
        sent[name] = key
        return make()

    common = shared(state)
    afters = tuple(s.after for s in state.states)
    ddim_afters = tuple(s.deterministic.get("after") for s in state.states)
    grids = []
    for i in range(MAX_METHODS):
        if i >= len(state.states):  # fewer methods than places: hide the rest (once)
            grids.append(once(f"grid_{i}", (True,), lambda: gr.update(value=None, visible=False)))
            continue
        s, label = state.states[i], labels(state)[i]
        grids.append(once(f"grid_{i}", (id(s.after),) if s.after is not None else (None,),
                          lambda s=s, label=label: gr.update(value=samples_grid(s.after, limit=s.grid_samples),
                                                             label=f"After: {label}", visible=True)))
    shown = dict(
        status=state.message,
        memorisation_plot=memorisation_frame(state) if any(s.live for s in state.states) else gr.skip(),
        return_plot=return_frame(state) if any(s.live and s.live[0].returns for s in state.states) else gr.skip(),
        table=comparison_table(state) or gr.skip(),
        **{f"grid_{i}": grid for i, grid in enumerate(grids)},
        nearest_paper=once("nearest_paper", tuple(map(id_or_none, afters)), lambda: nearest_picture(
            *columns(state, common.before, afters, common.oracle))),
        nearest_ddim=once("nearest_ddim", tuple(map(id_or_none, ddim_afters)), lambda: nearest_picture(
            *columns(state, common.deterministic.get("before"), ddim_afters, common.deterministic.get("oracle")))),
        downloads=once("downloads", tuple(str(s.archive) for s in state.states if s.archive is not None),
                       lambda: [str(s.archive) for s in state.states if s.archive is not None]),
    )
    return tuple(shown[name] for name in COMPARE_OUTPUTS)


def id_or_none(value: object) -> Optional[int]:
    return None if value is None else id(value)


def columns(state: ComparisonState, before: Optional[Evaluation], afters: tuple[Optional[Evaluation], ...],
            oracle: Optional[Evaluation]) -> list[tuple[str, Optional[Evaluation]]]:
    """(name, evaluation) per column: before, each method's after, the oracle."""
    return [("before", before), *zip(labels(state), afters), ("oracle", oracle)]


def comparison_table(state: ComparisonState) -> str:
    """The rates and quality with a column per method between "before" and the oracle (both
    samplers), then what each method's training cost."""
    common = shared(state)
    if common is None:
        return ""
    paper = columns(state, common.before, tuple(s.after for s in state.states), common.oracle)
    if common.oracle is None:
        paper = paper[:-1]
    ddim = None
    if common.deterministic:
        ddim = [evaluation for _, evaluation in columns(
            state, common.deterministic.get("before"), tuple(s.deterministic.get("after") for s in state.states),
            common.deterministic.get("oracle"))][:len(paper)]
    table = rates_table([name for name, _ in paper], [evaluation for _, evaluation in paper], ddim, common.scorer_note)
    costs = [f"{label}: {training_cost(s)}" for label, s in zip(labels(state), state.states)]
    return table + "\n\nTraining: " + "; ".join(costs) + "."


def training_cost(state: JobState) -> str:
    """'50 steps in 107 s' (the live curve's evaluations excluded), or where the job stands."""
    if not state.losses:
        return state.phase
    seconds = sum(event.step_seconds for event in state.losses)
    return f"{len(state.losses)} steps in {seconds:.0f} s" + ("" if state.finished else " so far")


def live_measure(rates: dict[str, float]) -> Optional[str]:
    """The live curve's measure the overlay shows: pixel L2 where measured, else CLIP."""
    return next((name for name in LIVE_MEASURES if name in rates), None)


def memorisation_frame(state: ComparisonState) -> pd.DataFrame:
    """Every method's live memorisation curve, one row per (step, method): the excess over the
    oracle in percent where the model has one, else the copy rate."""
    rows = []
    for label, s in zip(labels(state), state.states):
        for point in s.live:
            measure = live_measure(point.rates)
            if measure is not None:
                rows.append(dict(step=point.step, percent=100 * point.excess.get(measure, point.rates[measure]),
                                 model=label))
    return with_every_model(rows, labels(state), "percent")


def return_frame(state: ComparisonState) -> pd.DataFrame:
    """Every method's live noise-and-denoise curve at t = RETURN_T, one row per (step, method), and
    the oracle's level as a flat line over the steps drawn."""
    rows = [dict(step=point.step, distance=point.returns[RETURN_T].distance, model=label)
            for label, s in zip(labels(state), state.states) for point in s.live if RETURN_T in point.returns]
    # the oracle's return is made before the first job's first live point, and is the same for all
    oracle = next((s.oracle_returns[RETURN_T] for s in state.states if RETURN_T in s.oracle_returns), None)
    if rows and oracle is not None:
        steps = [row["step"] for row in rows]
        rows += [dict(step=step, distance=oracle.distance, model="oracle") for step in (min(steps), max(steps))]
    return with_every_model(rows, labels(state), "distance")


def with_every_model(rows: list[dict], models: list[str], y: str) -> pd.DataFrame:
    """The rows as a frame, with an empty point (y missing: not drawn) for each model that has none
    yet: gradio fixes a plot's colours by the models in the data it first draws, so a method that
    joins later would be drawn without its colour."""
    present = {row["model"] for row in rows}
    rows = rows + [dict(step=0, model=model, **{y: float("nan")}) for model in models if model not in present]
    return pd.DataFrame(rows, columns=["step", y, "model"])
