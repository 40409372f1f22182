"""Side-by-side benchmark of the unlearning methods on the built-in digits + T-shirt model.

    python -m retrack bench                  # the published budget: 50 steps, batch 128, 1,000 samples
    python -m retrack bench --quick          # a few steps and samples (CI)

From the same built-in model, with the same steps, batch and seeds, it runs: the pretrained
model (no change), vanilla, NegGrad, EraseDiff, SISS and ReTrack, plus the retrained oracle. Each
model then draws the same seeded samples, measured by `retrack.evaluation` (the one evaluation):
- T-shirt rates by the pixel-L2 criterion, the project's classifier and CLIP, each also read
  against the oracle (share of samples closer to the T-shirt than the oracle's 1 % quantile,
  minus 1 %),
- quality on the non-T-shirt samples (pixel-L2 criterion): Fréchet distance of CLIP features to
  the retain set, an Inception-style score from zero-shot CLIP digit classes, and on the
  classifier the confident-digit rate, the digit Inception Score and its Fréchet distance.
It writes results.json, results.md (table), tradeoff.png (memorisation vs quality, one point per
method), one grid of the first 64 samples per method (samples-<method>.png) and one of the 16
samples nearest the T-shirt (nearest-<method>.png, captioned with their pixel-L2 distances). All
timings come from this one process.

    python -m retrack bench --nll --methods pretrained,retrack,oracle

instead measures the likelihood (bits/dim, `retrack.likelihood`) of the forget image and a few
retain images under each method's model and writes nll.json and nll.md: forgetting should raise
the forget image's bits/dim toward the oracle's while the retain images' stay.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .atomic import write_file_atomically
from .backends import load_backend
from .backends.base import Backend
from .builtin import builtin_dataset, builtin_sets
from .engine import UnlearnConfig, resolve_device, unlearn
from .evaluation import (
    REFERENCE_SIZE, Evaluation, OracleLevels, Reference, SamplerSettings, builtin_reference, evaluate,
    save_nearest_rows,
)
from .likelihood import LikelihoodRow, NLLSettings, likelihood_table, model_likelihoods
from .paths import BUILTIN_MODEL, BUILTIN_ORACLE
from .presets import DEFAULTS, PRESETS
from .sampling import save_grid

ALL_METHODS = ("pretrained", "vanilla", "neggrad", "erasediff", "siss", "retrack", "oracle")


@dataclass
class BenchSettings:
    methods: Sequence[str] = ALL_METHODS
    steps: int = PRESETS["mnist"]["steps"]  # the built-in model's published settings
    batch_size: int = PRESETS["mnist"]["batch_size"]
    samples: int = 1000
    sample_steps: int = 50
    seed: int = DEFAULTS["seed"]
    device: str = "auto"
    retain_reference: int = REFERENCE_SIZE  # retain images whose features are the quality reference

    def sampler(self) -> SamplerSettings:
        """The evaluation draw: the benchmark's samples and steps with the default evaluation sampler."""
        return SamplerSettings(n_samples=self.samples, seed=self.seed, steps=self.sample_steps)

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(steps=3, batch_size=16, samples=32, sample_steps=10, retain_reference=256)


@dataclass
class Row:
    method: str
    rates: dict  # share of T-shirt copies per measure: l2 (pixel), clip, classifier (retrack.evaluation)
    excess: dict  # the same measures read against the oracle: share below its 1 % quantile, minus 1 %
    quality: dict  # clip_fd, clip_class_score, confident_digit_rate, digit_inception_score, classifier_fd
    clip_score_mean: float  # mean per-sample CLIP memorisation score
    clip_score_max: float
    unlearn_seconds: Optional[float] = None  # k-NN + all steps
    knn_seconds: Optional[float] = None
    seconds_per_step: Optional[float] = None
    sampling_seconds: float = 0.0
    final_loss: Optional[float] = None

    @property
    def tshirt_rate(self) -> float:
        """The pixel-L2 T-shirt rate."""
        return self.rates["l2"]

    @property
    def fd(self) -> float:
        """Fréchet distance of CLIP features of the non-copies to the retain reference (nan without)."""
        value = self.quality.get("clip_fd")
        return float("nan") if value is None else value


def reference_and_oracle(settings: BenchSettings, device: str,
                         log: Callable[[str], None]) -> tuple[Reference, Evaluation, float]:
    """The built-in reference (`evaluation.builtin_reference`), the oracle's evaluation under the
    benchmark's sampler (its `oracle` field holds the levels every other model is read against)
    and the seconds that evaluation took."""
    reference = builtin_reference(device, reference_size=settings.retain_reference)
    log(f"thresholds: {reference.thresholds()}")
    started = time.perf_counter()
    oracle = evaluate(load_backend(BUILTIN_ORACLE, device=device), settings.sampler(), reference)
    source = f"{BUILTIN_ORACLE.name}, {settings.sampler().describe(device)}"
    oracle.oracle = OracleLevels.from_evaluation(oracle, source=source)
    return reference, oracle, time.perf_counter() - started


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


def run(settings: BenchSettings, out: Path, log: Callable[[str], None] = print) -> list[Row]:
    """Run every method in one process and write the results under `out`."""
    check_methods(settings)
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference, oracle, oracle_seconds = reference_and_oracle(settings, device, log)
    forget, retain = builtin_sets()
    rows = []
    for method in settings.methods:
        if method == "oracle":
            result, sampling_seconds, extra = oracle, oracle_seconds, {}
        else:
            backend, extra = method_model(method, settings, device, forget, retain, log)
            t0 = time.perf_counter()
            result = evaluate(backend, settings.sampler(), reference, oracle=oracle.oracle)
            sampling_seconds = time.perf_counter() - t0
        summary = result.summary()
        row = Row(method=method, rates=summary["rates"], excess=result.excess(oracle.oracle), quality=summary["quality"],
                  clip_score_mean=summary["clip_similarity_mean"], clip_score_max=summary["clip_similarity_max"],
                  sampling_seconds=sampling_seconds, **extra)
        rows.append(row)
        save_grid(result.samples.images[:64], out / f"samples-{method}.png", ncol=16)
        save_nearest_rows([(None, result.nearest(16))], out / f"nearest-{method}.png")
        log(f"{method}: T-shirt rates {_percentages(row.rates)}, excess over the oracle {_percentages(row.excess)}, "
            f"quality {_figures(row.quality)} ({sampling_seconds:.1f} s sampling)")
    write_results(rows, settings, out, time.perf_counter() - started, device, reference)
    return rows


def _percentages(values: dict) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in values.items())


def _figures(values: dict) -> str:
    return ", ".join(f"{name} {_fmt(value, '.3g')}" for name, value in values.items())


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def machine(device: str) -> str:
    """The device in words, for records: a GPU's name, or the CPU and its thread count."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_results(rows: list[Row], settings: BenchSettings, out: Path, seconds: float, device: str,
                  reference: Reference) -> None:
    """results.json, results.md and tradeoff.png."""
    where = machine(device)
    meta = dict(settings=asdict(settings), device=where, total_seconds=round(seconds, 1),
                thresholds=reference.thresholds(), sampler=settings.sampler().describe(device),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_file_atomically(out / "results.json", json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))
    lines = [
        f"Built-in digits + T-shirt model; {settings.steps} steps x batch {settings.batch_size} per branch; "
        f"{settings.samples} samples per model ({settings.sampler().describe(device)}); "
        f"device: {where}; whole benchmark {seconds:.0f} s.",
        "",
        "| method | T-shirt rate (pixel L2) | excess over oracle (L2) | T-shirt rate (classifier) | "
        "CLIP memorisation rate | mean CLIP score | FD to retain (CLIP) ↓ | class score ↑ | confident digits ↑ | "
        "digit FD (classifier) ↓ | unlearning time (s) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.method} | {r.tshirt_rate:.1%} | {_fmt(r.excess.get('l2'), '+.1%')} | "
                     f"{_fmt(r.rates.get('classifier'), '.1%')} | {_fmt(r.rates.get('clip'), '.1%')} | "
                     f"{r.clip_score_mean:.3f} | {_fmt(r.quality.get('clip_fd'), '.3f')} | "
                     f"{_fmt(r.quality.get('clip_class_score'), '.2f')} | {_fmt(r.quality.get('confident_digit_rate'), '.1%')} | "
                     f"{_fmt(r.quality.get('classifier_fd'), '.3g')} | {_fmt(r.unlearn_seconds, '.1f')} | "
                     f"{_fmt(r.seconds_per_step, '.3f')} |")
    lines += ["", f"Thresholds (retrack.evaluation): pixel L2 {reference.l2_threshold:.3f} ({reference.l2_rule}); "
              f"CLIP similarity {reference.clip_threshold:.3f}; classifier: p(T-shirt) > 0.5. 'Excess over oracle': "
              "share of samples closer (pixel L2) to the T-shirt than the oracle's 1 % quantile, minus 1 %. "
              "Quality on the samples that are not pixel-L2 copies."]
    write_file_atomically(out / "results.md", "\n".join(lines) + "\n")
    plot_tradeoff(rows, out / "tradeoff.png")


def plot_tradeoff(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    placed: list[tuple[float, float]] = []  # points already labelled, to stack labels of coinciding points
    x_span = max(1e-9, max(100 * r.tshirt_rate for r in rows) / 20)  # "the same place": within 1/20 of the axes
    y_span = max(1e-9, max([r.fd for r in rows if np.isfinite(r.fd)] or [1.0]) / 20)
    for r in rows:
        colour = {"retrack": "tab:red", "oracle": "tab:green", "pretrained": "black"}.get(r.method, "tab:blue")
        x, y = 100 * r.tshirt_rate, r.fd
        ax.scatter(x, y, s=60 if r.method != "retrack" else 90, color=colour, zorder=3 if r.method != "retrack" else 4,
                   marker="o" if r.method != "retrack" else "*")
        near = sum(abs(x - px) < x_span and abs(y - py) < y_span for px, py in placed)
        placed.append((x, y))
        ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=9)
    ax.set_xlabel("T-shirt samples (pixel L2), % (lower: forgets better)")
    ax.set_ylabel("Fréchet distance to retain set, CLIP (lower: better digits)")
    ax.set_title("Memorisation vs quality, same steps and seeds")
    ax.grid(alpha=0.3)
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
                   log: Callable[[str], None] = print) -> list[LikelihoodRow]:
    """Bits/dim of the T-shirt and `n_retain` digits under each method's model; nll.json, nll.md in `out`.

    The same images get the same dequantisation and probes under every model (seeded per image).
    The files are rewritten after each method, so an interrupted run keeps what it measured.
    """
    check_methods(settings)
    nll.validate()
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), _load_average()
    forget, retain = builtin_sets()
    names, images = likelihood_images(settings.seed, n_retain)
    rows: list[LikelihoodRow] = []
    for method in settings.methods:
        backend, _ = method_model(method, settings, device, forget, retain, log)
        for (name, role), result in zip(names, model_likelihoods(backend, images, nll)):
            rows.append(LikelihoodRow(method, name, role, result))
            log(f"{method}: {name}: {result} ({result.evaluations} evaluations, {result.seconds:.0f} s)")
        write_likelihood(rows, settings, nll, out, time.perf_counter() - started, device, load_before)
    return rows


def _load_average() -> Optional[float]:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def write_likelihood(rows: list[LikelihoodRow], settings: BenchSettings, nll: NLLSettings, out: Path, seconds: float,
                     device: str, load_before: Optional[float]) -> None:
    """nll.json (every repeat, evaluations and seconds per image) and nll.md (the table)."""
    where = machine(device)
    per_image = [row.result.seconds for row in rows]
    meta = dict(settings=asdict(settings), likelihood=asdict(nll), device=where, total_seconds=round(seconds, 1),
                load_average_at_start=load_before, load_average_at_end=_load_average(),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_file_atomically(out / "nll.json", json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))
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
        f"Device: {where}; {min(per_image):.0f}–{max(per_image):.0f} s per image "
        f"({min(r.result.evaluations for r in rows)}–{max(r.result.evaluations for r in rows)} network "
        f"evaluations with their vector-Jacobian products); whole run {seconds:.0f} s, on a shared machine "
        f"(load average {load_before} at the start, {meta['load_average_at_end']} at the end).",
    ]
    write_file_atomically(out / "nll.md", "\n".join(lines) + "\n")
