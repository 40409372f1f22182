"""CPU speed options for the built-in model: fp32, bf16 autocast, channels_last, torch.compile.

    python benchmarks/cpu_speed.py                     # sampling forwards + ReTrack steps, no compile
    python benchmarks/cpu_speed.py --compile           # also torch.compile (compile time timed apart)

Two workloads, each variant timed in turns with the others in one process (rounds in shuffled
order, medians), so background load hits them alike; report ratios to fp32:

* sampling: one UNet forward of the built-in model at the evaluation batch size (no grad);
* training: one step of the published ReTrack run (`engine.unlearn`, preset "mnist", batch 128 per
  branch), fp32 against `mixed_precision="bf16"` (torch autocast) and channels_last weights.

And the effect on results: the largest absolute difference of the noise prediction from fp32's,
the loss of every training step against fp32's (same seeds, same batches), and samples from the
same seeds (DPM-Solver++ 15 steps): the per-sample pixel L2 to fp32's samples and how many change
their classifier verdict (T-shirt or not).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_sets  # noqa: E402
from retrack.classifier import DigitClassifier  # noqa: E402
from retrack.data import TSHIRT_LABEL  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)
from retrack.sampling import pixel_l2, sample  # noqa: E402


def cpu_flags() -> dict[str, bool]:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return {flag: flag in flags for flag in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


# name -> (channels_last, bf16 autocast); the torch.compile ones (contiguous) are added apart: their first call compiles.
VARIANTS = {"fp32": (False, False), "bf16 autocast": (False, True), "channels_last": (True, False),
            "channels_last + bf16": (True, True)}
COMPILED = {"torch.compile": False, "torch.compile + bf16": True}  # name -> bf16 autocast (sampling forward only)


def time_sampling(batch: int, rounds: int, compile_too: bool) -> dict:
    """Median seconds of one no-grad UNet forward per variant, and its difference from fp32's output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    nets = {}
    for name, (channels_last, _) in VARIANTS.items():
        net = load_backend(BUILTIN_MODEL, device="cpu").unet.eval()
        nets[name] = net.to(memory_format=torch.channels_last) if channels_last else net
    compile_seconds = None
    compile_error = None
    if compile_too:
        compile_seconds = {}
        try:
            for name, use_bf16 in COMPILED.items():
                net = torch.compile(load_backend(BUILTIN_MODEL, device="cpu").unet.eval())
                t0 = time.perf_counter()
                with torch.no_grad(), (bf16() if use_bf16 else nullcontext()):
                    net(x, t)
                compile_seconds[name] = time.perf_counter() - t0
                nets[name] = net
        except Exception as exc:  # reported, not hidden: compile support varies by machine
            compile_error = f"{type(exc).__name__}: {exc}"[:500]
    times = {name: [] for name in nets}
    outputs = {}
    order = list(nets)
    for round_ in range(rounds + 1):  # round 0 warms up and is dropped
        random.Random(round_).shuffle(order)
        for name in order:
            channels_last, use_bf16 = VARIANTS.get(name, (False, COMPILED.get(name, False)))
            inputs = x.to(memory_format=torch.channels_last) if channels_last else x
            with torch.no_grad(), (bf16() if use_bf16 else nullcontext()):
                t0 = time.perf_counter()
                out = nets[name](inputs, t).sample
                times[name].append(time.perf_counter() - t0)
            outputs[name] = out.float()
    medians = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    return {"batch": batch, "rounds": rounds, "compile_seconds": compile_seconds, "compile_error": compile_error,
            "variants": {name: {"seconds": medians[name], "ratio_to_fp32": medians[name] / medians["fp32"],
                                "max_abs_eps_difference": float((outputs[name] - outputs["fp32"]).abs().max()),
                                "eps_std": float(outputs["fp32"].std())} for name in nets}}


def sample_agreement(n: int, steps: int, compile_too: bool) -> dict:
    """Same-seed DPM-Solver++ samples under bf16 autocast, channels_last and torch.compile against fp32's."""
    classifier = DigitClassifier.load("builtin")
    results = {}
    reference = None
    variants = {name: (channels_last, use_bf16, False) for name, (channels_last, use_bf16) in VARIANTS.items()}
    if compile_too:
        variants.update({name: (False, use_bf16, True) for name, use_bf16 in COMPILED.items()})
    for name, (channels_last, use_bf16, compiled) in variants.items():
        backend = load_backend(BUILTIN_MODEL, device="cpu")
        if channels_last:
            backend.unet.to(memory_format=torch.channels_last)
        if compiled:
            backend.unet = torch.compile(backend.unet)
        images = sample(backend, n, seed=0, steps=steps, scheduler="dpm++", precision="bf16" if use_bf16 else "fp32").images
        if reference is None:
            reference = images
            reference_tshirt = classifier.probabilities(images)[:, TSHIRT_LABEL] > 0.5
        distance = pixel_l2(images, reference).numpy()
        tshirt = classifier.probabilities(images)[:, TSHIRT_LABEL] > 0.5
        results[name] = {"median_pixel_l2_to_fp32": float(np.median(distance)), "max_pixel_l2_to_fp32": float(distance.max()),
                         "tshirt_verdict_changes": int((tshirt != reference_tshirt).sum()), "tshirts": int(tshirt.sum())}
    return {"n": n, "sampler": f"dpm++-{steps}", "variants": results}


def time_training(rounds: int, steps: int, batch: int, compile_too: bool) -> dict:
    """Median seconds per ReTrack step per variant (variants interleaved), and loss differences.

    The first step of every run is dropped: it warms the allocator and, for torch.compile, compiles
    (forward and backward); its seconds are reported apart as `first_step_seconds`."""
    forget, retain = builtin_sets()
    variants = {name: (channels_last, "bf16" if use_bf16 else "no", False)
                for name, (channels_last, use_bf16) in VARIANTS.items()}
    if compile_too:
        variants["torch.compile"] = (False, "no", True)
    times = {name: [] for name in variants}
    first_step = {name: [] for name in variants}
    losses = {}
    order = list(variants)
    for round_ in range(rounds):
        random.Random(round_).shuffle(order)
        for name in order:
            channels_last, precision, compiled = variants[name]
            backend = load_backend(BUILTIN_MODEL, device="cpu")
            if channels_last:
                backend.unet.to(memory_format=torch.channels_last)
            if compiled:  # the optimiser sees the same parameters through the compiled wrapper
                backend.unet = torch.compile(backend.unet)
            config = UnlearnConfig.preset("mnist", method="retrack", steps=steps + 1, batch_size=batch, seed=0,
                                          device="cpu", mixed_precision=precision)
            result = unlearn(backend, forget, retain, config)
            times[name] += [e.step_seconds for e in result.events[1:]]
            first_step[name].append(result.events[0].step_seconds)
            losses[name] = [e.loss for e in result.events]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"batch_per_branch": batch, "rounds": rounds, "steps_per_round": steps,
            "first_step_seconds": {name: ts for name, ts in first_step.items()},
            "variants": {name: {"seconds_per_step": medians[name], "ratio_to_fp32": medians[name] / medians["fp32"],
                                "losses": losses[name],
                                "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses[name], losses["fp32"]))}
                         for name in variants}}


def markdown(result: dict) -> str:
    s, ag = result["sampling"], result["sample_agreement"]
    lines = ["# CPU speed options on the built-in model", "",
             f"{describe_run(result)} CPU flags {result['cpu_flags']}. Each variant took its turn with the others in "
             "shuffled rounds in one process; medians. Compare the ratios, not the seconds.", "",
             f"## Sampling: one UNet forward, batch {s['batch']}, no grad ({s['rounds']} rounds)", "",
             "| variant | s/forward | × fp32 | max abs Δeps vs fp32 (eps std ≈ 1) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.4f} | {v['ratio_to_fp32']:.2f} | {v['max_abs_eps_difference']:.2e} |"
              for k, v in s["variants"].items()]
    if s["compile_seconds"]:
        lines += ["", "torch.compile: first call (compilation; inductor's on-disk cache may shorten it) " + ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in s["compile_seconds"].items()) + "."]
    elif s["compile_error"]:
        lines += ["", f"torch.compile failed: `{s['compile_error']}`."]
    else:
        lines += ["", "torch.compile: not measured in this run (pass --compile)."]
    lines += ["", f"Same seeds, {ag['sampler']}, {ag['n']} samples: pixel L2 (28×28 in [0, 1]) to the fp32 samples and "
              "changes of the classifier's T-shirt verdict.", "",
              "| variant | median L2 | max L2 | T-shirt verdicts changed | T-shirts |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['median_pixel_l2_to_fp32']:.3f} | {v['max_pixel_l2_to_fp32']:.3f} | "
              f"{v['tshirt_verdict_changes']} | {v['tshirts']} |" for k, v in ag["variants"].items()]
    tr = result.get("training")
    if tr is None:
        lines += ["", "## Training", "", "Not measured in this run (it was stopped before the training part; see below)."]
    else:
        lines += ["", f"## Training: published ReTrack step (preset mnist, batch {tr['batch_per_branch']} per branch, "
                  f"{tr['rounds']} rounds × {tr['steps_per_round']} timed steps)", "",
                  "| variant | s/step | × fp32 | max abs loss difference vs fp32 (same batches) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds_per_step']:.3f} | {v['ratio_to_fp32']:.2f} | {v['max_abs_loss_difference']:.2e} |"
                  for k, v in tr["variants"].items()]
        if "first_step_seconds" in tr:
            lines += ["", "First (untimed) step of each run, seconds: " + "; ".join(
                f"{k} {', '.join(f'{s:.1f}' for s in v)}" for k, v in tr["first_step_seconds"].items())
                + " (torch.compile compiles forward and backward there)."]
    lines += ["", "## Conclusion", "", result.get("conclusion", "(see the report)"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="evaluation batch size of the forward timing")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--agreement-n", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    result: dict = {"cpu_flags": cpu_flags()}
    result["sampling"] = time_sampling(args.batch, args.rounds, args.compile)
    result["sample_agreement"] = sample_agreement(args.agreement_n, 15, args.compile)
    write_results(Path(args.out), result, record)  # the sampling part stands on its own if training is cut short
    result["training"] = time_training(args.train_rounds, args.train_steps, 128, args.compile)
    write_results(Path(args.out), result, record)
    return 0


def write_results(out: Path, result: dict, record: RunRecord) -> None:
    result.update(record.finish())
    write_json_and_markdown(out / "cpu_speed.json", result, markdown(result))
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
