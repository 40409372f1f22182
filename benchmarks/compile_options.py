"""Which `torch.compile` setting draws the built-in model fastest on this CPU: an exploration.

    python benchmarks/compile_options.py N BATCH VARIANTS
    python benchmarks/compile_options.py 1000 100 "compiled+b25,compiled+b50,compiled+b100,eager+b50"

Each variant is "compiled" (torch.compile of the UNet, dynamic=False) or "eager", plus options
joined by "+": "freeze" (inductor's weight freezing), "cl" (channels_last), "autotune" (mode
max-autotune-no-cudagraphs), "bNNN" (its own batch size, else BATCH). The paper's sampler (DDPM-50)
under bf16 autocast; the variants draw the same N seeds batch by batch in turn in one process, after
a first (compiling) call that is reported, not timed. Prints seconds per sample, the 5,000-sample
projection, the pixel-L2 copies and the mean pixel difference to the first variant, then the run
record (machine, load, what ran beside: `--beside`). Results are
pasted into benchmarks/results/compile_options.md (this script writes no file).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch._inductor.config as inductor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.backends.base import Backend  # noqa: E402
from retrack.builtin import builtin_sets  # noqa: E402
from retrack.copies import PAPER_L2_THRESHOLD, pixel_copies  # noqa: E402
from retrack.evaluation import SamplerSettings, draw  # noqa: E402
from retrack.images import unit_pixels  # noqa: E402
from retrack.metrics import nearest_l2_distances  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import RunRecord, add_beside_argument, describe_run, script_command  # noqa: E402


def prepared(backend: Backend, variant: str) -> Backend:
    """A copy of the backend whose network runs as `variant` says (see the module docstring)."""
    options = variant.split("+")
    prepared_backend, unet = copy.copy(backend), copy.deepcopy(backend.unet)
    if "cl" in options:
        unet = unet.to(memory_format=torch.channels_last)
    mode = "max-autotune-no-cudagraphs" if "autotune" in options else None
    prepared_backend.unet = unet if options[0] == "eager" else torch.compile(unet, dynamic=False, mode=mode)
    return prepared_backend


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, help="samples each variant draws")
    parser.add_argument("batch", type=int, help="batch size of the variants without their own")
    parser.add_argument("variants", help='comma-separated, e.g. "compiled+b50,eager+b50"')
    add_beside_argument(parser)
    args = parser.parse_args(argv)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    variants = args.variants.split(",")
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    settings = SamplerSettings(precision="bf16")
    batches = {name: next((int(t[1:]) for t in name.split("+") if t.startswith("b")), args.batch) for name in variants}
    largest = max(batches.values())
    if args.n % largest or any(largest % batch for batch in batches.values()):  # the variants draw the same seeds
        parser.error(f"every batch size must divide the largest ({largest}), and it must divide N ({args.n})")
    ways = {}
    for name in variants:
        inductor.freezing = "freeze" in name.split("+")  # read when the first call compiles
        ways[name] = prepared(backend, name)
        started = time.perf_counter()
        with torch.no_grad():
            draw(ways[name], replace(settings, n_samples=batches[name], batch_size=batches[name]))
        print(name, "first call", round(time.perf_counter() - started, 1), "s", flush=True)
    inductor.freezing = False
    seconds, images = {name: 0.0 for name in ways}, {name: [] for name in ways}
    for start in range(0, args.n, largest):  # every variant draws the same seeds, in turn
        for name, way in ways.items():
            for seed in range(start, start + largest, batches[name]):
                started = time.perf_counter()
                with torch.no_grad():
                    out = draw(way, replace(settings, seed=seed, n_samples=batches[name], batch_size=batches[name]))
                seconds[name] += time.perf_counter() - started
                images[name].append(out.images)
    forget = unit_pixels(builtin_sets()[0])
    first = unit_pixels(torch.cat(images[variants[0]]))
    for name in ways:
        pixels = unit_pixels(torch.cat(images[name]))
        copies = pixel_copies(nearest_l2_distances(pixels, forget), PAPER_L2_THRESHOLD)
        print(f"{name}: {seconds[name] / args.n:.4f} s/sample, 5000 -> {seconds[name] / args.n * 5000 / 60:.2f} min, "
              f"copies {int(copies.sum())}, mean |diff| vs {variants[0]} {abs(pixels - first).mean():.4f}", flush=True)
    print(describe_run(record.finish()))


if __name__ == "__main__":
    main()
