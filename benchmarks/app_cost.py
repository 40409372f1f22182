"""What an app job costs, phase by phase: the `--quick` settings against the defaults.

    python benchmarks/app_cost.py                 # quick and default jobs, each twice
    python benchmarks/app_cost.py --modes quick   # only the quick one (seconds)

Each mode runs a real `retrack.jobs.Job` on the built-in model with the T-shirt picked, exactly as
the page starts it (`AppSettings.run_defaults`, built into `EvalSettings` as `RunForm.evaluation`
does: the published ReTrack settings, 50 steps of 128 rows; 256 samples before/after under the
paper's sampler (DDPM, 50 steps) and the same seeds under DDIM-50 beside it, the first 64 in the
grids; every 10 steps a live point: 32 fixed samples with the evaluation's sampler and 16 noisy
copies of the forget image noised and denoised (`noise_and_denoise_return`); `--quick`: 3 steps of 8
rows, 4 samples with 5 steps, a live point every step on 4 samples with 2 steps and 4 copies).
Each mode runs twice in one process: the first job draws the model's "before" samples and the
oracle's samples (cold caches), the second finds them cached, as every later job of the server
does. A phase's seconds are the wall time between the job's phase changes; "live curve" is the
time the live memorisation curve took inside training (the training seconds reported exclude it).

The machine is shared (the load average at the start and the end and `--beside` are recorded): read
the ratios, e.g. the live curve's share of the training phase, more than the seconds.

Writes benchmarks/results/app_cost.json and app_cost.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.engine import UnlearnConfig  # noqa: E402
from retrack.job_settings import EvalSettings  # noqa: E402
from retrack.forget_set import build_forget_set, default_picks, parse_picks  # noqa: E402
from retrack.jobs import Job  # noqa: E402
from retrack.models import open_model  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)
from ui.run import LIVE_DEFAULTS  # noqa: E402
from ui.settings import AppSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("loading", "before", "training", "saving", "after")


def job_settings(quick: bool) -> tuple[UnlearnConfig, EvalSettings]:
    """The training and evaluation settings the page starts a job with, in this mode."""
    d = AppSettings(quick=quick).run_defaults("mnist")
    config = UnlearnConfig.preset("mnist", method="retrack", steps=d["steps"], batch_size=d["batch_size"],
                                  grad_accum=d["grad_accum"], seed=d["seed"])
    # as RunForm.evaluation builds them: the form's fields, and the server's settings the page does not ask for
    evaluation = EvalSettings(n_samples=d["n_samples"], seed=d["eval_seed"], sampling_steps=d["sampling_steps"],
                              trajectory_points=d["trajectory_points"], **{name: d[name] for name in LIVE_DEFAULTS})
    return config, evaluation


def timed_job(model, forget, config: UnlearnConfig, evaluation: EvalSettings, out: Path) -> dict:
    """Run one job; the wall seconds of each phase, the live curve's seconds and the job's figures."""
    started = time.perf_counter()
    marks: dict[str, float] = {}
    job = Job(model, forget, config, evaluation, out).start()
    for state in job.watch():
        marks.setdefault(state.phase, time.perf_counter() - started)
    if state.phase != "done":
        raise RuntimeError(f"the job ended {state.phase}: {state.message}")
    total = time.perf_counter() - started
    order = [p for p in PHASES if p in marks] + ["done"]
    seconds = {phase: round(marks[following] - marks[phase], 2) for phase, following in zip(order, order[1:])}
    seconds["live curve (inside training)"] = round(state.live_seconds, 2)
    seconds["training without the live curve"] = round(seconds["training"] - state.live_seconds, 2)
    return {"seconds": seconds, "total": round(total, 2), "live_points": len(state.live),
            "before_rate": state.before.clip_rate, "after_rate": state.after.clip_rate,
            "oracle_rate": None if state.oracle is None else state.oracle.clip_rate, "message": state.message}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="quick,default", help="comma-separated: quick, default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_beside_argument(parser)
    args = parser.parse_args(argv)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    model = open_model(str(BUILTIN_MODEL))
    forget = build_forget_set(model, parse_picks(default_picks(model)))
    data = {"meta": {"how": "one process; real jobs on the built-in model, T-shirt picked; each mode twice "
                            "(first: cold sample caches, second: cached before/oracle samples)"},
            "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            config, evaluation = job_settings(quick=mode == "quick")
            runs = []
            data["modes"][mode] = {"settings": {"steps": config.steps, "batch_size": config.batch_size}
                                   | vars(evaluation), "runs": runs}
            for attempt in ("first job (cold caches)", "second job (cached)"):
                runs.append({"job": attempt} | timed_job(model, forget, config, evaluation, Path(tmp)))
                print(mode, runs[-1], flush=True)
                data["meta"].update(record.finish())
                # after every job: a stopped run keeps what it measured
                write_json_and_markdown(args.out / "app_cost.json", data, table(data))
    return data


def table(data: dict) -> str:
    """The phases side by side, one column per job, and the live curve's share of training."""
    meta = data["meta"]
    columns = [(mode, run) for mode, entry in data["modes"].items() for run in entry["runs"]]
    phases = list(columns[0][1]["seconds"])
    lines = [f"App job cost: {meta['how']}. {describe_run(meta)}", ""]
    for mode, entry in data["modes"].items():
        s = entry["settings"]
        lines.append(f"- **{mode}**: {s['steps']} ReTrack steps of {s['batch_size']} rows; {s['n_samples']} samples "
                     f"before/after under the paper's sampler with {s['sampling_steps']} steps"
                     f"{' and under DDIM-50' if s['deterministic'] else ''} (grids: first {s['grid_samples']}); "
                     f"a live point every {s['live_every']} steps: {s['live_samples']} samples with "
                     f"{s['live_steps'] or s['sampling_steps']} steps and {s['live_return_copies']} noisy copies "
                     f"of each forget image noised and denoised.")
    lines += ["", "| seconds | " + " | ".join(f"{mode}: {run['job']}" for mode, run in columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(f"{run['seconds'].get(phase, 0):.1f}" for _, run in columns) + " |")
    lines.append("| whole job | " + " | ".join(f"{run['total']:.1f}" for _, run in columns) + " |")
    lines.append("| live curve / training without it | " + " | ".join(f"{live_share(run):.0%}" for _, run in columns) + " |")
    lines.append("| CLIP copy rate before → after (oracle) | " + " | ".join(
        f"{run['before_rate']:.0%} → {run['after_rate']:.0%} ({run['oracle_rate']:.0%})"
        for _, run in columns) + " |")
    return "\n".join(lines) + "\n"


def live_share(run: dict) -> float:
    """What the live curve adds to the training phase, as a share of training without it."""
    seconds = run["seconds"]
    return seconds["live curve (inside training)"] / max(seconds["training without the live curve"], 1e-9)


if __name__ == "__main__":
    main()
