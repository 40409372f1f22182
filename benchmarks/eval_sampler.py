"""Which sampler can evaluate an unlearning run: DDIM-50 against DPM-Solver++ at 10-25 steps, and bf16.

    python benchmarks/eval_sampler.py                    # 128 samples per setting, seeds 0..127
    python benchmarks/eval_sampler.py --n 512 --batch 64

Every setting draws the same seeds (sample i starts from the noise of seed i) from the built-in
model. Timing: the samples are drawn one batch at a time, every setting takes a turn on each batch
in a shuffled order, and seconds per sample are the median over batches, so background load hits
every setting alike; the figure that matters is the ratio to DDIM-50 measured that way.

Each setting's samples are measured by the one evaluation, `retrack.evaluation.evaluate_samples`
with the built-in reference: the T-shirt rates (pixel L2 below the reference's threshold, the
classifier, CLIP) and quality (the classifier's confident-digit rate, digit Inception Score and
Fréchet distance of its features; the CLIP Fréchet distance). Errors: binomial for rates; for each
rate the paired difference to DDIM-50 over the same seeds with its standard error (far less noisy
than the rates); bootstrap over samples for the classifier quality figures. Per-sample agreement:
median pixel L2 between same-seed samples of the setting and of DDIM-50 (and, on the first
--ref-n seeds, of DDIM with --ref-steps steps, a finer solution of the same ODE). Writes
eval_sampler.json, eval_sampler.md and eval_sampler.png (same-seed samples, one row per setting)
into --out.
"""

from __future__ import annotations

import argparse
import os
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
from retrack.builtin import builtin_reference  # noqa: E402
from retrack.evaluation import Evaluation, evaluate_samples  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)
from retrack.grids import image_grid, save_png  # noqa: E402
from retrack.sampling import Samples, pixel_l2, sample  # noqa: E402

# (sampler, steps, precision of the network call)
SETTINGS = (("ddim", 50, "fp32"), ("ddim", 50, "bf16"), ("ddim", 25, "fp32"), ("dpm++", 10, "fp32"),
            ("dpm++", 15, "fp32"), ("dpm++", 20, "fp32"), ("dpm++", 25, "fp32"), ("dpm++", 15, "bf16"))
BASELINE = "ddim-50"


def name_of(scheduler: str, steps: int, precision: str) -> str:
    return f"{scheduler}-{steps}" + ("" if precision == "fp32" else f" {precision}")


def draw_interleaved(backend, n: int, batch: int, seed: int, order_seed: int) -> tuple[dict, dict]:
    """Images (N, 1, 28, 28) per setting and the seconds each batch took, settings interleaved."""
    images = {name_of(*s): [] for s in SETTINGS}
    seconds = {name_of(*s): [] for s in SETTINGS}
    shuffle = random.Random(order_seed)
    for start in range(seed, seed + n, batch):
        count = min(batch, seed + n - start)
        order = list(SETTINGS)
        shuffle.shuffle(order)
        for setting in order:
            scheduler, steps, precision = setting
            t0 = time.perf_counter()
            drawn = sample(backend, count, seed=start, steps=steps, scheduler=scheduler, batch_size=batch,
                           precision=precision)
            seconds[name_of(*setting)].append((time.perf_counter() - t0) / count)
            images[name_of(*setting)].append(drawn.images)
        print(f"  seeds {start}..{start + count - 1}: " + ", ".join(f"{k} {v[-1]:.3f} s/sample" for k, v in seconds.items()),
              flush=True)
    return {k: torch.cat(v) for k, v in images.items()}, seconds


def bootstrap_se(values: np.ndarray, statistic, rounds: int = 200, seed: int = 0) -> float:
    """Standard error of statistic(values[idx]) over bootstrap resamples of the samples."""
    rng = np.random.default_rng(seed)
    n = len(values)
    return float(np.std([statistic(values[rng.integers(0, n, n)]) for _ in range(rounds)], ddof=1))


def summarise(result: Evaluation, baseline: Evaluation, same_seed_l2: np.ndarray) -> dict:
    """Every rate with its binomial SE and paired difference to the baseline; every quality figure,
    the classifier's with a bootstrap SE (over the same samples the evaluation used)."""
    copies, base_copies = result.copies(), baseline.copies()
    n = result.n
    out: dict = {"rates": {}, "quality": {}}
    for name, flags in copies.items():
        p, diff = float(flags.mean()), flags.astype(float) - base_copies[name].astype(float)
        out["rates"][name] = {"value": p, "se": float(np.sqrt(p * (1 - p) / n)), "minus_ddim50": float(diff.mean()),
                              "minus_ddim50_se": float(diff.std(ddof=1) / np.sqrt(n)),
                              "discordant_samples": int((diff != 0).sum())}
    classifier = result.reference.classifier
    probs = classifier.probabilities(result.samples.images)
    clean = ~copies["l2"]  # quality is read on the non-copies, as `evaluation.quality_of` does
    features = classifier.features(result.samples.images[torch.from_numpy(clean)])
    retain_features = result.reference.retain_classifier_features
    errors = {"classifier_fd": bootstrap_se(features, lambda f: metrics.frechet_distance(f, retain_features)),
              "digit_inception_score": bootstrap_se(probs[clean], metrics.digit_inception_score),
              "confident_digit_rate": bootstrap_se(probs, metrics.confident_digit_rate)}
    for name, value in result.quality_figures.items():
        out["quality"][name] = {"value": value, "se": errors.get(name)}
    out["median_distance_to_tshirt"] = {"value": float(np.median(result.l2)), "se": bootstrap_se(result.l2, np.median)}
    out["median_l2_to_ddim50_same_seed"] = {"value": float(np.median(same_seed_l2))}
    return out


def reference_agreement(backend, images: dict, ref_n: int, ref_steps: int) -> dict[str, float]:
    """Median same-seed pixel L2 of each setting to DDIM with ref_steps steps on the first ref_n seeds."""
    if ref_n <= 0:
        return {}
    reference = sample(backend, ref_n, seed=0, steps=ref_steps, scheduler="ddim").images
    return {name: float(pixel_l2(drawn[:ref_n], reference).median()) for name, drawn in images.items()}


def markdown(result: dict) -> str:
    s = result["settings"]
    rates = list(s[BASELINE]["rates"])
    quality = list(s[BASELINE]["quality"])
    lines = [
        "# Evaluation sampler: DDIM-50 against DPM-Solver++ on the built-in model",
        "",
        describe_run(result),
        f"{result['n']} samples per setting, seeds {result['seed']}..{result['seed'] + result['n'] - 1} (sample i starts from",
        "the noise of seed i under every setting), batches of "
        f"{result['batch']}, every setting taking a turn on each batch in shuffled order.",
        "Seconds are medians over batches; compare the ratios, not the absolute times.",
        "DPM-Solver++ is `sampling.sample(scheduler=\"dpm++\")`: 2nd-order multistep, steps uniform in log-SNR, the",
        "model's x0 clip applied as DDIM applies it. Every figure comes from `retrack.evaluation.evaluate_samples` with",
        f"the built-in reference (thresholds: {result['thresholds']}).",
        "",
        "T-shirt rates ± binomial standard error, and in brackets the paired difference to DDIM-50 over the same seeds",
        "± its standard error (a rate agrees within sampling noise when |Δ| ≤ 2 SE). Quality ± bootstrap standard",
        "error (200 resamples of the samples).",
        "",
        "| setting | s/sample | × DDIM-50 | " + " | ".join(f"{r} T-shirt rate" for r in rates) + " | "
        + " | ".join(quality) + " | median L2 to DDIM-50 (same seed) |",
        "|---|---|---|" + "---|" * (len(rates) + len(quality) + 1),
    ]
    for name, r in s.items():
        rate_cells = [f"{100 * v['value']:.1f} ± {100 * v['se']:.1f} % (Δ {100 * v['minus_ddim50']:+.1f} ± "
                      f"{100 * v['minus_ddim50_se']:.1f})" for v in r["rates"].values()]
        quality_cells = [_number(v["value"]) + ("" if v["se"] is None else f" ± {_number(v['se'])}")
                         for v in r["quality"].values()]
        lines.append(f"| {name} | {r['seconds_per_sample']:.4f} | {r['time_ratio_to_ddim50']:.2f} | "
                     + " | ".join(rate_cells + quality_cells) + f" | {r['median_l2_to_ddim50_same_seed']['value']:.2f} |")
    if result["reference_agreement"]:
        lines += ["", f"Median same-seed pixel L2 to DDIM-{result['ref_steps']} on the first {result['ref_n']} seeds "
                  "(a finer solution of the same ODE): " + ", ".join(
                      f"{k} {v:.2f}" for k, v in result["reference_agreement"].items()) + "."]
    lines += ["", "Same-seed samples: `eval_sampler.png` (one row per setting).", "",
              "## Recommendation", "", result["recommendation"], ""]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def recommend(settings: dict) -> tuple[str, str]:
    """The fastest setting whose every rate is within 2 paired SE of DDIM-50 and whose classifier
    quality figures (those with an SE) are within 2 SE (both settings' combined) of DDIM-50's."""
    base = settings[BASELINE]
    agreeing = []
    for name, r in settings.items():
        rates_ok = all(abs(v["minus_ddim50"]) <= 2 * max(v["minus_ddim50_se"], 1e-12) for v in r["rates"].values())
        quality_ok = all(abs(v["value"] - base["quality"][k]["value"]) <= 2 * np.hypot(v["se"], base["quality"][k]["se"])
                         for k, v in r["quality"].items() if v["se"] is not None and v["value"] is not None)
        if rates_ok and quality_ok:
            agreeing.append((r["seconds_per_sample"], name))
    fastest = min(agreeing)[1]
    return fastest, (f"**{fastest}**: the fastest setting whose every T-shirt rate lies within 2 paired standard errors "
                     f"of DDIM-50's and whose classifier quality figures lie within 2 standard errors; it takes "
                     f"{settings[fastest]['time_ratio_to_ddim50']:.2f}× DDIM-50's time per sample. Settings that "
                     f"agree: {', '.join(n for _, n in sorted(agreeing))}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="samples per setting")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-n", type=int, default=16, help="seeds also drawn with fine DDIM (0: none)")
    parser.add_argument("--ref-steps", type=int, default=200)
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    reference = builtin_reference("cpu")

    images, seconds = draw_interleaved(backend, args.n, args.batch, args.seed, order_seed=args.seed)
    seeds = list(range(args.seed, args.seed + args.n))
    results = {name: evaluate_samples(Samples(drawn, seeds), reference) for name, drawn in images.items()}
    base_seconds = statistics.median(seconds[BASELINE])
    settings = {}
    for name, drawn in images.items():
        settings[name] = {"seconds_per_sample": statistics.median(seconds[name]),
                          "time_ratio_to_ddim50": statistics.median(seconds[name]) / base_seconds,
                          **summarise(results[name], results[BASELINE], pixel_l2(drawn, images[BASELINE]).numpy())}
    fastest, recommendation = recommend(settings)
    out = Path(args.out)
    result = dict(n=args.n, batch=args.batch, seed=args.seed, thresholds=reference.thresholds(),
                  ref_n=args.ref_n, ref_steps=args.ref_steps,
                  reference_agreement=reference_agreement(backend, images, args.ref_n, args.ref_steps),
                  settings=settings, recommended=fastest, recommendation=recommendation, **record.finish())
    write_json_and_markdown(out / "eval_sampler.json", result, markdown(result))
    tiles = torch.cat([drawn[:10] for drawn in images.values()])
    labels = [f"{name} s{args.seed + i}" for name in images for i in range(10)]
    save_png(image_grid(tiles, ncol=10, labels=labels), out / "eval_sampler.png")
    print(recommendation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
