"""Is the DDIM effect on the built-in model a property of the deterministic ODE or of 50 steps?
And may the paper's ancestral sampler run its network in bf16?

    python benchmarks/sampler_study.py --part steps     # DDIM and DDPM at 50 / 250 / 1,000 steps, 200 samples
    python benchmarks/sampler_study.py --part bf16      # ancestral DDPM-50 in fp32 and bf16, 1,000 same seeds

Both parts use the pretrained built-in model and the model the published ReTrack run leaves
(preset "mnist": 50 steps, batch 128, seed 0, trained here first), the same seeds for every cell,
measured by the one evaluation (`retrack.evaluation.evaluate`; T-shirt = pixel L2 < 10 in [0, 1],
and the project's classifier).

Part "steps": each model under DDIM (deterministic, eta 0) and ancestral DDPM (diffusers'
DDPMScheduler, fresh noise every step: the paper's sampler) at 50, 250 and 1,000 steps. DDIM with
more steps solves the probability-flow ODE more exactly; DDPM with more steps approaches the
reverse SDE. If the DDIM rate keeps rising toward the ODE's limit, the effect belongs to the ODE,
not to a coarse discretisation. Writes a grid of each cell's 16 samples nearest the T-shirt.

Part "bf16": the tolerance stated before adopting bf16 for DDIM (benchmarks/results/eval_sampler.md):
the bf16 rate within one binomial standard error of the fp32 rate on the same seeds. Here the
same check for the ancestral sampler, with the paired difference and its standard error, and the
seconds per sample of both on this machine (a ratio: they run one after the other in one process).

Writes sampler_study-<part>.json, .md and -nearest.png into --out. Each cell (and the trained
ReTrack network) is kept in --out/sampler_study-parts/ as it is finished, so a stopped run started
again with the same arguments resumes at the first cell it had not finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_reference, builtin_sets  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.evaluation import SamplerSettings, evaluate  # noqa: E402
from retrack.grids import save_nearest_rows  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, resumable, script_command, write_json_and_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results"


def models(parts: Path) -> dict:
    """The pretrained built-in model and the published ReTrack run's model (trained once, kept in `parts`)."""
    def published_retrack() -> dict:
        forget, retain = builtin_sets()
        backend = load_backend(BUILTIN_MODEL, device="cpu")
        unlearn(backend, forget, retain, UnlearnConfig.preset("mnist", method="retrack", seed=0, device="cpu"))
        return backend.unet.state_dict()

    retrack = load_backend(BUILTIN_MODEL, device="cpu")
    retrack.unet.load_state_dict(resumable(parts / "retrack-published-unet.pt", published_retrack))
    return {"pretrained": load_backend(BUILTIN_MODEL, device="cpu"), "retrack": retrack}


def cell(result, seconds: float) -> dict:
    """One model under one sampler: T-shirt rates with counts and 95 % intervals, seconds per sample."""
    return dict(sampler=result.sampler, samples=result.n, rates=result.rates(), counts=result.counts(),
                intervals={k: list(bounds) for k, bounds in result.intervals().items()},
                seconds_per_sample=round(seconds / result.n, 4))


def steps_part(backends: dict, reference, n: int, steps: list[int], parts: Path,
               samplers: list[str]) -> tuple[list[dict], list]:
    rows, nearest = [], []
    for name, backend in backends.items():
        for sampler in samplers:
            for count in steps:
                def measure() -> tuple[dict, tuple]:
                    t0 = time.perf_counter()
                    result = evaluate(backend, SamplerSettings(n_samples=n, sampler=sampler, steps=count), reference)
                    return dict(model=name, **cell(result, time.perf_counter() - t0)), result.nearest(16)

                row, near = resumable(parts / f"{name}-{sampler}-{count}-n{n}.pt", measure)
                rows.append(row)
                nearest.append((f"{name[:4]} {sampler}-{count}", near))
                print(f"{name}, {row['sampler']}: {row['rates']} ({row['seconds_per_sample']} s/sample)", flush=True)
    return rows, nearest


def bf16_part(backends: dict, reference, n: int) -> tuple[list[dict], list]:
    rows, nearest = [], []
    for name, backend in backends.items():
        drawn = {}
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            drawn[precision] = evaluate(backend, SamplerSettings(n_samples=n, precision=precision), reference)
            rows.append(dict(model=name, precision=precision, **cell(drawn[precision], time.perf_counter() - t0)))
            nearest.append((f"{name[:4]} {precision}", drawn[precision].nearest(16)))
            print(f"{name}, {drawn[precision].sampler}: {rows[-1]['rates']}", flush=True)
        for measure, fp32 in drawn["fp32"].copies().items():
            bf16 = drawn["bf16"].copies()[measure]
            difference = bf16.astype(float) - fp32.astype(float)  # paired over the same seeds
            rate = fp32.mean()
            rows[-1].setdefault("against_fp32", {})[measure] = dict(
                difference=float(difference.mean()), paired_se=float(difference.std(ddof=1) / np.sqrt(n)),
                binomial_se_of_fp32=float(np.sqrt(rate * (1 - rate) / n)),
                within_one_binomial_se=bool(abs(difference.mean()) <= np.sqrt(rate * (1 - rate) / n)),
                samples_that_change=int((difference != 0).sum()))
    return rows, nearest


def markdown(data: dict) -> str:
    lines = [f"Built-in model, pretrained and after the published ReTrack run. {describe_run(data)}", "",
             "| model | sampler | T-shirt rate, L2 < 10 (count; 95 % CI) | classifier rate | s/sample |",
             "|---|---|---|---|---|"]
    for row in data["rows"]:
        low, high = row["intervals"]["l2"]
        lines.append(f"| {row['model']} | {row['sampler']} | {row['rates']['l2']:.1%} ({row['counts']['l2']}/"
                     f"{row['samples']}; {low:.1%}–{high:.1%}) | {row['rates'].get('classifier', float('nan')):.1%} | "
                     f"{row['seconds_per_sample']} |")
    checks = [row for row in data["rows"] if "against_fp32" in row]
    if checks:
        lines += ["", "bf16 against fp32 on the same seeds (paired difference ± its standard error; tolerance: "
                  "within one binomial standard error of the fp32 rate):", ""]
        for row in checks:
            for measure, c in row["against_fp32"].items():
                lines.append(f"- {row['model']}, {measure}: {c['difference']:+.2%} ± {c['paired_se']:.2%} "
                             f"({c['samples_that_change']} samples change; one binomial SE {c['binomial_se_of_fp32']:.2%}: "
                             f"{'within' if c['within_one_binomial_se'] else 'OUTSIDE'})")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("steps", "bf16"), required=True)
    parser.add_argument("--n", type=int, help="samples per cell (default: steps 200, bf16 1000)")
    parser.add_argument("--steps", default="50,250,1000", help="part steps: step counts")
    parser.add_argument("--models", default="pretrained,retrack", help="part steps: which models, in this order")
    parser.add_argument("--samplers", default="ddim,ddpm",
                        help="part steps: which samplers. Processes given different models or samplers share the "
                             "work through the kept cells; a last run with all of them writes the table")
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    reference = builtin_reference("cpu")
    parts = out / "sampler_study-parts"
    loaded = models(parts)
    backends = {name: loaded[name] for name in args.models.split(",")}
    if args.part == "steps":
        rows, nearest = steps_part(backends, reference, args.n or 200, [int(v) for v in args.steps.split(",")], parts,
                                   args.samplers.split(","))
    else:
        rows, nearest = bf16_part(backends, reference, args.n or 1000)
    data = dict(rows=rows, **record.finish())
    stem = out / f"sampler_study-{args.part}"
    write_json_and_markdown(f"{stem}.json", data, markdown(data))
    save_nearest_rows(nearest, Path(f"{stem}-nearest.png"))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
