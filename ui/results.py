"""Section 5 of the page: results, and how a job's state is drawn on the page.

`render` turns one `JobState` into the outputs of the /unlearn event, in the order
`JOB_OUTPUTS` names: status, loss plot (`loss_frame`), before and after grids, the metrics table
(`metrics_table`), the neighbour picture, the zip, the teaching note, the trajectory, the live
memorisation curve (`live_frame`), the oracle's grid and the live noise-and-denoise curve
(`return_frame`).
"""

from __future__ import annotations

import math
from typing import Callable

import gradio as gr
import pandas as pd

from retrack.evaluation import Return
from retrack.jobs import JobState

# The outputs of /unlearn, in order: `render` returns one value for each.
JOB_OUTPUTS = ("status", "loss_plot", "before_grid", "after_grid", "metrics", "neighbours", "download",
               "teaching_note", "trajectory", "memorisation_plot", "oracle_grid", "return_plot")


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

    before = once("before", state.before, lambda: state.before.grid(limit=state.grid_samples))
    after = once("after", state.after, lambda: state.after.grid(limit=state.grid_samples))
    oracle = once("oracle", state.oracle, lambda: state.oracle.grid(limit=state.grid_samples))
    nearest = once("neighbours", state.neighbours, lambda: state.neighbours)
    archive = once("archive", state.archive, lambda: str(state.archive))
    picture = once("trajectory", state.trajectory, lambda: state.trajectory)
    table = metrics_table(state) or gr.skip()
    losses = loss_frame(state) if state.losses else gr.skip()  # an empty frame would fix the axes as categories
    live = live_frame(state) if state.live else gr.skip()
    returns = return_frame(state) if state.live and state.live[0].returns else gr.skip()
    shown = dict(status=state.message, loss_plot=losses, before_grid=before, after_grid=after, metrics=table,
                 neighbours=nearest, download=archive, teaching_note=state.teaching_note or gr.skip(),
                 trajectory=picture, memorisation_plot=live, oracle_grid=oracle, return_plot=returns)
    return tuple(shown[name] for name in JOB_OUTPUTS)


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
    before, after, oracle = state.before, state.after, state.oracle
    if before is None:
        return ""

    def rate(evaluation) -> str:
        return "…" if evaluation is None else \
            f"{evaluation.rate:.0%} ({int(evaluation.flags.sum())} of {len(evaluation.scores)})"

    def pixel_rate(evaluation) -> str:
        return "…" if evaluation is None else f"{evaluation.rates().get('l2', float('nan')):.0%}"

    def excess(evaluation) -> str:
        return "…" if evaluation is None else \
            ", ".join(f"{LIVE_MEASURES[name]} {value:+.1%}" for name, value in evaluation.excess().items()) or "–"

    def quality(evaluation) -> str:
        return "…" if evaluation is None or evaluation.quality is None else f"{evaluation.quality:.3g}"

    def top(evaluation) -> str:
        return "…" if evaluation is None else f"{evaluation.scores.max():.2f}"

    columns = [before, after] + ([oracle] if oracle is not None else [])

    def row(title: str, cell: Callable) -> str:
        return f"| {title} | " + " | ".join(cell(evaluation) for evaluation in columns) + " |"

    rows = [row(f"memorisation rate (samples scoring above {before.threshold:.2f})", rate),
            row("pixel-L2 copies (within the calibrated distance of a forget image)", pixel_rate)]
    if oracle is not None:
        rows.append(row("excess over the oracle (share closer than the oracle's 1 % quantile, minus 1 %)", excess))
    rows += [row("highest memorisation score", top),
             row("quality: CLIP Fréchet distance to the retain set (lower is better)", quality)]
    second = state.deterministic
    if second:  # the same seeds under DDIM-50: a verdict that holds under one sampler only is not a verdict
        columns = [second.get("before"), second.get("after")] + ([second.get("oracle")] if oracle is not None else [])
        rows += [row("**under DDIM-50** (deterministic, same seeds): memorisation rate", rate),
                 row("DDIM-50: pixel-L2 copies", pixel_rate)]
        if oracle is not None:
            rows.append(row("DDIM-50: excess over the oracle (its DDIM-50 samples)", excess))
    note = f"\n\n*{state.scorer_note}*" if state.scorer_note else ""
    sampler = f" ({before.sampler})" if before.sampler else ""
    header = "| | before | after |" + (" oracle |" if oracle is not None else "")
    lead = (f"Rates with the paper's sampler{sampler}"
            + (", then with DDIM-50 on the same seeds." if second else ".") + "\n\n")
    return lead + "\n".join([header, "|---" * (len(columns) + 1) + "|", *rows]) + note
