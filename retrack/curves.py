"""Forgetting curves on the built-in model: memorisation against training time, for every method.

    python -m retrack bench --curves            # 0, 10, 25, 50, 100, 200 steps; 500 samples per point
    python -m retrack bench --curves --quick    # a few steps and samples (tests)

Every method (vanilla, NegGrad, EraseDiff, SISS, ReTrack) starts from the built-in model with the
same seed, so the same rows and noise per branch, and is evaluated at each checkpoint on the same
sample seeds by `retrack.evaluation` (pixel-L2, classifier and CLIP T-shirt rates, each also as
the excess over the oracle, and quality). Training runs once per method up to the last
checkpoint; the evaluations happen inside `engine.unlearn`'s `on_step` callback, so training
continues from the checkpoint's weights and optimiser state, and the seconds recorded are
training seconds only (k-NN search included, evaluation excluded). Sampling does not touch the
training's random generator, so the curve's weights are those of an uninterrupted run.

Writes curves.json (per method and checkpoint: step, seconds, every rate and excess, quality;
with the settings, the machine and the command), curves.png and curves.md (time and steps until
a method reaches the oracle's level with its quality within the oracle–pretrained spread), and
the pictures behind the numbers: curves-nearest-<method>.png, one row per checkpoint of the 16
samples nearest the T-shirt (curves-nearest-start.png: the oracle's and the pretrained model's).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .atomic import write_file_atomically
from .backends import load_backend
from .bench import _load_average, machine
from .builtin import builtin_sets
from .engine import StepEvent, UnlearnConfig, resolve_device, unlearn
from .evaluation import (
    DEFAULT_SAMPLER, DEFAULT_SAMPLER_STEPS, REFERENCE_SIZE, Evaluation, OracleLevels, Reference, SamplerSettings,
    builtin_reference, evaluate, save_nearest_rows,
)
from .paths import BUILTIN_MODEL, BUILTIN_ORACLE

CURVE_METHODS = ("vanilla", "neggrad", "erasediff", "siss", "retrack")
DEFAULT_CHECKPOINTS = (0, 10, 25, 50, 100, 200)
# What "reaches the oracle's level" is read on: the T-shirt measures (pixel L2, the paper's; the
# classifier, which also counts blurred copies), and the quality figure that must stay in range.
FORGET_MEASURES = ("l2", "classifier")
QUALITY_FIGURE = ("classifier_fd", "clip_fd")  # the first one the evaluation has; lower is better
NEAREST = 16  # samples nearest the T-shirt shown per checkpoint


@dataclass(frozen=True)
class CurveSettings:
    methods: Sequence[str] = CURVE_METHODS
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS
    batch_size: int = 128  # rows per branch per step (the published MNIST setting)
    seed: int = 0  # training seed (rows and noise) and first sample seed
    samples: int = 500
    sampler: str = DEFAULT_SAMPLER
    sample_steps: int = DEFAULT_SAMPLER_STEPS
    retain_reference: int = REFERENCE_SIZE
    device: str = "auto"

    @classmethod
    def quick(cls) -> "CurveSettings":
        return cls(checkpoints=(0, 1, 2), batch_size=8, samples=8, sample_steps=2, retain_reference=64)

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(n_samples=self.samples, seed=self.seed, sampler=self.sampler, steps=self.sample_steps)

    def command(self) -> str:
        """The command line that runs exactly these settings."""
        return (f"python -m retrack bench --curves --methods {','.join(self.methods)} "
                f"--checkpoints {','.join(map(str, self.checkpoints))} --batch {self.batch_size} --seed {self.seed} "
                f"--samples {self.samples} --sample-steps {self.sample_steps} --device {self.device}")

    def validate(self) -> None:
        unknown = set(self.methods) - set(CURVE_METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(CURVE_METHODS)}")
        if not self.checkpoints or sorted(set(self.checkpoints)) != list(self.checkpoints) or self.checkpoints[0] < 0:
            raise ValueError(f"checkpoints must be distinct step counts >= 0 in increasing order, got {list(self.checkpoints)}")


@dataclass
class Point:
    step: int
    seconds: float  # training seconds to reach this step (k-NN included, evaluation excluded)
    cpu_seconds: float  # the same in CPU time of this process (all threads): steadier than wall time on a shared machine
    rates: dict
    excess: dict
    quality: dict


def point(step: int, seconds: float, cpu_seconds: float, result: Evaluation) -> Point:
    return Point(step=step, seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3), rates=result.rates(),
                 excess=result.excess(),
                 quality=dict(result.quality_figures))


def method_curve(method: str, settings: CurveSettings, device: str, reference: Reference, oracle: OracleLevels,
                 start: Point, log: Callable[[str], None], nearest: Optional[list] = None) -> list[Point]:
    """Train `method` from the built-in model to the last checkpoint, evaluating at each one.
    `nearest`, when given, collects each checkpoint's `Evaluation.nearest(NEAREST)` after the
    pretrained model's (the grid to look at)."""
    forget, retain = builtin_sets()
    backend = load_backend(BUILTIN_MODEL, device=device)
    config = UnlearnConfig.preset("mnist", method=method, steps=max(settings.checkpoints),
                                  batch_size=settings.batch_size, seed=settings.seed, device=device)
    points = [start] if settings.checkpoints[0] == 0 else []
    evaluating = {"seconds": 0.0, "cpu": 0.0}  # evaluation time so far, taken out of the run's clocks
    cpu_start = time.process_time()

    def on_step(event: StepEvent) -> None:
        if event.step not in settings.checkpoints:
            return
        started, cpu_started = time.perf_counter(), time.process_time()
        result = evaluate(backend, settings.sampler_settings(), reference, oracle)
        points.append(point(event.step, event.seconds - evaluating["seconds"],
                            cpu_started - cpu_start - evaluating["cpu"], result))
        if nearest is not None:
            nearest.append((event.step, result.nearest(NEAREST)))
        evaluating["seconds"] += time.perf_counter() - started
        evaluating["cpu"] += time.process_time() - cpu_started
        log(f"{method} step {event.step}: {points[-1].seconds:.1f} s training, rates {_short(points[-1].rates)}, "
            f"excess {_short(points[-1].excess)}")

    if max(settings.checkpoints) > 0:
        unlearn(backend, forget, retain, config, on_step=on_step)
    return points


def run_curves(settings: CurveSettings, out: Path, log: Callable[[str], None] = print) -> dict:
    """Evaluate the oracle and the pretrained model, then each method's curve; write the files
    after each method (an interrupted run keeps what it measured). Returns the curves.json data."""
    settings.validate()
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), _load_average()
    sampler = settings.sampler_settings()
    reference = builtin_reference(device, reference_size=settings.retain_reference)
    oracle_result = evaluate(load_backend(BUILTIN_ORACLE, device=device), sampler, reference)
    oracle = OracleLevels.from_evaluation(oracle_result, source=f"{BUILTIN_ORACLE.name}, {sampler.describe(device)}")
    pretrained = evaluate(load_backend(BUILTIN_MODEL, device=device), sampler, reference, oracle)
    start = point(0, 0.0, 0.0, pretrained)
    save_nearest_rows([("oracle", oracle_result.nearest(NEAREST)), (0, pretrained.nearest(NEAREST))],
                      out / "curves-nearest-start.png")
    log(f"oracle rates {_short(oracle.rates)}; pretrained rates {_short(start.rates)}, excess {_short(start.excess)}")
    data = {"meta": {"settings": asdict(settings), "sampler": sampler.describe(device), "device": machine(device),
                     "thresholds": reference.thresholds(), "load_average_at_start": load_start,
                     "command": settings.command(),
                     "how": "one process; training seconds exclude evaluation; every method from the built-in "
                            "model with the same seed (rows and noise per branch) and the same sample seeds"},
            "oracle": oracle.to_dict(), "pretrained": asdict(start), "methods": {}}
    done = finished_methods(out / "curves.json", data)
    for method in settings.methods:
        if method in done:  # measured by an interrupted run with the same settings: keep it
            data["methods"][method] = done[method]
            log(f"{method}: kept from {out / 'curves.json'}")
            continue
        nearest = []
        data["methods"][method] = [asdict(p) for p in method_curve(method, settings, device, reference, oracle,
                                                                    start, log, nearest)]
        save_nearest_rows(nearest, out / f"curves-nearest-{method}.png")
        data["meta"].update(total_seconds=round(time.perf_counter() - started, 1), load_average_at_end=_load_average(),
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_curves(data, out)
    return data


def finished_methods(path: Path, data: dict) -> dict:
    """The method curves already in `path` from a run with the same settings (the list of methods
    aside) and starting measurements, so a stopped run resumes with the methods it has not
    measured, in any order; {} otherwise."""
    if not path.exists():
        return {}
    def settings(meta: dict) -> dict:  # as stored in JSON, without the list of methods: a curve does not depend on it
        return {k: v for k, v in json.loads(json.dumps(meta.get("settings", {}))).items() if k != "methods"}

    old = json.loads(path.read_text())
    same = (settings(old.get("meta", {})) == settings(data["meta"])
            and old.get("oracle") == json.loads(json.dumps(data["oracle"]))
            and old.get("pretrained") == json.loads(json.dumps(data["pretrained"])))
    return old.get("methods", {}) if same else {}


# ============================================================================ reading the curves
def quality_figure(quality: dict) -> Optional[str]:
    """The quality figure the table judges by: the classifier's Fréchet distance, else CLIP's."""
    return next((name for name in QUALITY_FIGURE if quality.get(name) is not None), None)


def time_to_oracle(points: Sequence[dict], oracle: dict, pretrained: dict) -> Optional[dict]:
    """The first checkpoint where every forget measure's excess over the oracle is <= 0 while the
    quality figure (lower is better) is no worse than the worse of the oracle's and the pretrained
    model's; None ("never") when no checkpoint does."""
    figure = quality_figure(pretrained["quality"])
    ceiling = None if figure is None else max(oracle["quality"].get(figure) or 0.0, pretrained["quality"][figure])
    for p in points:
        forgotten = all(p["excess"].get(name, 0.0) <= 0.0 for name in FORGET_MEASURES)
        kept = ceiling is None or (p["quality"].get(figure) is not None and p["quality"][figure] <= ceiling)
        if forgotten and kept:
            return {"step": p["step"], "seconds": p["seconds"], "cpu_seconds": p.get("cpu_seconds")}
    return None


def write_curves(data: dict, out: Path) -> None:
    """curves.json, curves.md (the time-to-oracle table) and curves.png."""
    write_file_atomically(out / "curves.json", json.dumps(data, indent=2) + "\n")
    write_file_atomically(out / "curves.md", curves_table(data))
    plot_curves(data, out / "curves.png")


def curves_table(data: dict) -> str:
    meta, oracle, pretrained = data["meta"], data["oracle"], data["pretrained"]
    figure = quality_figure(pretrained["quality"]) or "quality"
    reached = {m: time_to_oracle(points, oracle, pretrained) for m, points in data["methods"].items()}
    lines = [
        f"Forgetting curves on the built-in digits + T-shirt model: each method from the same start and seed, "
        f"batch {meta['settings']['batch_size']} per branch, evaluated at steps "
        f"{', '.join(map(str, meta['settings']['checkpoints']))} on {meta['settings']['samples']} samples "
        f"({meta['sampler']}); device {meta['device']}; whole run {meta.get('total_seconds', 0):.0f} s "
        f"(load average {meta['load_average_at_start']} at the start, {meta.get('load_average_at_end')} at the end).",
        "",
        f"Reaching the oracle: every T-shirt measure ({', '.join(FORGET_MEASURES)}) has an excess over the oracle "
        f"of at most 0 (no more samples closer to the T-shirt than the oracle's 1 % quantile than 1 %), while "
        f"{figure} (lower is better) is no worse than the worse of the oracle's and the pretrained model's. "
        "Seconds are training seconds (k-NN search included, evaluation excluded).",
        "",
        "| method | steps to the oracle's level | seconds to the oracle's level | CPU seconds to it | "
        f"T-shirt rate (L2) at the last step | excess (L2) at the last step | {figure} at the last step |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, points in data["methods"].items():
        last, hit = points[-1], reached[method]
        lines.append(f"| {method} | {'never' if hit is None else hit['step']} | "
                     f"{'never' if hit is None else format(hit['seconds'], '.1f')} | "
                     f"{'never' if hit is None else _number(hit.get('cpu_seconds'))} | {last['rates']['l2']:.1%} | "
                     f"{last['excess'].get('l2', float('nan')):+.1%} | {_number(last['quality'].get(figure))} |")
    lines += ["", f"Oracle: T-shirt rates {_short(oracle['rates'])}, {figure} {_number(oracle['quality'].get(figure))}; "
              f"pretrained: rates {_short(pretrained['rates'])}, {figure} {_number(pretrained['quality'].get(figure))}."]
    if "retrack" in reached and "siss" in reached:
        retrack, siss = reached["retrack"], reached["siss"]
        if retrack and siss and siss["seconds"] > 0:
            lines.append(f"ReTrack reaches the oracle's level in {retrack['seconds']:.1f} s, SISS in {siss['seconds']:.1f} s: "
                         f"ratio ReTrack / SISS = {retrack['seconds'] / siss['seconds']:.2f}"
                         + (f" (in CPU time {retrack['cpu_seconds'] / siss['cpu_seconds']:.2f})."
                            if retrack.get("cpu_seconds") and siss.get("cpu_seconds") else "."))
        else:
            lines.append(f"Time-to-forget ratio ReTrack / SISS: not defined (ReTrack "
                         f"{'never' if not retrack else format(retrack['seconds'], '.1f') + ' s'}, SISS "
                         f"{'never' if not siss else format(siss['seconds'], '.1f') + ' s'} within these checkpoints).")
    return "\n".join(lines) + "\n"


def plot_curves(data: dict, path: Path) -> None:
    """Three panels: the excess over the oracle by pixel L2 (solid; the share below the L2
    threshold dashed) against training seconds and against steps, and the quality figure against
    steps; the oracle (and the pretrained model's quality) as lines. The excess is drawn, not the
    rate alone, because a model can leave no exact copy yet still draw blurred T-shirts that the
    oracle never draws (ReTrack on the built-in model does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle, pretrained = data["oracle"], data["pretrained"]
    figure = quality_figure(pretrained["quality"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    colours = {"retrack": "tab:red", "siss": "tab:purple", "vanilla": "tab:blue", "neggrad": "tab:orange",
               "erasediff": "tab:brown"}
    for method, points in data["methods"].items():
        style = dict(color=colours.get(method), marker="o", label=method, lw=2.5 if method == "retrack" else 1.5)
        excess = [100 * p["excess"]["l2"] for p in points]  # what "forgotten" is judged by
        rates = [100 * p["rates"]["l2"] for p in points]  # below the L2 threshold: exact copies only
        for ax, x in ((axes[0], [p["seconds"] for p in points]), (axes[1], [p["step"] for p in points])):
            ax.plot(x, excess, **style)
            ax.plot(x, rates, color=style["color"], ls="--", lw=1, alpha=0.6)
        if figure is not None:
            axes[2].plot([p["step"] for p in points], [p["quality"].get(figure) for p in points], **style)
    for ax in axes[:2]:
        ax.axhline(0.0, color="tab:green", ls="--", label="oracle (excess 0 by definition)")
        ax.set_ylabel("excess over the oracle (pixel L2), %\n(dashed: share below the L2 threshold)", fontsize=8)
    axes[0].set_xlabel("training seconds (evaluation excluded)")
    axes[1].set_xlabel("steps")
    if figure is not None:
        axes[2].axhline(oracle["quality"][figure], color="tab:green", ls="--", label="oracle")
        axes[2].axhline(pretrained["quality"][figure], color="black", ls=":", label="pretrained")
        axes[2].set_ylabel(f"{figure} (lower: better digits)")
    axes[2].set_xlabel("steps")
    axes[0].set_title("Memorisation vs training time")
    axes[1].set_title("Memorisation vs steps")
    axes[2].set_title("Quality vs steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['meta']['sampler']}; {data['meta']['device']}", fontsize=9)
    fig.tight_layout()
    write_file_atomically(path, fig.savefig)
    plt.close(fig)


def _short(values: dict) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in values.items())


def _number(value: Optional[float]) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"

