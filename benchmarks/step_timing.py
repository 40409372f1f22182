"""Seconds per unlearning step of every method on the built-in model, measured side by side.

    python benchmarks/step_timing.py                  # 6 rounds x 3 steps per method, batch 128
    python benchmarks/step_timing.py --rounds 2 --steps 2 --out benchmarks/results/step_timing.json

`python -m retrack bench` times each method once, one after the other, so a machine that gets
busier half-way skews the comparison. Here the methods take turns: each round runs a few steps of
every method in a shuffled order, and the table reports the median step time over all rounds, so
background load hits every method alike. The first step of each run (allocator warm-up) is left
out.

It also times the network calls the objectives are built from, which is what explains the
differences: forward (F) and forward+backward (FB) over 128 and 256 rows, and one forward with two
backward passes (SISS's shape). Those numbers justify `objectives.predict_noise` fusing branches on a
GPU but not on the CPU.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_sets  # noqa: E402
from retrack.devices import resolve_device  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import RunRecord, add_beside_argument, script_command, write_json_and_markdown  # noqa: E402

METHODS = ("vanilla", "neggrad", "erasediff", "siss", "retrack")


def network_shapes(device: str, rounds: int) -> dict[str, float]:
    """Median seconds of the bare network calls the objectives are made of."""
    unet = load_backend(BUILTIN_MODEL, device=device).unet.train()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = {n: (torch.randn(n, 1, 28, 28, generator=gen).to(device), torch.randint(0, 1000, (n,), generator=gen).to(device))
            for n in (128, 256)}

    def forward(n: int) -> None:
        with torch.no_grad():
            unet(*rows[n]).sample

    def forward_backward(n: int) -> None:
        unet.zero_grad(set_to_none=True)
        unet(*rows[n]).sample.pow(2).sum().backward()

    def forward_two_backward(n: int) -> None:
        out = unet(*rows[n]).sample
        params = list(unet.parameters())
        torch.autograd.grad(out.pow(2).sum(), params, retain_graph=True)
        torch.autograd.grad(out.abs().sum(), params)

    cases = {
        "F 128": lambda: forward(128), "F 256": lambda: forward(256),
        "FB 128": lambda: forward_backward(128), "FB 2 x 128": lambda: (forward_backward(128), forward_backward(128)),
        "FB 256": lambda: forward_backward(256), "F + 2B 128 (SISS)": lambda: forward_two_backward(128),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, call in cases.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def method_steps(device: str, rounds: int, steps: int, batch_size: int, seed: int) -> dict[str, float]:
    """Median seconds per step of each method, the methods interleaved round by round."""
    forget, retain = builtin_sets()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = list(METHODS)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for method in order:
            backend = load_backend(BUILTIN_MODEL, device=device)
            config = UnlearnConfig.preset("mnist", method=method, steps=steps + 1, batch_size=batch_size, seed=seed,
                                          device=device)
            result = unlearn(backend, forget, retain, config)
            times[method] += [e.step_seconds for e in result.events[1:]]
    return {m: statistics.median(ts) for m, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round (one more is run)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    add_beside_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    record = RunRecord.start(script_command(__file__, argv), args.beside, device)
    print(f"device: {record.device}")

    shapes = network_shapes(device, args.rounds)
    print("\nnetwork call                 median s")
    for name, s in shapes.items():
        print(f"  {name:<26} {s:8.3f}")

    steps = method_steps(device, args.rounds, args.steps, args.batch_size, args.seed)
    print(f"\nmethod       median s/step   ({args.rounds} rounds x {args.steps} steps, batch {args.batch_size} per branch)")
    for name, s in sorted(steps.items(), key=lambda kv: kv[1]):
        print(f"  {name:<12} {s:8.3f}")
    if args.out:
        write_json_and_markdown(args.out, dict(rounds=args.rounds, steps=args.steps, batch_size=args.batch_size,
                                               network_calls=shapes, seconds_per_step=steps, **record.finish()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
