"""Side-by-side benchmark of the unlearning methods on the built-in digits + T-shirt model.

    python -m retrack bench                  # the published budget: 50 steps, batch 128; 5,000 + 1,000 samples
    python -m retrack bench --quick          # a few steps and samples (CI)

From the same built-in model, with the same steps, batch and seeds, it runs: the pretrained
model (no change), vanilla, NegGrad, EraseDiff, SISS and ReTrack, plus the retrained oracle. Each
model then draws the same seeded samples under two samplers: the paper's protocol (ancestral DDPM,
50 steps, as the released code's DDPMPipeline; 5,000 samples, since its T-shirt rates are well
under 1 %) and deterministic DDIM-50 (1,000 samples), measured by `retrack.evaluation` (the one
evaluation):
- T-shirt rates by the pixel-L2 criterion, the project's classifier and CLIP, each with its count
  and 95 % Wilson interval, and read against the oracle under the same sampler (share of samples
  closer to the T-shirt than the oracle's 1 % quantile, minus 1 %),
- quality on the non-T-shirt samples (pixel-L2 criterion): Fréchet distance of CLIP features to
  the retain set, an Inception-style score from zero-shot CLIP digit classes, and on the
  classifier the confident-digit rate, the digit Inception Score and its Fréchet distance,
- the verdict per sampler and under both (`evaluation.at_oracle_level`).
It writes results.json, results.md (table), tradeoff.png (memorisation vs quality, one point per
method and sampler) and, per method and sampler, a grid of the first 64 samples
(samples-<method>-<sampler>.png) and one of the 16 samples nearest the T-shirt
(nearest-<method>-<sampler>.png, captioned with their pixel-L2 distances). The files are rewritten
after each method, and a stopped run with the same settings resumes where it stopped. All timings
come from this one process.

    python -m retrack bench --nll --methods pretrained,retrack,oracle

instead measures the likelihood (bits/dim, `retrack.likelihood`) of the forget image and a few
retain images under each method's model and writes nll.json and nll.md: forgetting should raise
the forget image's bits/dim toward the oracle's while the retain images' stay.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .atomic import write_file_atomically
from .backends import load_backend
from .backends.base import Backend
from .builtin import builtin_dataset, builtin_reference, builtin_sets
from .devices import resolve_device
from .engine import UnlearnConfig, unlearn
from .evaluation import (
    COMPILED_BATCH, DDIM, PAPER, REFERENCE_SIZE, SECOND_SAMPLER_STEPS, Evaluation, OracleLevels, Reference, SamplerSettings,
    at_oracle_level, copies_beyond_oracle, evaluate,
)
from .grids import save_grid, save_nearest_rows
from .likelihood import LikelihoodRow, NLLSettings, likelihood_table, model_likelihoods
from .paths import BUILTIN_MODEL, BUILTIN_ORACLE
from .presets import DEFAULTS, EVALUATION_STEPS, PRESETS
from .runrecord import NOT_RECORDED, RunRecord, describe_run, runs_of, write_json_and_markdown

ALL_METHODS = ("pretrained", "vanilla", "neggrad", "erasediff", "siss", "retrack", "oracle")


@dataclass
class BenchSettings:
    methods: Sequence[str] = ALL_METHODS
    steps: int = PRESETS["mnist"]["steps"]  # the built-in model's published settings
    batch_size: int = PRESETS["mnist"]["batch_size"]
    samples: int = 5000  # under the paper's sampler, whose T-shirt rates are well under 1 %
    deterministic_samples: int = 1000  # under DDIM-50, whose rates are several times higher
    sample_steps: int = EVALUATION_STEPS["mnist"]  # of the paper's sampler
    deterministic_steps: int = SECOND_SAMPLER_STEPS
    seed: int = DEFAULTS["seed"]
    device: str = "auto"
    compiled: bool = True  # draw with the compiled network (retrack.compiled): worth it at thousands of samples
    sample_batch: int = COMPILED_BATCH  # samples drawn at once (a GPU takes thousands); the samples do not change
    retain_reference: int = REFERENCE_SIZE  # retain images whose features are the quality reference

    def samplers(self) -> dict[str, SamplerSettings]:
        """The two draws every model is measured under, same seeds: the paper's protocol (ancestral
        DDPM) and the deterministic DDIM-50 (`evaluation.SamplerSettings.deterministic`)."""
        paper = SamplerSettings(n_samples=self.samples, seed=self.seed, steps=self.sample_steps, compiled=self.compiled,
                                batch_size=self.sample_batch)
        ddim = replace(replace(paper, n_samples=self.deterministic_samples).deterministic(), steps=self.deterministic_steps)
        return {PAPER: paper, DDIM: ddim}

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(steps=3, batch_size=16, samples=32, deterministic_samples=16, sample_steps=10, deterministic_steps=10,
                   retain_reference=256, compiled=False)  # compiling would cost more than these few samples

    def command(self) -> str:
        """The command line that runs these settings (the DDIM steps and the retain reference have no
        option: `--quick` sets them)."""
        return (f"python -m retrack bench --methods {','.join(self.methods)} --steps {self.steps} "
                f"--batch {self.batch_size} --samples {self.samples} --ddim-samples {self.deterministic_samples} "
                f"--sample-steps {self.sample_steps} --sample-batch {self.sample_batch} --seed {self.seed} "
                f"--device {self.device}" + ("" if self.compiled else " --eager"))


@dataclass
class Measured:
    """One model under one sampler: every rate with its count and 95 % interval, the excess over the
    oracle (same sampler), quality, and the seconds the draw took."""

    sampler: str  # SamplerSettings.describe
    samples: int
    rates: dict  # share of T-shirt copies per measure: l2 (pixel), clip, classifier
    counts: dict
    intervals: dict  # measure -> [low, high], 95 % Wilson
    excess: dict  # the same measures read against the oracle: share below its 1 % quantile, minus 1 %
    quality: dict  # clip_fd, clip_class_score, confident_digit_rate, digit_inception_score, classifier_fd
    clip_score_mean: float
    clip_score_max: float
    sampling_seconds: float

    @classmethod
    def of(cls, result: Evaluation, oracle: OracleLevels, seconds: float) -> "Measured":
        summary = result.summary()
        return cls(sampler=result.sampler, samples=result.n, rates=summary["rates"], counts=summary["counts"],
                   intervals=summary["intervals"], excess=result.excess(oracle), quality=summary["quality"],
                   clip_score_mean=summary["clip_similarity_mean"], clip_score_max=summary["clip_similarity_max"],
                   sampling_seconds=round(seconds, 1))


@dataclass
class Row:
    method: str
    by_sampler: dict  # PAPER / DDIM -> Measured (as a dict)
    unlearn_seconds: Optional[float] = None  # k-NN + all steps
    knn_seconds: Optional[float] = None
    seconds_per_step: Optional[float] = None
    final_loss: Optional[float] = None

    def tshirt_rate(self, sampler: str = PAPER) -> float:
        """The pixel-L2 T-shirt rate."""
        return self.by_sampler[sampler]["rates"]["l2"]

    def fd(self, sampler: str = PAPER) -> float:
        """Fréchet distance of CLIP features of the non-copies to the retain reference (nan without)."""
        value = self.by_sampler[sampler]["quality"].get("clip_fd")
        return float("nan") if value is None else value


def oracle_levels_by_sampler(settings: BenchSettings, device: str, reference: Reference, kept: dict,
                             log: Callable[[str], None]) -> tuple[dict, dict]:
    """Per sampler, the oracle's levels every other model is read against (`evaluation.OracleLevels`),
    reused from `kept` (an interrupted run's) when there, and the oracle's own evaluations drawn now."""
    levels, drawn = {}, {}
    for key, sampler in settings.samplers().items():
        if key in kept:
            levels[key] = OracleLevels.from_dict(kept[key])
            continue
        started = time.perf_counter()
        result = evaluate(load_backend(BUILTIN_ORACLE, device=device), sampler, reference)
        levels[key] = OracleLevels.from_evaluation(result, source=f"{BUILTIN_ORACLE.name}, {result.sampler}")
        result.oracle = levels[key]
        drawn[key] = (result, time.perf_counter() - started)
        log(f"oracle, {result.sampler}: rates {_percentages(result.rates())} ({drawn[key][1]:.0f} s)")
    return levels, drawn


def check_methods(settings: BenchSettings) -> None:
    unknown = set(settings.methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_METHODS)}")


def method_model(method: str, settings: BenchSettings, device: str, forget: torch.Tensor, retain: torch.Tensor,
                 log: Callable[[str], None]) -> tuple[Backend, dict]:
    """The model a method leaves: the built-in model (pretrained), the oracle, or the built-in model
    unlearned with the published MNIST settings at the benchmark's steps, batch and seed. Returns
    it and the unlearning figures for the table."""
    backend = load_backend(BUILTIN_ORACLE if method == "oracle" else BUILTIN_MODEL, device=device)
    if method in ("pretrained", "oracle"):
        return backend, {}
    config = UnlearnConfig.preset("mnist", method=method, steps=settings.steps, batch_size=settings.batch_size,
                                  seed=settings.seed, device=device)
    result = unlearn(backend, forget, retain, config)
    log(f"{method}: {result.seconds:.1f} s ({result.knn_seconds:.2f} s k-NN, {result.seconds_per_step:.3f} s/step)")
    return backend, dict(unlearn_seconds=result.seconds, knn_seconds=result.knn_seconds,
                         seconds_per_step=result.seconds_per_step, final_loss=result.events[-1].loss)


def run(settings: BenchSettings, out: Path, log: Callable[[str], None] = print, beside: str = NOT_RECORDED) -> list[Row]:
    """Run every method in one process and write the results under `out` after each method; a
    stopped run with the same settings resumes, keeping the methods (and oracle levels) it measured.
    `beside`: what else ran on the machine, for the run record (`runrecord`)."""
    check_methods(settings)
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(settings.command(), beside, device)
    reference = builtin_reference(device, reference_size=settings.retain_reference)
    log(f"thresholds: {reference.thresholds()}")
    kept_rows, kept_levels, earlier_runs = finished_rows(out / "results.json", settings)
    levels, oracle_drawn = oracle_levels_by_sampler(settings, device, reference, kept_levels, log)
    forget, retain = builtin_sets()
    rows, written = [], 0  # written: how many rows the files hold
    for method in settings.methods:
        if method in kept_rows:
            rows.append(kept_rows[method])
            log(f"{method}: kept from {out / 'results.json'}")
            continue
        backend, extra = (None, {}) if method == "oracle" and len(oracle_drawn) == 2 else \
            method_model(method, settings, device, forget, retain, log)
        by_sampler = {}
        for key, sampler in settings.samplers().items():
            if method == "oracle" and key in oracle_drawn:
                result, seconds = oracle_drawn[key]
            else:
                t0 = time.perf_counter()
                result = evaluate(backend, sampler, reference, oracle=levels[key])
                seconds = time.perf_counter() - t0
            by_sampler[key] = asdict(Measured.of(result, levels[key], seconds))
            save_grid(result.samples.images[:64], out / f"samples-{method}-{key}.png", ncol=16)
            save_nearest_rows([(None, result.nearest(16))], out / f"nearest-{method}-{key}.png")
            log(f"{method}, {result.sampler}: T-shirt rates {_percentages(result.rates())} "
                f"(counts {result.counts()}), excess over the oracle {_percentages(result.excess(levels[key]))}, "
                f"quality {_figures(result.quality_figures)} ({seconds:.1f} s sampling)")
        rows.append(Row(method=method, by_sampler=by_sampler, **extra))
        write_results(rows, settings, out, record, device, reference, levels, earlier_runs)
        written = len(rows)
    if 0 < written < len(rows):  # kept rows after the last measured one
        write_results(rows, settings, out, record, device, reference, levels, earlier_runs)
    return rows


def finished_rows(path: Path, settings: BenchSettings) -> tuple[dict, dict, list]:
    """The rows and oracle levels of an earlier run in `path` with the same settings (the list of
    methods and the sample batch aside), so a stopped benchmark resumes, and the records of the runs
    that measured them (`runrecord.runs_of`); ({}, {}, []) otherwise."""
    if not path.exists():
        return {}, {}, []
    old = json.loads(path.read_text())
    def comparable(values: dict) -> dict:  # runs stored before the compiled network existed drew eager
        values = {"compiled": False, **json.loads(json.dumps(values))}
        return {k: v for k, v in values.items() if k not in ("methods", "device", "sample_batch")}
    if comparable(old.get("meta", {}).get("settings", {})) != comparable(asdict(settings)) or "oracle_levels" not in old:
        return {}, {}, []
    return {row["method"]: Row(**row) for row in old.get("rows", [])}, old["oracle_levels"], runs_of(old["meta"])


def verdicts(rows: Sequence[Row]) -> dict[str, dict[str, Optional[bool]]]:
    """Per method and sampler, whether it is at the oracle's level (`evaluation.at_oracle_level`:
    no excess over the oracle by pixel L2 or the classifier, no more copies beyond sampling error,
    quality no worse than the oracle's and the pretrained model's), and under "both"; None where the
    oracle or pretrained row is missing."""
    by_method = {row.method: row for row in rows}
    out = {}
    for row in rows:
        out[row.method] = {}
        for key in (PAPER, DDIM):
            if "oracle" not in by_method or "pretrained" not in by_method:
                out[row.method][key] = None
                continue
            mine, oracle = row.by_sampler[key], by_method["oracle"].by_sampler[key]
            more = copies_beyond_oracle(mine["counts"], mine["samples"], oracle["rates"], oracle["samples"])
            out[row.method][key] = at_oracle_level(mine["excess"], mine["quality"], oracle["quality"],
                                                   by_method["pretrained"].by_sampler[key]["quality"], more)
        known = [v for v in out[row.method].values() if v is not None]
        out[row.method]["both"] = all(known) if len(known) == 2 else None
    return out


def _percentages(values: dict) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in values.items())


def _figures(values: dict) -> str:
    return ", ".join(f"{name} {_fmt(value, '.3g')}" for name, value in values.items())


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def rate_with_interval(measured: dict, measure: str = "l2") -> str:
    """'0.7 % (35/5000; 0.5–1.0 %)': the rate, its count and its 95 % Wilson interval."""
    if measure not in measured["rates"]:
        return "–"
    low, high = measured["intervals"][measure]
    return (f"{measured['rates'][measure]:.2%} ({measured['counts'][measure]}/{measured['samples']}; "
            f"{low:.2%}–{high:.2%})")


def _verdict(value: Optional[bool]) -> str:
    return "–" if value is None else ("yes" if value else "no")


def write_results(rows: list[Row], settings: BenchSettings, out: Path, record: RunRecord, device: str,
                  reference: Reference, levels: dict, earlier_runs: Sequence[dict] = ()) -> None:
    """results.json, results.md (`results_table`) and tradeoff.png; a resumed run lists every run's
    record in meta.measured_in (`earlier_runs`, then this one)."""
    meta = dict(settings=asdict(settings), thresholds=reference.thresholds(),
                samplers={key: sampler.describe(device) for key, sampler in settings.samplers().items()},
                **record.finish())
    if earlier_runs:
        meta["measured_in"] = [*earlier_runs, *runs_of(meta)]  # this run's own record last
    data = dict(meta=meta, oracle_levels={key: value.to_dict() for key, value in levels.items()},
                rows=[asdict(r) for r in rows], verdicts=verdicts(rows))
    write_json_and_markdown(out / "results.json", data, results_table(data))
    plot_tradeoff(rows, out / "tradeoff.png")


def results_table(data: dict) -> str:
    """results.md from results.json's data alone (so a stored result can be rendered again)."""
    meta, settings, thresholds = data["meta"], data["meta"]["settings"], data["meta"]["thresholds"]
    lines = [
        f"Built-in digits + T-shirt model; {settings['steps']} steps x batch {settings['batch_size']} per branch; "
        f"every model drawn under the paper's sampler ({meta['samplers'][PAPER]}) and under the deterministic DDIM "
        f"({meta['samplers'][DDIM]}), the same seeds for every model. " + describe_run(meta),
        "",
        "| method | T-shirt rate, paper's sampler (L2 < 10; count; 95 % CI) | excess over oracle (L2 / classifier) | "
        "digit FD ↓ | T-shirt rate, DDIM-50 (L2 < 10; count; 95 % CI) | excess over oracle, DDIM (L2 / classifier) | "
        "digit FD, DDIM ↓ | at the oracle's level: paper / DDIM / both | unlearning time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["rows"], key=lambda row: ALL_METHODS.index(row["method"])):
        cells = []
        for key in (PAPER, DDIM):
            m = r["by_sampler"][key]
            cells += [rate_with_interval(m), f"{_fmt(m['excess'].get('l2'), '+.2%')} / "
                      f"{_fmt(m['excess'].get('classifier'), '+.2%')}", _fmt(m["quality"].get("classifier_fd"), ".3g")]
        v = data["verdicts"][r["method"]]
        lines.append(f"| {r['method']} | {' | '.join(cells)} | {_verdict(v[PAPER])} / {_verdict(v[DDIM])} / "
                     f"{_verdict(v['both'])} | {_fmt(r.get('unlearn_seconds'), '.1f')} |")
    lines += ["", "Every rate, count and quality figure per sampler (T-shirt by the classifier and CLIP, the "
              "CLIP Fréchet distance, the confident-digit rate, seconds of sampling) is in results.json.", "",
              f"Thresholds (retrack.evaluation): pixel L2 {thresholds['l2']:.3f} ({thresholds['l2_rule']}); "
              f"CLIP similarity {_fmt(thresholds.get('clip_similarity'), '.3f')}; classifier: p(T-shirt) > "
              f"{_fmt(thresholds.get('classifier_probability'), 'g')}. 'Excess over oracle': "
              "share of samples closer to the T-shirt than the oracle's 1 % quantile under the same sampler, minus 1 %. "
              "'At the oracle's level' (evaluation.at_oracle_level): no excess by pixel L2 or the classifier, no more "
              "copies by either than the oracle beyond sampling error (95 % Wilson intervals apart), and the "
              "digit FD no worse than the oracle's and the pretrained model's. Quality on the samples that are not "
              "pixel-L2 copies."]
    return "\n".join(lines)


def plot_tradeoff(rows: list[Row], path: Path) -> None:
    """Memorisation against quality, one point per method and sampler (filled: the paper's
    sampler; hollow: DDIM-50), so a method's two readings sit side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, title in ((axes[0], PAPER, "paper's sampler (ancestral DDPM)"), (axes[1], DDIM, "DDIM-50")):
        placed: list[tuple[float, float]] = []  # points already labelled, to stack labels of coinciding points
        x_span = max(1e-9, max(100 * r.tshirt_rate(key) for r in rows) / 20)
        y_span = max(1e-9, max([r.fd(key) for r in rows if np.isfinite(r.fd(key))] or [1.0]) / 20)
        for r in rows:
            colour = {"retrack": "tab:red", "oracle": "tab:green", "pretrained": "black"}.get(r.method, "tab:blue")
            x, y = 100 * r.tshirt_rate(key), r.fd(key)
            ax.scatter(x, y, s=60 if r.method != "retrack" else 90, color=colour,
                       zorder=3 if r.method != "retrack" else 4, marker="o" if r.method != "retrack" else "*")
            near = sum(abs(x - px) < x_span and abs(y - py) < y_span for px, py in placed)
            placed.append((x, y))
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=9)
        ax.set_xlabel("T-shirt samples (pixel L2 < 10), % (lower: forgets better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Fréchet distance to retain set, CLIP (lower: better digits)")
    fig.suptitle("Memorisation vs quality, same steps and seeds", fontsize=10)
    fig.tight_layout()
    write_file_atomically(path, fig.savefig)
    plt.close(fig)


# ============================================================================ likelihood
def likelihood_images(seed: int, n_retain: int) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """The forget image (the T-shirt) and `n_retain` digits drawn with `seed`: (name, role) pairs and x0."""
    dataset = builtin_dataset()
    forget, retain = builtin_sets()
    pick = np.sort(np.random.default_rng(seed).choice(len(retain), n_retain, replace=False))
    labels = dataset.labels[~dataset.is_forget][pick]
    names = [("t-shirt", "forget")] + [(f"retain #{i} ({dataset.class_names[label]})", "retain")
                                       for i, label in zip(pick.tolist(), labels.tolist())]
    return names, torch.cat([forget[:1], retain[torch.from_numpy(pick)]])


def run_likelihood(settings: BenchSettings, out: Path, nll: NLLSettings = NLLSettings(), n_retain: int = 3,
                   log: Callable[[str], None] = print, beside: str = NOT_RECORDED) -> list[LikelihoodRow]:
    """Bits/dim of the T-shirt and `n_retain` digits under each method's model; nll.json, nll.md in `out`.

    The same images get the same dequantisation and probes under every model (seeded per image).
    The files are rewritten after each method, so an interrupted run keeps what it measured.
    `beside`: what else ran on the machine, for the run record (`runrecord`).
    """
    check_methods(settings)
    nll.validate()
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(f"{settings.command()} --nll --nll-retain {n_retain} --nll-tol {nll.rtol:g} "
                             f"--nll-repeats {nll.repeats}", beside, device)
    forget, retain = builtin_sets()
    names, images = likelihood_images(settings.seed, n_retain)
    rows: list[LikelihoodRow] = []
    for method in settings.methods:
        backend, _ = method_model(method, settings, device, forget, retain, log)
        for (name, role), result in zip(names, model_likelihoods(backend, images, nll)):
            rows.append(LikelihoodRow(method, name, role, result))
            log(f"{method}: {name}: {result} ({result.evaluations} evaluations, {result.seconds:.0f} s)")
        write_likelihood(rows, settings, nll, out, record)
    return rows


def write_likelihood(rows: list[LikelihoodRow], settings: BenchSettings, nll: NLLSettings, out: Path,
                     record: RunRecord) -> None:
    """nll.json (every repeat, evaluations and seconds per image) and nll.md (the table)."""
    per_image = [row.result.seconds for row in rows]
    meta = dict(settings=asdict(settings), likelihood=asdict(nll), **record.finish())
    methods = list(dict.fromkeys(row.model for row in rows))
    lines = [
        f"Likelihood of the built-in model's forget image and {len({r.image for r in rows}) - 1} retain digits "
        f"(drawn with seed {settings.seed}), in bits/dim (lower: the model finds the image more likely), under "
        f"{', '.join(methods)}; unlearning: published MNIST preset, {settings.steps} steps x batch "
        f"{settings.batch_size}, seed {settings.seed}.",
        "",
        likelihood_table(rows),
        "",
        f"Probability-flow ODE (Song et al. 2021), torchdiffeq {nll.method} with rtol {nll.rtol:g}, atol "
        f"{nll.atol:g}, t from {nll.t_min:g} to 1; {nll.repeats} repeats per image, each with its own uniform "
        f"dequantisation and {nll.probe} Hutchinson probe; ± is the standard error over the repeats (the solver's "
        f"error is not in it). Bits/dim on the 8-bit scale (-log p / (D ln 2) + 7), an upper bound on the "
        f"discrete negative log-likelihood.",
        "",
        f"{min(per_image):.0f}–{max(per_image):.0f} s per image ({min(r.result.evaluations for r in rows)}–"
        f"{max(r.result.evaluations for r in rows)} network evaluations with their vector-Jacobian products). "
        + describe_run(meta),
    ]
    write_json_and_markdown(out / "nll.json", dict(meta=meta, rows=[asdict(r) for r in rows]), "\n".join(lines))
