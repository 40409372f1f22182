"""Section 5 of the page: results, and how a job's state is drawn on the page.

`render` turns one `JobState` into the outputs of the /unlearn event, in the order
`JOB_OUTPUTS` names: status, loss plot (`loss_frame`), before and after grids, the metrics table
(`metrics_table`), the neighbour picture, the zip, the teaching note, the trajectory, the live
memorisation curve (`live_frame`), the oracle's grid, the live noise-and-denoise curve
(`return_frame`), the samples nearest the forget images under the paper's sampler and under DDIM-50
(`nearest_picture`) and, for a model with a classifier, the share of each class (`class_frame`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import gradio as gr
import pandas as pd

from retrack.evaluation import Evaluation, Return
from retrack.grids import nearest_rows_grid, samples_grid
from retrack.jobs import JobState

# The outputs of /unlearn, in order: `render` returns one value for each.
JOB_OUTPUTS = ("status", "loss_plot", "before_grid", "after_grid", "metrics", "neighbours", "download",
               "teaching_note", "trajectory", "memorisation_plot", "oracle_grid", "return_plot",
               "nearest_paper", "nearest_ddim", "class_plot")
NEAREST = 16  # samples shown per row of the nearest grids


class ResultsSection:
    """Before/after grids from the same seeds (and the oracle's, when the model has one), their
    scores, the neighbours ReTrack uses, the zip."""

    def __init__(self, grid_samples: int) -> None:
        gr.Markdown("## 5 · Results\nSamples from the same seeds, captioned *seed: memorisation score*; "
                    "red frames mark samples above the threshold (they reproduce a forget image). The grids show "
                    f"the first {grid_samples} samples (seeds s, s+1, ...); the rates in the table are measured on "
                    "all of them.")
        with gr.Row():
            self.before_grid = gr.Image(label="Before", elem_id="before-grid", format="png", interactive=False)
            self.after_grid = gr.Image(label="After", elem_id="after-grid", format="png", interactive=False)
            self.oracle_grid = gr.Image(label="Oracle: the same network retrained without the forget image "
                                              "(built-in model), same seeds", elem_id="oracle-grid", format="png",
                                        interactive=False)
        self.metrics = gr.Markdown(elem_id="metrics")
        gr.Markdown(f"**The samples that matter.** Of all samples drawn, the {NEAREST} nearest the forget images "
                    "(the nearest to any of them; pixel L2, captioned with the distance, red within the copy "
                    "threshold), row by row: before, after, and the oracle's. The first grids rarely hold a copy "
                    "when the model makes one in a hundred; these show the copies before and what replaced them.")
        with gr.Row():
            self.nearest_paper = gr.Image(label="Nearest the forget images, the paper's sampler (ancestral DDPM): "
                                                "before / after / oracle", elem_id="nearest-paper", format="png",
                                          interactive=False)
            self.nearest_ddim = gr.Image(label="Nearest the forget images, DDIM-50 on the same seeds: "
                                               "before / after / oracle", elem_id="nearest-ddim", format="png",
                                         interactive=False)
        self.class_plot = gr.BarPlot(
            x="bar", y="percent", color="model", elem_id="class-plot", y_title="% of samples", x_title="class · model",
            x_label_angle=-60, height=340, color_map=CLASS_COLOURS, tooltip=["class", "model", "percent", "samples"],
            visible=False,
            label="Collateral damage: the share of each class among the samples (the model's classifier, the "
                  "paper's sampler), before (grey), after (orange) and the oracle's (blue). Does forgetting the "
                  "T-shirt take its neighbours (eights, zeros) with it?")
        self.neighbours = gr.Image(label="Where the trajectories go: each forget image (red), then its nearest "
                                         "retain images; w = ReTrack weight, d = distance", elem_id="neighbours",
                                   format="png", interactive=False)
        self.download = gr.File(label="Unlearned model (zip)", elem_id="download", interactive=False)


def render(state: JobState, sent: dict[str, object]) -> tuple:
    """The JOB_OUTPUTS for one state; pictures only when they changed (they are sent as files).
    `sent` remembers, per event, what was sent already."""
    def once(name: str, value: object, make: Callable[[], object]):
        if value is None or sent.get(name) is value:
            return gr.skip()
        sent[name] = value
        return make()

    before = once("before", state.before, lambda: samples_grid(state.before, limit=state.grid_samples))
    after = once("after", state.after, lambda: samples_grid(state.after, limit=state.grid_samples))
    oracle = once("oracle", state.oracle, lambda: samples_grid(state.oracle, limit=state.grid_samples))
    nearest = once("neighbours", state.neighbours, lambda: state.neighbours)
    archive = once("archive", state.archive, lambda: str(state.archive))
    picture = once("trajectory", state.trajectory, lambda: state.trajectory)
    table = metrics_table(state) or gr.skip()
    losses = loss_frame(state) if state.losses else gr.skip()  # an empty frame would fix the axes as categories
    live = live_frame(state) if state.live else gr.skip()
    returns = return_frame(state) if state.live and state.live[0].returns else gr.skip()
    second = state.deterministic
    nearest_paper = once("nearest_paper", state.after, lambda: nearest_picture(
        ("before", state.before), ("after", state.after), ("oracle", state.oracle)))
    nearest_ddim = once("nearest_ddim", second.get("after"), lambda: nearest_picture(
        *((name, second.get(name)) for name in ("before", "after", "oracle"))))
    if state.class_shares:
        classes = once("class_shares", state.class_shares,
                       lambda: gr.BarPlot(value=class_frame(state), sort=class_order(state), visible=True))
    else:  # a model without a classifier: hidden (also after a job of one with it)
        classes = gr.update(visible=False) if state.finished else gr.skip()
    shown = dict(status=state.message, loss_plot=losses, before_grid=before, after_grid=after, metrics=table,
                 neighbours=nearest, download=archive, teaching_note=state.teaching_note or gr.skip(),
                 trajectory=picture, memorisation_plot=live, oracle_grid=oracle, return_plot=returns,
                 nearest_paper=nearest_paper, nearest_ddim=nearest_ddim, class_plot=classes)
    return tuple(shown[name] for name in JOB_OUTPUTS)


def nearest_picture(*models: tuple[str, Optional[Evaluation]]):
    """The NEAREST samples nearest the forget images (`Evaluation.nearest`) of each (label,
    evaluation), e.g. before, after and the oracle's, one row each (`grids.nearest_rows_grid`);
    a model without an evaluation has no row."""
    return nearest_rows_grid([(label, evaluation.nearest(NEAREST)) for label, evaluation in models
                              if evaluation is not None])


CLASS_MODELS = ("before", "after", "oracle")
CLASS_COLOURS = {"before": "#9ca3af", "after": "#f97316", "oracle": "#2563eb"}


def class_frame(state: JobState) -> pd.DataFrame:
    """The share of each class among the samples, one row per (class, model): the bars of a class
    side by side (gradio stacks bars of one x, so each bar has its own x, 'eight · after')."""
    rows = []
    for i, name in enumerate(state.class_names):
        for model in CLASS_MODELS:
            if model in state.class_shares:
                evaluation = getattr(state, model)
                share = float(state.class_shares[model][i])
                rows.append(dict(bar=f"{name} · {model}", percent=100 * share, model=model, **{"class": name},
                                 samples=f"{round(share * evaluation.n)} of {evaluation.n}"))
    return pd.DataFrame(rows, columns=["bar", "percent", "model", "class", "samples"])


def class_order(state: JobState) -> list[str]:
    """The bars class by class, before, after, oracle within each."""
    return [f"{name} · {model}" for name in state.class_names for model in CLASS_MODELS
            if model in state.class_shares]


def status_only(message: str) -> tuple:
    """The JOB_OUTPUTS when a job could not start: the message, everything else unchanged."""
    return (message,) + tuple(gr.skip() for _ in JOB_OUTPUTS[1:])


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


# The live curve's measures, as the evaluation names them, and as the plot's legend does.
LIVE_MEASURES = {"l2": "pixel L2", "clip": "CLIP"}


def live_frame(state: JobState) -> pd.DataFrame:
    """The live memorisation curve in long form, one row per (step, measure): the excess over the
    oracle in percent where the model has one (0: no more near-copies than a model that never saw
    the image), else the copy rate in percent."""
    rows = []
    for point in state.live:
        for name, label in LIVE_MEASURES.items():
            if name in point.rates:
                value = point.excess.get(name, point.rates[name])
                rows.append(dict(step=point.step, percent=100 * value, measure=label, rate=point.rates[name],
                                 seconds=point.seconds))
    return pd.DataFrame(rows, columns=["step", "percent", "measure", "rate", "seconds"])


def return_frame(state: JobState) -> pd.DataFrame:
    """The live noise-and-denoise curve in long form, one row per (step, t): the mean distance from
    the forget image at which its noisy copies land after denoising (near 0: the model brings it
    back; rising: forgetting), with how many of them come back within the copy threshold; the
    oracle's distance as a flat line over the same steps (its value at the first and last step)."""
    rows = []
    for point in state.live:
        for r in point.returns.values():
            rows.append(dict(step=point.step, distance=r.distance, curve=f"t = {r.t}", back=returned_text(r)))
    steps = (state.live[0].step, state.live[-1].step)
    for r in state.oracle_returns.values():
        rows += [dict(step=step, distance=r.distance, curve=f"oracle, t = {r.t}", back=returned_text(r))
                 for step in steps]
    return pd.DataFrame(rows, columns=["step", "distance", "curve", "back"])


def returned_text(r: Return) -> str:
    """'15 of 16 come back' (within the copy threshold), or '' without a threshold."""
    return "" if r.returned is None else f"{r.returned} of {r.copies} come back"


def metrics_table(state: JobState) -> str:
    """Before/after (and the oracle's) memorisation rates and quality as a Markdown table; with an
    oracle, each rate is also read against it (the excess over the oracle)."""
    if state.before is None:
        return ""
    second = state.deterministic
    names = ["before", "after"] + (["oracle"] if state.oracle is not None else [])
    return rates_table(names, [getattr(state, name) for name in names],
                       [second.get(name) for name in names] if second else None, state.scorer_note)


def rates_table(names: list[str], paper: list[Optional[Evaluation]], ddim: Optional[list[Optional[Evaluation]]],
                scorer_note: str = "") -> str:
    """The memorisation rates and quality of the evaluations `paper` (the paper's sampler; the first
    is "before", "…" for one still to come), a column each titled by `names`, then the same seeds
    under DDIM-50 (`ddim`) when drawn. A column named "oracle" is the oracle's: with it, each rate
    is also read against it (the excess over the oracle)."""
    has_oracle = "oracle" in names

    def rate(evaluation) -> str:
        return "…" if evaluation is None else \
            f"{evaluation.clip_rate:.0%} ({int(evaluation.clip_flags.sum())} of {len(evaluation.clip_similarity)})"

    def pixel_rate(evaluation) -> str:
        return "…" if evaluation is None else f"{evaluation.rates().get('l2', float('nan')):.0%}"

    def excess(evaluation) -> str:
        return "…" if evaluation is None else \
            ", ".join(f"{LIVE_MEASURES[name]} {value:+.1%}" for name, value in evaluation.excess().items()) or "–"

    def quality(evaluation) -> str:
        return "…" if evaluation is None or evaluation.quality is None else f"{evaluation.quality:.3g}"

    def top(evaluation) -> str:
        return "…" if evaluation is None else f"{evaluation.clip_similarity.max():.2f}"

    def row(title: str, cell: Callable, columns: list[Optional[Evaluation]]) -> str:
        return f"| {title} | " + " | ".join(cell(evaluation) for evaluation in columns) + " |"

    rows = [row(f"memorisation rate (samples scoring above {paper[0].clip_threshold:.2f})", rate, paper),
            row("pixel-L2 copies (within the calibrated distance of a forget image)", pixel_rate, paper)]
    if has_oracle:
        rows.append(row("excess over the oracle (share closer than the oracle's 1 % quantile, minus 1 %)", excess,
                        paper))
    def prompt_score(evaluation) -> str:
        score = None if evaluation is None else evaluation.quality_figures.get("prompt_score")
        return "…" if score is None else f"{score:.3f}"

    rows += [row("highest memorisation score", top, paper),
             row("quality: CLIP Fréchet distance to the retain set (lower is better)", quality, paper)]
    if any(e is not None and "prompt_score" in e.quality_figures for e in paper):  # text-to-image models
        rows.append(row("collateral damage: CLIP score of the non-copies to the prompt (does it still draw what "
                        "the prompt asks? a fall is damage)", prompt_score, paper))
    if ddim:  # the same seeds under DDIM-50: a verdict that holds under one sampler only is not a verdict
        rows += [row("**under DDIM-50** (deterministic, same seeds): memorisation rate", rate, ddim),
                 row("DDIM-50: pixel-L2 copies", pixel_rate, ddim)]
        if has_oracle:
            rows.append(row("DDIM-50: excess over the oracle (its DDIM-50 samples)", excess, ddim))
    note = f"\n\n*{scorer_note}*" if scorer_note else ""
    sampler = f" ({paper[0].sampler})" if paper[0].sampler else ""
    header = "| | " + " | ".join(names) + " |"
    lead = (f"Rates with the paper's sampler{sampler}"
            + (", then with DDIM-50 on the same seeds." if ddim else ".") + "\n\n")
    return lead + "\n".join([header, "|---" * (len(names) + 1) + "|", *rows]) + note
