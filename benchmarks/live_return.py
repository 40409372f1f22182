"""The live curve's two signals on the app's default ReTrack run, with their costs side by side.

    OMP_NUM_THREADS=1 python benchmarks/live_return.py

The app's default job (`AppSettings.run_defaults`: the published ReTrack settings, 50 steps of 128
rows; the T-shirt picked) trained with the library's `unlearn`. At every live point (step 0, then
every 10 steps and the last), on the model as it is then, it times
- the sample-based live point the app drew until now: the 32 live seeds with the evaluation's
  sampler (ancestral DDPM-50) and `evaluate_samples` (pixel L2 and CLIP, as the app's job), and
- the noise-and-denoise return (`evaluation.noise_and_denoise_return`): the T-shirt noised to
  t = 240 and 500 with 16 fixed seeds, denoised by deterministic DDIM; how many of the 16 come
  back within the copy threshold (L2 < 10), and their mean distance,
and prints both signals. The oracle's return is measured once. Writes
benchmarks/results/live_return.json and live_return.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from app_cost import job_settings  # noqa: E402  (this folder: the app's default job)
from retrack.backends import load_backend  # noqa: E402
from retrack.engine import unlearn  # noqa: E402
from retrack.evaluation import (  # noqa: E402
    OracleLevels, draw, evaluate_samples, noise_and_denoise_return,
)
from retrack.forget_set import build_forget_set, default_picks, parse_picks  # noqa: E402
from retrack.images import uint8_to_tensor  # noqa: E402
from retrack.jobs import reference_for  # noqa: E402
from retrack.models import open_model, oracle_folder  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(work):
    """(work(), its wall seconds)."""
    started = time.perf_counter()
    value = work()
    return value, round(time.perf_counter() - started, 2)


def in_words(returns) -> str:
    return ", ".join(f"t={r.t}: {r.returned}/{r.copies} back, mean L2 {r.distance:.2f}" for r in returns.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_beside_argument(parser)
    args = parser.parse_args(argv)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    config, evaluation = job_settings(quick=False)  # the page's defaults: 16 noisy copies per image
    model = open_model(str(BUILTIN_MODEL))
    forget = build_forget_set(model, parse_picks(default_picks(model)))
    reference = reference_for(model, forget)
    images = uint8_to_tensor(forget.images, channels_last=True)
    live_settings = evaluation.live_sampler_settings()

    def returns_of(backend):
        return noise_and_denoise_return(backend, images, reference.l2_threshold, copies=evaluation.live_return_copies)

    oracle = load_backend(oracle_folder(BUILTIN_MODEL), device="cpu")
    oracle_levels = OracleLevels.from_evaluation(evaluate_samples(draw(oracle, live_settings), reference))
    oracle_return, oracle_seconds = timed(lambda: returns_of(oracle))
    print("oracle: " + in_words(oracle_return), flush=True)
    data = {"settings": {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
                         "live_every": evaluation.live_every, "live_samples": evaluation.live_samples,
                         "live_sampler": live_settings.describe("cpu"), "copies": evaluation.live_return_copies,
                         "l2_threshold": reference.l2_threshold},
            "oracle": {"return": [vars(r) for r in oracle_return.values()], "seconds": oracle_seconds},
            "points": []}
    backend = load_backend(BUILTIN_MODEL, device="cpu")

    def live_point(step: int) -> None:
        """Both live signals of the model as it is now, each timed."""
        samples, sample_seconds = timed(lambda: evaluate_samples(draw(backend, live_settings), reference,
                                                                 oracle_levels))
        returns, return_seconds = timed(lambda: returns_of(backend))
        data["points"].append({"step": step, "rates": samples.rates(), "excess": samples.excess(),
                               "return": [vars(r) for r in returns.values()],
                               "seconds": {"live samples": sample_seconds, "noise and denoise": return_seconds}})
        print(f"step {step:3d}: samples {samples.counts()} of {samples.n} ({sample_seconds:.1f} s); return "
              f"{in_words(returns)} ({return_seconds:.1f} s)", flush=True)

    live_point(0)
    forget_x0 = backend.encode(images)
    retain_x0 = backend.encode(uint8_to_tensor(model.training_data.images[forget.retain_index], channels_last=True))
    due = lambda event: evaluation.live_at(event.step, event.steps)  # noqa: E731
    result = unlearn(backend, forget_x0, retain_x0, config,
                     on_step=lambda event: live_point(event.step) if due(event) else None)
    data = {**record.finish(), "training_seconds": round(result.seconds, 1), **data}
    write_json_and_markdown(args.out / "live_return.json", data, table(data))
    print(table(data))
    return data


def table(data: dict) -> str:
    """Per live point: the sample-based rates, the return at each t, and both costs."""
    s = data["settings"]
    ts = [r["t"] for r in data["oracle"]["return"]]

    def back(r: dict) -> str:
        return f"{r['returned']}/{r['copies']}, L2 {r['distance']:.2f}"

    lines = [f"Live curve signals on the app's default ReTrack run ({s['steps']} steps of {s['batch_size']} rows, "
             f"lr {s['lr']}, T-shirt picked). {describe_run(data)} Live samples: {s['live_samples']} seeds, "
             f"{s['live_sampler']}, measured as the app's live curve does. Noise and denoise: the T-shirt noised to "
             f"t with {s['copies']} fixed seeds, deterministic DDIM back; how many come back within L2 < "
             f"{s['l2_threshold']:g} of it, and their mean L2.", "",
             "| step | live samples: copy rates | " + " | ".join(f"return t={t}" for t in ts)
             + " | seconds: live samples | seconds: noise and denoise |",
             "|---" * (4 + len(ts)) + "|"]
    for point in data["points"]:
        copies = ", ".join(f"{name} {rate:.0%}" for name, rate in point["rates"].items())
        lines.append(f"| {point['step']} | {copies}"
                     + " | " + " | ".join(back(r) for r in point["return"])
                     + f" | {point['seconds']['live samples']:.1f} | {point['seconds']['noise and denoise']:.1f} |")
    lines.append("| oracle | | " + " | ".join(back(r) for r in data["oracle"]["return"])
                 + f" | | {data['oracle']['seconds']:.1f} (once per job) |")
    first, last = data["points"][0]["return"], data["points"][-1]["return"]
    lines += ["", "From the first live point to the last: " + "; ".join(
        f"t={start['t']}: {start['returned']} → {end['returned']} of {start['copies']} back "
        f"(the oracle: {o['returned']}), mean L2 "
        f"{start['distance']:.2f} → {end['distance']:.2f} (the oracle: {o['distance']:.2f})"
        for start, end, o in zip(first, last, data["oracle"]["return"])) + "."]
    samples = [p["seconds"]["live samples"] for p in data["points"]]
    returns = [p["seconds"]["noise and denoise"] for p in data["points"]]
    lines += ["", f"Median cost per live point: live samples {statistics.median(samples):.1f} s, noise and denoise "
                  f"{statistics.median(returns):.1f} s ({statistics.median(returns) / statistics.median(samples):.0%} "
                  f"of it); training {data['training_seconds']} s including both."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
