"""How long one evaluation at the paper's protocol takes: 5,000 samples of the built-in model.

    python benchmarks/eval_speed.py --cold          # as `retrack bench` draws, from an empty compile cache
    python benchmarks/eval_speed.py --eager --batch 125 --precision fp32 --n 500
    python benchmarks/eval_speed.py --compare --n 500   # four ways of drawing side by side
    python benchmarks/eval_speed.py --ceiling           # this machine's matrix-multiply rate: the floor

Draws `--n` samples of the built-in model with the evaluation's default sampler (ancestral DDPM,
50 steps: the paper's) and the compiled network `retrack bench` and the curves use
(`retrack.compiled`; `--eager` without it), measures them with the built-in reference as the
benchmark does for every model, and splits the wall-clock seconds of the whole evaluation into
loading (model and reference), drawing (the network, its compilation included) and measuring
(pixel L2, CLIP and the classifier, quality). `--cold` points inductor at an empty cache first,
so the figure includes compiling from scratch, as on a fresh machine.
Writes eval_speed.json and eval_speed.md into --out.

`--compare` draws the same `--n` seeds four ways in one process, interleaved batch by batch so
that load beside it falls on all alike: eager fp32, eager bf16 autocast, `torch.compile` of the
UNet as diffusers builds it, and the compiled network of `retrack.compiled` (its GroupNorm
rewritten), both under bf16 autocast. It reports each one's network seconds per sample, the ratio
to eager bf16, the 5,000-sample time that implies, how far its samples lie from eager bf16's and
whether any sample changes side of the L2 < 10 copy line. Writes eval_speed-compare.json and .md.

`--ceiling` measures what the machine's arithmetic allows: the network's FLOPs per sample (torch's
FLOP counter, one call times the sampler's steps) and the rate of a large matrix product in fp32
and bf16 on all threads, the best any layer of the network can reach while its convolutions are
computed as direct products (as PyTorch's CPU kernels, eager or compiled, compute them). Their
quotient is a floor under the drawing time of `--n` samples that no batch size or compiler beats.
It then profiles a few calls of the compiled network at the evaluation's batch under bf16 and splits
their time by kind of operation (convolutions, attention, inductor's fused kernels for the norms,
activations and adds, the rest), so the seconds `--n` samples spend in convolutions alone, and the
rate those reach, stand beside the floor. The 2-core machines these sessions get differ (an Intel
Xeon with AMX, an AMD EPYC without), so a figure in seconds is read with this floor beside it.
Writes eval_speed-ceiling.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_reference  # noqa: E402
from retrack.compiled import compiled_backend  # noqa: E402
from retrack.evaluation import COMPILED_BATCH, SamplerSettings, draw, evaluate_samples  # noqa: E402
from retrack.images import unit_pixels  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.sampling import Samples  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=COMPILED_BATCH, help="rows per network call (default: the benchmark's)")
    parser.add_argument("--precision", default=SamplerSettings().precision, choices=("fp32", "bf16", "auto"))
    parser.add_argument("--eager", action="store_true", help="draw without compiling the network")
    parser.add_argument("--cold", action="store_true", help="compile into an empty inductor cache (a fresh machine)")
    parser.add_argument("--compare", action="store_true", help="four ways of drawing side by side")
    parser.add_argument("--ceiling", action="store_true", help="the floor the machine's arithmetic sets")
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    settings = SamplerSettings(n_samples=args.n, batch_size=args.batch, precision=args.precision, compiled=not args.eager)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    if args.compare:
        return compare(settings, record, Path(args.out))
    if args.ceiling:
        return ceiling(settings, record, Path(args.out))
    t0 = time.perf_counter()
    reference = builtin_reference("cpu")
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    t1 = time.perf_counter()
    samples = draw(backend, settings)
    t2 = time.perf_counter()
    result = evaluate_samples(samples, reference, sampler=settings.describe("cpu"))
    t3 = time.perf_counter()
    cache = "empty (--cold)" if args.cold else "as left by earlier runs"
    data = dict(sampler=result.sampler, batch_size=args.batch, samples=args.n, inductor_cache=cache,
                loading_seconds=round(t1 - t0, 1), drawing_seconds=round(t2 - t1, 1), measuring_seconds=round(t3 - t2, 1),
                evaluation_seconds=round(t3 - t0, 1), seconds_per_sample=round((t3 - t0) / args.n, 4),
                rates=result.rates(), counts=result.counts(), **record.finish())
    text = (f"One evaluation of the built-in model: {args.n} samples ({result.sampler}, batch {args.batch}) took "
            f"{data['evaluation_seconds']:.0f} s ({data['evaluation_seconds'] / 60:.2f} min) from start to end: "
            f"{data['loading_seconds']:.0f} s loading the model and the reference, {data['drawing_seconds']:.0f} s drawing"
            + (f" (compiling included; inductor cache {cache})" if settings.compiled else "")
            + f", {data['measuring_seconds']:.0f} s measuring; {data['seconds_per_sample']} s per sample. "
            f"T-shirt counts {data['counts']}. {describe_run(data)}\n")
    write_json_and_markdown(Path(args.out) / "eval_speed.json", data, text)
    print(text)
    return 0


VARIANTS = ("fp32", "bf16", "compiled bf16, nn.GroupNorm", "compiled bf16")
FULL = 5000  # samples of one evaluation at the paper's protocol


def compare(settings: SamplerSettings, record: RunRecord, out: Path) -> int:
    """The four ways of drawing, batch by batch in turn (see the module docstring)."""
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    plain = copy.copy(backend)
    plain.unet = torch.compile(copy.deepcopy(backend.unet), dynamic=False)
    compiled = compiled_backend(backend)
    ways = {"fp32": (backend, "fp32"), "bf16": (backend, "bf16"), "compiled bf16, nn.GroupNorm": (plain, "bf16"),
            "compiled bf16": (compiled, "bf16")}
    compile_seconds = {}
    for name in VARIANTS[2:]:  # compile: not timed, reported
        started = time.perf_counter()
        first = draw(ways[name][0], replace_n(settings, settings.batch_size, "bf16"))
        compile_seconds[name] = round(time.perf_counter() - started, 1)
    seconds, images = {name: 0.0 for name in VARIANTS}, {name: [] for name in VARIANTS}
    for start in range(0, settings.n_samples, settings.batch_size):
        n = min(settings.batch_size, settings.n_samples - start)
        for name, (model, precision) in ways.items():
            t0 = time.perf_counter()
            batch = draw(model, replace_n(settings, n, precision, seed=settings.seed + start))
            seconds[name] += time.perf_counter() - t0
            images[name].append(batch.images)
    reference = builtin_reference("cpu")
    seeds = list(range(settings.seed, settings.seed + settings.n_samples))
    measured = {name: evaluate_samples(Samples(torch.cat(batches), seeds), reference) for name, batches in images.items()}
    pixels = {name: unit_pixels(torch.cat(batches)) for name, batches in images.items()}
    copies = {name: result.copies()["l2"] for name, result in measured.items()}
    rows = {name: dict(seconds_per_sample=round(seconds[name] / settings.n_samples, 4),
                       speed_vs_bf16=round(seconds["bf16"] / seconds[name], 2),
                       projected_5000_seconds=round(seconds[name] / settings.n_samples * FULL),
                       mean_abs_pixel_difference_vs_bf16=float(abs(pixels[name] - pixels["bf16"]).mean()),
                       copies=int(copies[name].sum()),
                       samples_changing_side_vs_bf16=int((copies[name] != copies["bf16"]).sum()))
            for name in VARIANTS}
    data = dict(sampler=replace_n(settings, settings.n_samples, "bf16").describe(), samples=settings.n_samples,
                batch_size=settings.batch_size, compile_seconds=compile_seconds, variants=rows,
                first_batch_equal=bool(torch.equal(first.images, images["compiled bf16"][0])), **record.finish())
    firsts = ", ".join(f"{name} {seconds} s" for name, seconds in compile_seconds.items())
    lines = [f"Drawing {settings.n_samples} samples of the built-in model four ways, batch by batch in turn "
             f"({data['sampler']} for each; batch {settings.batch_size}). The compiled networks' first calls "
             f"(not counted): {firsts}. {describe_run(data)}", "",
             "| drawing | s per sample | speed vs eager bf16 | 5,000 samples (drawing only) | mean pixel "
             "difference vs eager bf16 | L2 < 10 copies | samples changing side |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds_per_sample']} | {r['speed_vs_bf16']}× | {r['projected_5000_seconds'] / 60:.1f} min "
              f"| {r['mean_abs_pixel_difference_vs_bf16']:.4f} | {r['copies']} | {r['samples_changing_side_vs_bf16']} |"
              for name, r in rows.items()]
    text = "\n".join(lines) + "\n"
    write_json_and_markdown(out / "eval_speed-compare.json", data, text)
    print(text)
    return 0


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10, rounds: int = 5) -> float:
    """GFLOP/s of a size x size x size matrix product on all of torch's threads: the best of `rounds`
    rounds of `repeats` products after 3 warm-ups (a ceiling, so the best round, not the mean)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 * repeats / best / 1e9


def ceiling(settings: SamplerSettings, record: RunRecord, out: Path) -> int:
    """The network's FLOPs for `settings.n_samples` samples against the machine's matrix-product rate,
    and where the compiled network's time goes (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    backend = load_backend(BUILTIN_MODEL, device="cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backend.unet(torch.randn(1, *backend.x0_shape), torch.tensor([500]))
    calls = settings.steps * settings.n_samples  # network calls of one sample each
    per_sample = counter.get_total_flops() * settings.steps / 1e9
    conv_flops = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    rates = {name: round(matmul_rate(dtype)) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    floors = {name: round(per_sample * settings.n_samples / rate) for name, rate in rates.items()}
    per_call = profile_compiled_calls(backend, settings.batch_size)
    spent = {kind: round(seconds * calls / settings.batch_size) for kind, seconds in per_call.items()}
    conv_rate = round(conv_flops * settings.batch_size / per_call["convolutions"] / 1e9)
    data = dict(sampler=settings.describe(), gflop_per_sample=round(per_sample, 2),
                convolution_share_of_flops=round(conv_flops * settings.steps / 1e9 / per_sample, 3),
                matmul_gflop_per_s=rates, floor_seconds=floors, threads=torch.get_num_threads(),
                profiled_batch=settings.batch_size, profiled_ms_per_call={k: round(v * 1e3, 1) for k, v in per_call.items()},
                projected_seconds_by_kind=spent, convolution_gflop_per_s=conv_rate, **record.finish())
    kinds = ", ".join(f"{kind} {seconds} s" for kind, seconds in spent.items())
    text = (f"The built-in network costs {per_sample:.1f} GFLOP per sample ({settings.steps} calls), "
            f"{100 * data['convolution_share_of_flops']:.0f} % of it in convolutions. A 2048-cube matrix "
            f"product runs at {rates['fp32']} GFLOP/s in fp32 and {rates['bf16']} in bf16 on {data['threads']} threads "
            f"here, so drawing {settings.n_samples} samples takes at least {floors['bf16']} s "
            f"({floors['bf16'] / 60:.1f} min) in bf16 and {floors['fp32']} s in fp32 at that rate, whatever the batch or "
            f"compiler (convolutions computed as direct products). Profiled, the compiled network under bf16 at batch "
            f"{settings.batch_size} would spend, over {settings.n_samples} samples: {kinds} (self time on the calling "
            f"thread, {PROFILED_CALLS} calls); its convolutions run at {conv_rate} GFLOP/s. "
            f"{describe_run(data)}\n")
    write_json_and_markdown(out / "eval_speed-ceiling.json", data, text)
    print(text)
    return 0


PROFILED_CALLS = 5
KINDS = (("convolutions", "convolution"), ("attention", "attention"), ("fused kernels", "CompiledFxGraph"))


def profile_compiled_calls(backend, batch_size: int) -> dict[str, float]:
    """Seconds per call of the compiled network (bf16 autocast, `batch_size` rows) by kind of operation:
    the profiler's self CPU time, whose kinds add up to the call's wall-clock time."""
    from torch.profiler import ProfilerActivity, profile

    denoise = compiled_backend(backend).sampling_denoiser(None, 1.0)
    x, t = torch.randn(batch_size, *backend.x0_shape), torch.tensor([500])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):  # compile and warm up
            denoise(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            for _ in range(PROFILED_CALLS):
                denoise(x, t)
    seconds = {kind: 0.0 for kind, _ in KINDS} | {"other": 0.0}
    for event in profiled.key_averages():
        kind = next((kind for kind, key in KINDS if key in event.key), "other")
        seconds[kind] += event.self_cpu_time_total / 1e6 / PROFILED_CALLS
    return seconds


def replace_n(settings: SamplerSettings, n: int, precision: str, seed: Optional[int] = None) -> SamplerSettings:
    """`settings` for one batch of one way of drawing (its network comes compiled or not already)."""
    return replace(settings, n_samples=n, precision=precision, seed=settings.seed if seed is None else seed,
                   compiled=False)


if __name__ == "__main__":
    raise SystemExit(main())
