"""Which sampler can evaluate an unlearning run: DDIM-50 against DPM-Solver++ at 10-25 steps.

    python benchmarks/eval_sampler.py                    # 128 samples per setting, seeds 0..127
    python benchmarks/eval_sampler.py --n 512 --batch 64

Every setting draws the same seeds (sample i starts from the noise of seed i) from the built-in
model. Timing: the samples are drawn one batch at a time, every setting takes a turn on each batch
in a shuffled order, and seconds per sample are the median over batches, so background load hits
every setting alike; the figure that matters is the ratio to DDIM-50 measured that way.

For each setting it reports the memorisation figures (T-shirt rates: pixel L2 to the T-shirt below
the paper's 10 and below the calibrated threshold, the classifier's T-shirt rate, the CLIP rate of
`session.MemorisationDetector`), quality (CLIP Fréchet distance of the non-memorised samples to
retain images, the classifier's confident-digit rate and digit Inception Score), with standard
errors (binomial for rates, bootstrap over samples otherwise), the paired difference of each rate
to DDIM-50 with its standard error (same seeds, so the difference is far less noisy than the
rates), and the per-sample agreement: median pixel L2 between same-seed samples of the setting and
of DDIM-50 (and, on the first --ref-n seeds, of DDIM with --ref-steps steps, a finer solution of
the same ODE). Writes eval_sampler.json, eval_sampler.md and eval_sampler.png (same-seed samples,
one row per setting) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack import metrics  # noqa: E402
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_sets  # noqa: E402
from retrack.classifier import DigitClassifier  # noqa: E402
from retrack.data import TSHIRT_LABEL  # noqa: E402
from retrack.metrics import ClipScorer  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.sampling import image_grid, pixel_l2, sample, save_png  # noqa: E402
from retrack.session import REFERENCE_SIZE, MemorisationDetector  # noqa: E402

SETTINGS = (("ddim", 50), ("ddim", 25), ("dpm++", 10), ("dpm++", 15), ("dpm++", 20), ("dpm++", 25))
BASELINE = "ddim-50"
RATES = ("paper_l2_rate", "calibrated_l2_rate", "classifier_tshirt_rate", "clip_rate", "confident_digit_rate")


def name_of(scheduler: str, steps: int) -> str:
    return f"{scheduler}-{steps}"


def draw_interleaved(backend, n: int, batch: int, seed: int, order_seed: int) -> tuple[dict, dict]:
    """Images (N, 1, 28, 28) per setting and the seconds each batch took, settings interleaved."""
    images = {name_of(*s): [] for s in SETTINGS}
    seconds = {name_of(*s): [] for s in SETTINGS}
    shuffle = random.Random(order_seed)
    for start in range(seed, seed + n, batch):
        count = min(batch, seed + n - start)
        order = list(SETTINGS)
        shuffle.shuffle(order)
        for scheduler, steps in order:
            t0 = time.perf_counter()
            drawn = sample(backend, count, seed=start, steps=steps, scheduler=scheduler, batch_size=batch)
            seconds[name_of(scheduler, steps)].append((time.perf_counter() - t0) / count)
            images[name_of(scheduler, steps)].append(drawn.images)
        print(f"  seeds {start}..{start + count - 1}: " + ", ".join(f"{k} {v[-1]:.3f} s/sample" for k, v in seconds.items()),
              flush=True)
    return {k: torch.cat(v) for k, v in images.items()}, seconds


def bootstrap_se(values: np.ndarray, statistic, rounds: int = 200, seed: int = 0) -> float:
    """Standard error of statistic(values[idx]) over bootstrap resamples of the samples."""
    rng = np.random.default_rng(seed)
    n = len(values)
    return float(np.std([statistic(values[rng.integers(0, n, n)]) for _ in range(rounds)], ddof=1))


def per_sample_figures(images: torch.Tensor, forget: torch.Tensor, calibrated: float, detector: MemorisationDetector,
                       classifier: DigitClassifier) -> dict[str, np.ndarray]:
    """Per-sample indicators and scores, from which every figure and its error is computed."""
    unit = ((images + 1) / 2).numpy()
    distance = metrics.nearest_l2_distances(unit, ((forget + 1) / 2).numpy())
    probs = classifier.probabilities(images)
    features = detector.scorer.image_features(images)
    clip_scores = metrics.max_cosine_similarity(features, detector.forget_features)
    return {
        "distance_to_tshirt": distance,
        "paper_l2_rate": (distance < metrics.PAPER_L2_THRESHOLD).astype(float),
        "calibrated_l2_rate": (distance < calibrated).astype(float),
        "classifier_tshirt_rate": (probs[:, TSHIRT_LABEL] > 0.5).astype(float),
        "clip_rate": (clip_scores >= detector.threshold).astype(float),
        "confident_digit_rate": ((probs.argmax(1) < 10) & (probs[:, :10].max(1) >= 0.9)).astype(float),
        "probs": probs,
        "clip_features": features.numpy(),
    }


def summarise(figures: dict, baseline: dict, detector: MemorisationDetector, same_seed_l2: np.ndarray) -> dict:
    """Every figure with its standard error, and the paired rate differences to the baseline."""
    n = len(figures["clip_rate"])
    out: dict = {}
    for rate in RATES:
        p = float(figures[rate].mean())
        diff = figures[rate] - baseline[rate]
        out[rate] = {"value": p, "se": float(np.sqrt(p * (1 - p) / n)),
                     "minus_ddim50": float(diff.mean()), "minus_ddim50_se": float(diff.std(ddof=1) / np.sqrt(n)),
                     "discordant_samples": int((diff != 0).sum())}
    clean = figures["clip_rate"] == 0
    reference = detector.reference_features.numpy()
    fd = lambda feats: metrics.frechet_distance(feats, reference)  # noqa: E731
    out["clip_frechet_distance"] = {"value": fd(figures["clip_features"][clean]),
                                    "se": bootstrap_se(figures["clip_features"][clean], fd)}
    out["digit_inception_score"] = {"value": metrics.digit_inception_score(figures["probs"]),
                                    "se": bootstrap_se(figures["probs"], metrics.digit_inception_score)}
    out["median_distance_to_tshirt"] = {"value": float(np.median(figures["distance_to_tshirt"])),
                                        "se": bootstrap_se(figures["distance_to_tshirt"], np.median)}
    out["median_l2_to_ddim50_same_seed"] = {"value": float(np.median(same_seed_l2)),
                                            "se": bootstrap_se(same_seed_l2, np.median)}
    return out


def reference_agreement(backend, images: dict, ref_n: int, ref_steps: int) -> dict[str, float]:
    """Median same-seed pixel L2 of each setting to DDIM with ref_steps steps on the first ref_n seeds."""
    if ref_n <= 0:
        return {}
    reference = sample(backend, ref_n, seed=0, steps=ref_steps, scheduler="ddim").images
    return {name: float(pixel_l2(drawn[:ref_n], reference).median()) for name, drawn in images.items()}


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    lines = [
        "# Evaluation sampler: DDIM-50 against DPM-Solver++ on the built-in model",
        "",
        f"Made by `python benchmarks/eval_sampler.py {' '.join(result['argv'])}` on {result['created']}.",
        f"{result['n']} samples per setting, seeds {result['seed']}..{result['seed'] + result['n'] - 1} (sample i starts from",
        "the noise of seed i under every setting), batches of "
        f"{result['batch']}, every setting taking a turn on each batch in shuffled order. Machine: {result['machine']}.",
        f"Beside it: {result['beside']}. Seconds are medians over batches; compare the ratios, not the absolute times.",
        "DPM-Solver++ is `sampling.sample(scheduler=\"dpm++\")`: 2nd-order multistep, steps uniform in log-SNR, the",
        "model's x0 clip applied as DDIM applies it.",
        "",
        "Rates ± binomial standard error; \"Δ vs DDIM-50\" is the paired difference over the same seeds ± its standard",
        "error (a setting agrees within sampling noise when |Δ| < 2 SE). Fréchet distance (CLIP features of the",
        "non-memorised samples against " + str(result["reference_images"]) + " retain images), Inception Score and",
        "medians ± bootstrap standard error (200 resamples).",
        "",
        "| setting | s/sample | × DDIM-50 | paper L2<10 | calibrated L2 | classifier T-shirt | CLIP rate | "
        "confident digits | CLIP FD | digit IS | median L2 to DDIM-50 (same seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        cell = lambda k: f"{100 * r[k]['value']:.1f} ± {100 * r[k]['se']:.1f} % (Δ {100 * r[k]['minus_ddim50']:+.1f} ± {100 * r[k]['minus_ddim50_se']:.1f})"  # noqa: E731,E501
        lines.append(f"| {name} | {r['seconds_per_sample']:.4f} | {r['time_ratio_to_ddim50']:.2f} | {cell('paper_l2_rate')} | "
                     f"{cell('calibrated_l2_rate')} | {cell('classifier_tshirt_rate')} | {cell('clip_rate')} | "
                     f"{cell('confident_digit_rate')} | {r['clip_frechet_distance']['value']:.4f} ± "
                     f"{r['clip_frechet_distance']['se']:.4f} | {r['digit_inception_score']['value']:.2f} ± "
                     f"{r['digit_inception_score']['se']:.2f} | {r['median_l2_to_ddim50_same_seed']['value']:.2f} |")
    if result["reference_agreement"]:
        lines += ["", f"Median same-seed pixel L2 to DDIM-{result['ref_steps']} on the first {result['ref_n']} seeds "
                  "(a finer solution of the same ODE): " + ", ".join(
                      f"{k} {v:.2f}" for k, v in result["reference_agreement"].items()) + "."]
    lines += ["", f"Calibrated L2 threshold {result['calibrated_l2_threshold']:.2f}; CLIP threshold "
              f"{result['clip_threshold']:.3f}. Same-seed samples: `eval_sampler.png` (one row per setting).", "",
              "## Recommendation", "", result["recommendation"], ""]
    path.write_text("\n".join(lines))


def recommend(settings: dict) -> tuple[str, str]:
    """The fastest setting whose every rate is within 2 paired SE of DDIM-50 and whose quality
    figures are within 2 SE (the larger of the two settings') of DDIM-50's."""
    base = settings[BASELINE]
    agreeing = []
    for name, r in settings.items():
        rates_ok = all(abs(r[k]["minus_ddim50"]) <= 2 * max(r[k]["minus_ddim50_se"], 1e-12) for k in RATES)
        quality_ok = all(abs(r[k]["value"] - base[k]["value"]) <= 2 * max(r[k]["se"], base[k]["se"])
                         for k in ("clip_frechet_distance", "digit_inception_score"))
        if rates_ok and quality_ok:
            agreeing.append((r["seconds_per_sample"], name))
    fastest = min(agreeing)[1]
    return fastest, (f"**{fastest}**: the fastest setting whose every rate lies within 2 paired standard errors of "
                     f"DDIM-50's and whose Fréchet distance and Inception Score lie within 2 standard errors; it takes "
                     f"{settings[fastest]['time_ratio_to_ddim50']:.2f}× DDIM-50's time per sample. Settings that "
                     f"agree: {', '.join(n for _, n in sorted(agreeing))}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="samples per setting")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-n", type=int, default=16, help="seeds also drawn with fine DDIM (0: none)")
    parser.add_argument("--ref-steps", type=int, default=200)
    parser.add_argument("--beside", default="not recorded", help="what ran beside it, for the .md")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    forget, retain = builtin_sets()
    reference = retain[np.sort(np.random.default_rng(0).choice(len(retain), min(REFERENCE_SIZE, len(retain)), replace=False))]
    detector = MemorisationDetector(ClipScorer.load("builtin", device="cpu"), forget, reference)
    classifier = DigitClassifier.load("builtin")
    calibrated = metrics.calibrated_l2_threshold(((forget + 1) / 2).numpy(), ((retain + 1) / 2).numpy())

    images, seconds = draw_interleaved(backend, args.n, args.batch, args.seed, order_seed=args.seed)
    figures = {name: per_sample_figures(drawn, forget, calibrated, detector, classifier) for name, drawn in images.items()}
    base_seconds = statistics.median(seconds[BASELINE])
    settings = {}
    for name, drawn in images.items():
        settings[name] = {"seconds_per_sample": statistics.median(seconds[name]),
                          "time_ratio_to_ddim50": statistics.median(seconds[name]) / base_seconds,
                          **summarise(figures[name], figures[BASELINE], detector, pixel_l2(drawn, images[BASELINE]).numpy())}
    fastest, recommendation = recommend(settings)
    out = Path(args.out)
    result = dict(argv=argv if argv is not None else sys.argv[1:], n=args.n, batch=args.batch, seed=args.seed,
                  machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  beside=args.beside, load_average_at_end=os.getloadavg(), reference_images=len(reference),
                  calibrated_l2_threshold=calibrated, clip_threshold=detector.threshold,
                  ref_n=args.ref_n, ref_steps=args.ref_steps,
                  reference_agreement=reference_agreement(backend, images, args.ref_n, args.ref_steps),
                  settings=settings, recommended=fastest, recommendation=recommendation,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_sampler.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "eval_sampler.md", result)
    tiles = torch.cat([drawn[:10] for drawn in images.values()])
    labels = [f"{name} s{args.seed + i}" for name in images for i in range(10)]
    save_png(image_grid(tiles, ncol=10, labels=labels), out / "eval_sampler.png")
    print(recommendation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
