"""Forgetting curves on the built-in model: memorisation against training time, for every method.

    python -m retrack bench --curves            # 0, 5, 10, ..., 200 steps; 1,000 + 500 samples per point
    python -m retrack bench --curves --quick    # a few steps and samples (tests)

Every method (vanilla, NegGrad, EraseDiff, SISS, ReTrack) starts from the built-in model with the
same seed, so the same rows and noise per branch, and is evaluated at each checkpoint on the same
sample seeds by `retrack.evaluation` (pixel-L2, classifier and CLIP T-shirt rates with counts and
intervals, each also as the excess over the oracle, and quality) under two samplers: the paper's
(ancestral DDPM, 50 steps) and the deterministic DDIM-50. The first checkpoint at the oracle's
level under the paper's sampler is re-read on `confirm_samples` (5,000) seeds against the oracle's
levels on as many, since at these rates 1,000 samples hold a handful of T-shirts. Training runs
once per method up to the last checkpoint; the evaluations happen inside `engine.unlearn`'s
`on_step` callback, so training continues from the checkpoint's weights and optimiser state, and
the seconds recorded are training seconds only (k-NN search included, evaluation excluded).
Sampling draws from its own per-sample generators, never the training's, so the curve's weights
are those of an uninterrupted run.

Writes curves.json (per method and checkpoint: step, seconds, per sampler every rate and excess
and quality, the confirmation; with the settings, the machine and the command), curves.png and
curves.md (steps and time until a method reaches the oracle's level under each sampler and under
both), and the pictures behind the numbers: curves-nearest-<method>-<sampler>.png, one row per
checkpoint of the 16 samples nearest the T-shirt (curves-nearest-start-<sampler>.png: the
oracle's and the pretrained model's).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .atomic import write_file_atomically
from .backends import load_backend
from .builtin import builtin_reference, builtin_sets
from .devices import resolve_device
from .engine import UnlearnConfig, unlearn
from .evaluation import (
    COMPILED_BATCH, DDIM, FORGET_MEASURES, PAPER, REFERENCE_SIZE, SECOND_SAMPLER_STEPS, Evaluation, OracleLevels,
    Reference, SamplerSettings, at_oracle_level, copies_beyond_oracle, evaluate, evaluate_samples,
    forget_measures_at_oracle, quality_figure,
)
from .grids import save_nearest_rows
from .paths import BUILTIN_MODEL, BUILTIN_ORACLE
from .presets import EVALUATION_STEPS
from .reports import StepEvent
from .runrecord import NOT_RECORDED, RunRecord, describe_run, write_json_and_markdown
from .sampling import Samples

CURVE_METHODS = ("vanilla", "neggrad", "erasediff", "siss", "retrack")
DEFAULT_CHECKPOINTS = (0, 5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 200)
NEAREST = 16  # samples nearest the T-shirt shown per checkpoint


@dataclass(frozen=True)
class CurveSettings:
    methods: Sequence[str] = CURVE_METHODS
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS
    batch_size: int = 128  # rows per branch per step (the published MNIST setting)
    seed: int = 0  # training seed (rows and noise) and first sample seed
    samples: int = 1000  # per checkpoint, under the paper's sampler
    deterministic_samples: int = 500  # per checkpoint, under DDIM-50
    confirm_samples: int = 5000  # a method's first step at the oracle's level is re-read on this many
    sample_steps: int = EVALUATION_STEPS["mnist"]
    deterministic_steps: int = SECOND_SAMPLER_STEPS
    retain_reference: int = REFERENCE_SIZE
    device: str = "auto"
    compiled: bool = True  # draw with the compiled network (retrack.compiled): worth it at thousands of samples

    @classmethod
    def quick(cls) -> "CurveSettings":
        return cls(checkpoints=(0, 1, 2), batch_size=8, samples=8, deterministic_samples=6, confirm_samples=12,
                   sample_steps=2, deterministic_steps=2, retain_reference=64, compiled=False)  # a few samples: eager

    def samplers(self) -> dict[str, SamplerSettings]:
        """The two draws of every checkpoint (same seeds): the paper's sampler and DDIM."""
        paper = SamplerSettings(n_samples=self.samples, seed=self.seed, steps=self.sample_steps, compiled=self.compiled,
                                batch_size=COMPILED_BATCH if self.compiled else SamplerSettings.batch_size)
        ddim = replace(paper, n_samples=self.deterministic_samples).deterministic()
        return {PAPER: paper, DDIM: replace(ddim, steps=self.deterministic_steps)}

    def confirming(self) -> SamplerSettings:
        """The paper's sampler on `confirm_samples` seeds (the checkpoint's seeds among them)."""
        return replace(self.samplers()[PAPER], n_samples=self.confirm_samples)

    def command(self) -> str:
        """The command line that runs exactly these settings."""
        return (f"python -m retrack bench --curves --methods {','.join(self.methods)} "
                f"--checkpoints {','.join(map(str, self.checkpoints))} --batch {self.batch_size} --seed {self.seed} "
                f"--samples {self.samples} --ddim-samples {self.deterministic_samples} "
                f"--confirm-samples {self.confirm_samples} --sample-steps {self.sample_steps} --device {self.device}"
                + ("" if self.compiled else " --eager"))

    def validate(self) -> None:
        unknown = set(self.methods) - set(CURVE_METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(CURVE_METHODS)}")
        if not self.checkpoints or sorted(set(self.checkpoints)) != list(self.checkpoints) or self.checkpoints[0] < 0:
            raise ValueError(f"checkpoints must be distinct step counts >= 0 in increasing order, got {list(self.checkpoints)}")
        if self.confirm_samples and self.confirm_samples < self.samples:
            raise ValueError(f"--confirm-samples ({self.confirm_samples}) must be 0 (off) or at least --samples "
                             f"({self.samples})")


@dataclass
class Point:
    step: int
    seconds: float  # training seconds to reach this step (k-NN included, evaluation excluded)
    cpu_seconds: float  # the same in CPU time of this process (all threads): steadier than wall time on a shared machine
    by_sampler: dict  # PAPER / DDIM -> {samples, rates, counts, intervals, excess, quality}
    confirmed: Optional[dict] = None  # the paper's sampler on confirm_samples, where this step was re-read


def measured(result: Evaluation, oracle: OracleLevels) -> dict:
    """What a curve keeps of one evaluation: rates with counts and intervals, excess, quality."""
    summary = result.summary()
    return dict(samples=result.n, rates=summary["rates"], counts=summary["counts"], intervals=summary["intervals"],
                excess=result.excess(oracle), quality=summary["quality"])


@dataclass
class Start:
    """What every curve is read against, per sampler: the oracle's levels and the pretrained model's
    figures (its point 0), and for the confirmation the oracle's levels on confirm_samples."""

    oracle: dict  # PAPER / DDIM -> OracleLevels
    pretrained: Point
    oracle_confirming: Optional[OracleLevels] = None
    nearest: Optional[dict] = None  # PAPER / DDIM -> [(label, nearest)] rows: the oracle's and pretrained


def start_of(settings: CurveSettings, device: str, reference: Reference) -> Start:
    """Evaluate the oracle (levels) and the pretrained model under both samplers. The oracle's levels
    for the paper's sampler come from its first `samples` seeds, as the curve's points are drawn,
    and, for the confirmation, from all `confirm_samples`."""
    oracle_model, pretrained_model = (load_backend(path, device=device) for path in (BUILTIN_ORACLE, BUILTIN_MODEL))
    levels, by_sampler, nearest, confirming = {}, {}, {}, None
    for key, sampler in settings.samplers().items():
        if key == PAPER and settings.confirm_samples:
            full = evaluate(oracle_model, settings.confirming(), reference)
            confirming = OracleLevels.from_evaluation(full, source=f"{BUILTIN_ORACLE.name}, {full.sampler}")
            first = Samples(full.samples.images[:sampler.n_samples], full.samples.seeds[:sampler.n_samples])
            oracle_result = evaluate_samples(first, reference, sampler=sampler.describe(device))
        else:
            oracle_result = evaluate(oracle_model, sampler, reference)
        levels[key] = OracleLevels.from_evaluation(oracle_result, source=f"{BUILTIN_ORACLE.name}, {oracle_result.sampler}")
        pretrained = evaluate(pretrained_model, sampler, reference, levels[key])
        by_sampler[key] = measured(pretrained, levels[key])
        nearest[key] = [("oracle", oracle_result.nearest(NEAREST)), (0, pretrained.nearest(NEAREST))]
    return Start(levels, Point(0, 0.0, 0.0, by_sampler), confirming, nearest)


def method_curve(method: str, settings: CurveSettings, device: str, reference: Reference, start: Start,
                 log: Callable[[str], None], nearest: Optional[dict] = None,
                 known: Sequence[dict] = ()) -> list[Point]:
    """Train `method` from the built-in model to the last checkpoint, evaluating at each one under
    both samplers (`known`: points an earlier run of the same training measured, kept as they are;
    the training then stops at the last checkpoint they lack, since a run's first steps do not
    depend on how many follow).
    Where a checkpoint is at the oracle's level under the paper's sampler, it is re-read on
    `confirm_samples` (until one confirms). `nearest`, when given, collects per sampler each
    evaluated checkpoint's `Evaluation.nearest(NEAREST)` (the grid to look at)."""
    measured_before = {p["step"]: Point(**p) for p in known if p["step"] > 0}
    forget, retain = builtin_sets()
    backend = load_backend(BUILTIN_MODEL, device=device)
    last_new = max((step for step in settings.checkpoints if step not in measured_before), default=0)
    config = UnlearnConfig.preset("mnist", method=method, steps=max(last_new, 1),
                                  batch_size=settings.batch_size, seed=settings.seed, device=device)
    points = [start.pretrained] if settings.checkpoints[0] == 0 else []
    evaluating = {"seconds": 0.0, "cpu": 0.0}  # evaluation time so far, taken out of the run's clocks
    cpu_start = time.process_time()
    pretrained = asdict(start.pretrained)

    def on_step(event: StepEvent) -> None:
        if event.step not in settings.checkpoints:
            return
        if event.step in measured_before:
            points.append(measured_before[event.step])
            log(f"{method} step {event.step}: kept")
            return
        started, cpu_started = time.perf_counter(), time.process_time()
        by_sampler = {}
        for key, sampler in settings.samplers().items():
            result = evaluate(backend, sampler, reference, start.oracle[key])
            by_sampler[key] = measured(result, start.oracle[key])
            if nearest is not None:
                nearest.setdefault(key, []).append((event.step, result.nearest(NEAREST)))
        here = Point(event.step, event.seconds - evaluating["seconds"], cpu_started - cpu_start - evaluating["cpu"],
                     by_sampler)
        already = any(p.confirmed and p.confirmed["at_oracle_level"] for p in points)
        if start.oracle_confirming is not None and not already and reaches(asdict(here), start.oracle[PAPER].to_dict(),
                                                                                        pretrained, PAPER):
            here.confirmed = confirmation(backend, settings, reference, start)
        points.append(here)
        evaluating["seconds"] += time.perf_counter() - started
        evaluating["cpu"] += time.process_time() - cpu_started
        log(f"{method} step {event.step}: {here.seconds:.1f} s training; "
            + "; ".join(f"{key} rates {_short(m['rates'])}, excess {_short(m['excess'])}" for key, m in by_sampler.items())
            + ("" if here.confirmed is None else f"; on {settings.confirm_samples}: excess "
               f"{_short(here.confirmed['excess'])}, at the oracle's level: {here.confirmed['at_oracle_level']}"))

    if last_new > 0:
        unlearn(backend, forget, retain, config, on_step=on_step)
    for step in (step for step in settings.checkpoints if step > last_new and step in measured_before):
        points.append(measured_before[step])
        log(f"{method} step {step}: kept (not retrained)")
    return points


def first_new(checkpoints: Sequence[int], known: Sequence[dict]) -> int:
    """The first checkpoint no stored point has: where an extending run's grids start."""
    stored = {p["step"] for p in known}
    return next(step for step in checkpoints if step not in stored)


def reaches(point: dict, oracle: dict, pretrained: dict, key: str, quality: bool = True) -> bool:
    """Whether a checkpoint (as a dict) is at the oracle's level under sampler `key`
    (`evaluation.at_oracle_level`), `oracle` the oracle's levels under that sampler as a dict; with
    `quality` False, by the forget measures alone (what the table shows beside the verdict)."""
    mine = point["by_sampler"][key]
    more = copies_beyond_oracle(mine.get("counts", {}), mine["samples"], oracle["rates"], oracle.get("n_samples", 0))
    if not quality:
        return forget_measures_at_oracle(mine["excess"], more)
    return at_oracle_level(mine["excess"], mine["quality"], oracle["quality"], pretrained["by_sampler"][key]["quality"],
                           more)


def confirmation(backend, settings: CurveSettings, reference: Reference, start: Start) -> dict:
    """The paper's sampler on `confirm_samples`, read against the oracle's levels on as many: the
    forget measures' excess must stay at most 0 and the copies within the oracle's (quality is
    judged on the checkpoint's own draw, since a Fréchet distance depends on the number of samples)."""
    result = evaluate(backend, settings.confirming(), reference, start.oracle_confirming)
    figures = measured(result, start.oracle_confirming)
    oracle = start.oracle_confirming
    more = copies_beyond_oracle(figures["counts"], figures["samples"], oracle.rates, oracle.n_samples)
    figures["at_oracle_level"] = forget_measures_at_oracle(figures["excess"], more)
    return figures


def run_curves(settings: CurveSettings, out: Path, log: Callable[[str], None] = print,
               beside: str = NOT_RECORDED) -> dict:
    """Evaluate the oracle and the pretrained model, then each method's curve; write the files
    after each method (an interrupted run keeps what it measured). Returns the curves.json data.
    `beside`: what else ran on the machine, for the run record (`runrecord`)."""
    settings.validate()
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(settings.command(), beside, device)
    reference = builtin_reference(device, reference_size=settings.retain_reference)
    start = stored_start(out / "curves.json", settings)
    if start is None:
        start = start_of(settings, device, reference)
        for key, rows in start.nearest.items():
            save_nearest_rows(rows, out / f"curves-nearest-start-{key}.png")
    else:
        log(f"start: kept from {out / 'curves.json'}")
    log("start: " + "; ".join(f"{key}: oracle rates {_short(start.oracle[key].rates)}, pretrained rates "
                              f"{_short(start.pretrained.by_sampler[key]['rates'])}" for key in start.oracle))
    data = {"meta": {"settings": asdict(settings),
                     "samplers": {key: s.describe(device) for key, s in settings.samplers().items()},
                     "confirming": settings.confirming().describe(device) if settings.confirm_samples else None,
                     "thresholds": reference.thresholds(),
                     "how": "one process; training seconds exclude evaluation; every method from the built-in "
                            "model with the same seed (rows and noise per branch) and the same sample seeds",
                     **record.finish()},
            "oracle": {key: levels.to_dict() for key, levels in start.oracle.items()},
            "oracle_confirming": start.oracle_confirming.to_dict() if start.oracle_confirming else None,
            "pretrained": asdict(start.pretrained)}
    stored = stored_curves(out / "curves.json", data)
    # written as they are until their turn comes, so a run stopped part-way loses none of them;
    # a method measured now takes its place in the order of `settings.methods`
    data["methods"] = {method: stored.get(method) for method in settings.methods}
    for method in settings.methods:
        known = stored.get(method, [])
        if [p["step"] for p in known] == list(settings.checkpoints):  # measured by an earlier run: keep it
            data["methods"][method] = known
            log(f"{method}: kept from {out / 'curves.json'}")
        else:
            nearest: dict = {}
            data["methods"][method] = [asdict(p) for p in method_curve(method, settings, device, reference, start,
                                                                        log, nearest, known)]
            # the checkpoints measured now; a run that extends a stored curve names its new steps
            suffix = f"-from-{first_new(settings.checkpoints, known)}" if known else ""
            for key, rows in nearest.items():
                save_nearest_rows(rows, out / f"curves-nearest-{method}-{key}{suffix}.png")
        data["meta"].update(record.finish())
        write_curves({**data, "methods": {m: points for m, points in data["methods"].items() if points}}, out)
    return data


def _settings_but(meta: dict, *names: str) -> dict:
    """A run's settings as stored in JSON, without `names` (e.g. the list of methods: no curve
    depends on it; the checkpoints: the start does not depend on them). Runs stored before the
    compiled network existed drew eager."""
    stored = {"compiled": False, **json.loads(json.dumps(meta.get("settings", {})))}
    return {k: v for k, v in stored.items() if k not in names}


def stored_start(path: Path, settings: CurveSettings) -> Optional[Start]:
    """The oracle's levels and the pretrained model's point from an earlier run in `path` with the
    same settings (the methods and the checkpoints aside), so a run that adds methods or later
    checkpoints does not redraw them (the confirmation's 5,000 oracle samples alone take minutes);
    None otherwise."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if _settings_but(old.get("meta", {}), "methods", "checkpoints") != \
            _settings_but({"settings": asdict(settings)}, "methods", "checkpoints"):
        return None
    confirming = old.get("oracle_confirming")
    return Start({key: OracleLevels.from_dict(levels) for key, levels in old["oracle"].items()},
                 Point(**old["pretrained"]), OracleLevels.from_dict(confirming) if confirming else None)


def stored_curves(path: Path, data: dict) -> dict:
    """The method curves already in `path` from a run with the same settings (the methods and the
    checkpoints aside) and starting measurements: a stopped run resumes with the methods it has
    not measured, in any order, and a run with later checkpoints measures only those (each curve's
    points at the run's checkpoints; the training is redone from the same seed, so the stored
    points belong to it); {} otherwise."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = (_settings_but(old.get("meta", {}), "methods", "checkpoints")
            == _settings_but(data["meta"], "methods", "checkpoints")
            and old.get("oracle") == json.loads(json.dumps(data["oracle"]))
            and old.get("pretrained") == json.loads(json.dumps(data["pretrained"])))
    checkpoints = set(data["meta"]["settings"]["checkpoints"])
    return {method: [p for p in points if p["step"] in checkpoints]
            for method, points in old.get("methods", {}).items()} if same else {}


# ============================================================================ reading the curves
def time_to_oracle(points: Sequence[dict], oracle: dict, pretrained: dict, key: str = PAPER,
                   quality: bool = True) -> Optional[dict]:
    """The first checkpoint at the oracle's level under sampler `key` (`evaluation.at_oracle_level`;
    by the forget measures alone when `quality` is False), and, for the paper's sampler where the
    curve re-read it on more samples, confirmed there too; None ("never") when no checkpoint is.
    `oracle`: sampler key -> OracleLevels as a dict."""
    for p in points:
        if not reaches(p, oracle[key], pretrained, key, quality):
            continue
        if key == PAPER and p.get("confirmed") is not None and not p["confirmed"]["at_oracle_level"]:
            continue
        return {"step": p["step"], "seconds": p["seconds"], "cpu_seconds": p.get("cpu_seconds"),
                "confirmed_on": None if p.get("confirmed") is None else p["confirmed"]["samples"]}
    return None


def time_to_both(points: Sequence[dict], oracle: dict, pretrained: dict) -> Optional[dict]:
    """The first checkpoint at the oracle's level under both samplers (the verdict "forgotten")."""
    for p in points:
        paper = time_to_oracle([p], oracle, pretrained, PAPER)
        if paper is not None and reaches(p, oracle[DDIM], pretrained, DDIM):
            return paper
    return None


def write_curves(data: dict, out: Path) -> None:
    """curves.json, curves.md (the time-to-oracle table) and curves.png."""
    write_json_and_markdown(out / "curves.json", data, curves_table(data))
    plot_curves(data, out / "curves.png")


def _when(hit: Optional[dict]) -> str:
    return "never" if hit is None else f"{hit['step']} ({hit['seconds']:.1f} s)"


def curves_table(data: dict) -> str:
    meta, oracle, pretrained = data["meta"], data["oracle"], data["pretrained"]
    figure = quality_figure(pretrained["by_sampler"][PAPER]["quality"]) or "quality"
    reached = {m: time_to_oracle(points, oracle, pretrained, PAPER) for m, points in data["methods"].items()}
    settings = meta["settings"]
    lines = [
        f"Forgetting curves on the built-in digits + T-shirt model: each method from the same start and seed, "
        f"batch {settings['batch_size']} per branch, evaluated at steps {', '.join(map(str, settings['checkpoints']))} "
        f"under the paper's sampler ({meta['samplers'][PAPER]}) and DDIM ({meta['samplers'][DDIM]}); a first step "
        f"at the oracle's level under the paper's sampler re-read on {settings['confirm_samples']} samples. "
        + describe_run(meta),
        "",
        f"At the oracle's level (retrack.evaluation.at_oracle_level): every T-shirt measure ({', '.join(FORGET_MEASURES)}) "
        f"has an excess over the oracle of at most 0 under that sampler and no more copies than the oracle beyond "
        f"sampling error (95 % Wilson intervals), while {figure} (lower is better) is no worse "
        "than the worse of the oracle's and the pretrained model's. Steps (training seconds in brackets: k-NN "
        "search included, evaluation excluded). Forgotten = at the oracle's level under both samplers."
        + _runs_caveat(meta),
        "",
        "| method | paper's sampler: first step at the oracle's level | confirmed on | the same, T-shirt measures "
        "alone (quality aside) | DDIM-50: first step | both (forgotten) | T-shirt rate (L2) at the last step, paper / "
        f"DDIM | excess (L2) at the last step, paper / DDIM | {figure} at the last step, paper / DDIM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, points in data["methods"].items():
        last, hit = points[-1], reached[method]
        ddim_hit, both = time_to_oracle(points, oracle, pretrained, DDIM), time_to_both(points, oracle, pretrained)
        p, d = last["by_sampler"][PAPER], last["by_sampler"][DDIM]
        forget_only = time_to_oracle(points, oracle, pretrained, PAPER, quality=False)
        lines.append(f"| {method} | {_when(hit)} | {'–' if hit is None or not hit['confirmed_on'] else hit['confirmed_on']} | "
                     f"{_when(forget_only)} | {_when(ddim_hit)} | {_when(both)} | {p['rates']['l2']:.1%} / {d['rates']['l2']:.1%} | "
                     f"{p['excess'].get('l2', float('nan')):+.1%} / {d['excess'].get('l2', float('nan')):+.1%} | "
                     f"{_number(p['quality'].get(figure))} / {_number(d['quality'].get(figure))} |")
    for key, name in ((PAPER, "paper's sampler"), (DDIM, "DDIM")):
        lines += ["", f"Under the {name}: oracle T-shirt rates {_short(oracle[key]['rates'])}, {figure} "
                  f"{_number(oracle[key]['quality'].get(figure))}; pretrained rates "
                  f"{_short(pretrained['by_sampler'][key]['rates'])}, {figure} "
                  f"{_number(pretrained['by_sampler'][key]['quality'].get(figure))}."]
    if "retrack" in reached and "siss" in reached:
        retrack, siss = reached["retrack"], reached["siss"]
        lines.append("")
        if retrack and siss and siss["seconds"] > 0:
            lines.append(f"Under the paper's sampler ReTrack reaches the oracle's level in {retrack['seconds']:.1f} s "
                         f"(step {retrack['step']}), SISS in {siss['seconds']:.1f} s (step {siss['step']}): ratio "
                         f"ReTrack / SISS = {retrack['seconds'] / siss['seconds']:.2f}"
                         + (f" (in CPU time {retrack['cpu_seconds'] / siss['cpu_seconds']:.2f})."
                            if retrack.get("cpu_seconds") and siss.get("cpu_seconds") else "."))
        else:
            lines.append(f"Time-to-forget ratio ReTrack / SISS under the paper's sampler: not defined (ReTrack "
                         f"{'never' if not retrack else format(retrack['seconds'], '.1f') + ' s'}, SISS "
                         f"{'never' if not siss else format(siss['seconds'], '.1f') + ' s'} within these checkpoints).")
    return "\n".join(lines) + "\n"


def _runs_caveat(meta: dict) -> str:
    """A warning when the points were measured in several runs (`meta["measured_in"]`, one entry per
    run that added checkpoints or methods): their seconds then come from different loads."""
    runs = meta.get("measured_in", [])
    if len(runs) < 2:
        return ""
    return (f" These points come from {len(runs)} runs under different loads (meta.measured_in in the JSON): "
            "compare steps, not seconds, between them.")


def plot_curves(data: dict, path: Path) -> None:
    """Three panels against steps: the excess over the oracle by pixel L2 under the paper's sampler
    and under DDIM (solid; the share below the L2 threshold dashed), and the quality figure (solid:
    paper's sampler, dashed: DDIM); the oracle (and the pretrained model's quality) as lines. The
    excess is drawn, not the rate alone, because a model can leave no exact copy yet still draw
    blurred T-shirts that the oracle never draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle, pretrained = data["oracle"], data["pretrained"]
    figure = quality_figure(pretrained["by_sampler"][PAPER]["quality"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    colours = {"retrack": "tab:red", "siss": "tab:purple", "vanilla": "tab:blue", "neggrad": "tab:orange",
               "erasediff": "tab:brown"}
    for method, points in data["methods"].items():
        style = dict(color=colours.get(method), marker="o", label=method, lw=2.5 if method == "retrack" else 1.5)
        steps = [p["step"] for p in points]
        for ax, key in ((axes[0], PAPER), (axes[1], DDIM)):
            ax.plot(steps, [100 * p["by_sampler"][key]["excess"]["l2"] for p in points], **style)
            ax.plot(steps, [100 * p["by_sampler"][key]["rates"]["l2"] for p in points], color=style["color"],
                    ls="--", lw=1, alpha=0.6)
        if figure is not None:
            for key, line in ((PAPER, "-"), (DDIM, "--")):
                axes[2].plot(steps, [p["by_sampler"][key]["quality"].get(figure) for p in points],
                             **{**style, "ls": line, "label": method if key == PAPER else None})
    for ax in axes[:2]:
        ax.axhline(0.0, color="tab:green", ls="--", label="oracle (excess 0 by definition)")
        ax.set_ylabel("excess over the oracle (pixel L2), %\n(dashed: share below the L2 threshold)", fontsize=8)
        ax.set_xlabel("steps")
    axes[0].set_title(f"Paper's sampler ({data['meta']['samplers'][PAPER].split(', seeds')[0]})")
    axes[1].set_title(f"Deterministic ({data['meta']['samplers'][DDIM].split(', seeds')[0]})")
    if figure is not None:
        for key, line in ((PAPER, "-"), (DDIM, "--")):
            for value, colour, name in ((oracle[key]["quality"].get(figure), "tab:green", "oracle"),
                                        (pretrained["by_sampler"][key]["quality"].get(figure), "black", "pretrained")):
                if value is not None:  # (None: fewer than two non-copies to measure it on)
                    axes[2].axhline(value, color=colour, ls=line, lw=1, label=name if key == PAPER else None)
        axes[2].set_ylabel(f"{figure} (lower: better digits)")
    axes[2].set_xlabel("steps")
    axes[2].set_title("Quality (solid: paper's sampler, dashed: DDIM)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['meta']['samplers'][PAPER]} / {data['meta']['samplers'][DDIM]}; {data['meta']['device']}",
                 fontsize=9)
    fig.tight_layout()
    write_file_atomically(path, fig.savefig)
    plt.close(fig)


def _short(values: dict) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in values.items())


def _number(value: Optional[float]) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"

