"""The published ReTrack run on the built-in model, before and after the CPU speed options.

    python benchmarks/published_run.py                   # 1,000 samples per evaluation
    python benchmarks/published_run.py --samples 256

"Before" is the run as it was: training in float32 (`mixed_precision="no"`), then the benchmark's
evaluation of the result (1,000 samples, DDIM 50 steps, float32). "After" is what was adopted: the
same training, sampling with bf16 autocast (`SamplerSettings(precision="bf16")`). A third row also
trains with bf16 autocast (`mixed_precision="bf16"`), the other option benchmarks/results/cpu_speed.md
found faster on a CPU with AVX512-BF16.

In one process: the ReTrack run (k-NN search and 50 steps of batch 128 per branch, preset "mnist",
seed 0) in the order fp32, bf16, bf16, fp32, so drift in the machine's speed hits both alike; the
two runs of one precision give the same weights (same seed), the first of each is evaluated. Then
the same 1,000 seeds are drawn from the fp32-trained model in fp32 and in bf16, and from the
bf16-trained model in bf16, each measured by `retrack.evaluation`; rates are compared sample by
sample (paired differences over the same seeds, with their standard errors). The tolerance for
"results unchanged" is the one benchmarks/results/eval_sampler.md states: every T-shirt rate within
one binomial standard error of the fp32 rate.

Writes published_run.json and published_run.md into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_reference, builtin_sets  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.evaluation import Evaluation, SamplerSettings, evaluate  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.presets import PRESETS  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)

ORDER = ("no", "bf16", "bf16", "no")  # training precisions, ABBA
BEFORE, AFTER, ALL_BF16 = ("no", "fp32"), ("no", "bf16"), ("bf16", "bf16")  # (training, sampling) precision


def train(precision: str, steps: int):
    """The published ReTrack run from the built-in model; returns the model and its seconds."""
    forget, retain = builtin_sets()
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    config = UnlearnConfig.preset("mnist", method="retrack", steps=steps, seed=0, device="cpu",
                                  mixed_precision=precision)
    result = unlearn(backend, forget, retain, config)
    return backend, result.seconds


def paired(result: Evaluation, base: Evaluation) -> dict:
    """Per measure: both rates and the paired difference over the same seeds ± its standard error."""
    out = {}
    for name, flags in result.copies().items():
        diff = flags.astype(float) - base.copies()[name].astype(float)
        out[name] = {"rate": float(flags.mean()), "base_rate": float(base.copies()[name].mean()),
                     "difference": float(diff.mean()), "difference_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=PRESETS["mnist"]["steps"], help="the published 50; fewer to try the script")
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    models, train_seconds = {}, {p: [] for p in set(ORDER)}
    for precision in ORDER:
        backend, seconds = train(precision, args.steps)
        models.setdefault(precision, backend)
        train_seconds[precision].append(seconds)
        print(f"trained ({precision}): {seconds:.1f} s", flush=True)
    reference = builtin_reference("cpu")
    evaluations, eval_seconds = {}, {}
    for training, sampling in (BEFORE, AFTER, ALL_BF16):
        started = time.perf_counter()
        evaluations[training, sampling] = evaluate(models[training], SamplerSettings(n_samples=args.samples,
                                                                                     precision=sampling), reference)
        eval_seconds[training, sampling] = time.perf_counter() - started
        print(f"evaluated (training {training}, sampling {sampling}): {eval_seconds[training, sampling]:.1f} s, "
              f"rates {evaluations[training, sampling].rates()}", flush=True)

    def seconds(key: tuple[str, str]) -> float:
        return float(np.mean(train_seconds[key[0]])) + eval_seconds[key]

    base = evaluations[BEFORE]
    result = dict(
        samples=args.samples,
        sampler=SamplerSettings(n_samples=args.samples, precision="fp32").describe() + " (precision per row)",
        training_seconds=train_seconds,
        runs={f"training {t}, sampling {s}": {"training_seconds": float(np.mean(train_seconds[t])),
                                              "evaluation_seconds": eval_seconds[t, s], "total_seconds": seconds((t, s)),
                                              "rates_vs_before": paired(evaluations[t, s], base),
                                              "quality": evaluations[t, s].quality_figures}
              for t, s in evaluations},
        before_seconds=seconds(BEFORE), after_seconds=seconds(AFTER), after_over_before=seconds(AFTER) / seconds(BEFORE),
        **record.finish())
    text = markdown(result)
    write_json_and_markdown(Path(args.out) / "published_run.json", result, text)
    print(text)
    return 0


def markdown(result: dict) -> str:
    lines = ["# The published ReTrack run: wall time and results before and after the CPU speed options", "",
             f"{describe_run(result)} One process; training runs in the "
             f"order {', '.join(ORDER)} (seconds per run: " + "; ".join(
                 f"{p} {', '.join(f'{s:.1f}' for s in v)}" for p, v in result["training_seconds"].items()) + "). "
             f"Evaluation: {result['sampler']} ({result['samples']} samples, the same seeds for every model).", "",
             f"**Before** (fp32 training, fp32 sampling): {result['before_seconds']:.1f} s. **After** (fp32 training, "
             f"bf16 sampling, as adopted): {result['after_seconds']:.1f} s, **{result['after_over_before']:.2f}×**.", "",
             "| training, sampling | training s | evaluation s | total s | "
             + " | ".join(f"{m} T-shirt rate (Δ vs before ± SE)" for m in
                          next(iter(result["runs"].values()))["rates_vs_before"]) + " | classifier_fd |",
             "|---|---|---|---|" + "---|" * (len(next(iter(result["runs"].values()))["rates_vs_before"]) + 1)]
    for name, run in result["runs"].items():
        cells = [f"{100 * v['rate']:.1f} % ({100 * v['difference']:+.1f} ± {100 * v['difference_se']:.1f})"
                 for v in run["rates_vs_before"].values()]
        fd = run["quality"].get("classifier_fd")
        lines.append(f"| {name} | {run['training_seconds']:.1f} | {run['evaluation_seconds']:.1f} | "
                     f"{run['total_seconds']:.1f} | " + " | ".join(cells) + f" | {'n/a' if fd is None else f'{fd:.1f}'} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
