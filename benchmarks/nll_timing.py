"""CPU time of the likelihood (bits/dim) of one 28×28 image under the built-in model, per setting.

    OMP_NUM_THREADS=1 python benchmarks/nll_timing.py --out benchmarks/results/nll_timing.json

For the T-shirt and one retain digit it runs `retrack.likelihood.model_likelihoods` with Song et
al.'s setting (rtol = atol = 1e-5, 4 repeats: the CLI's and the benchmark's default), the app's
cheap setting (1e-3, 2 repeats) and the app's --quick setting (1e-2, 2 repeats), and records the
process CPU seconds, the wall seconds, the network evaluations (each a forward pass and one
vector-Jacobian product over the repeats) and the estimate, so the cheap settings' cost and how far
they move the figure can be read side by side. CPU seconds are the figure to quote on a shared
machine: wall time there depends on what else runs (the load average is recorded). On a busy
2-core machine, run it with one thread (OMP_NUM_THREADS=1), as the committed results were.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.builtin import builtin_sets  # noqa: E402
from retrack.likelihood import NLLSettings, model_likelihoods  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import RunRecord, add_beside_argument, script_command, write_json_and_markdown  # noqa: E402

SETTINGS = {
    "song (default)": NLLSettings(),
    "app cheap": NLLSettings.cheap(),
    "app --quick": NLLSettings.rough(),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    add_beside_argument(parser)
    args = parser.parse_args(argv)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    forget, retain = builtin_sets()
    images = {"t-shirt": forget[:1], "retain #0": retain[:1]}
    rows = []
    for setting, nll in SETTINGS.items():
        for name, image in images.items():
            cpu, wall = time.process_time(), time.perf_counter()
            result = model_likelihoods(backend, image, nll)[0]
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rows.append(dict(setting=setting, image=name, rtol=nll.rtol, atol=nll.atol, repeats=nll.repeats,
                             cpu_seconds=round(cpu, 2), wall_seconds=round(wall, 2), evaluations=result.evaluations,
                             cpu_ms_per_evaluation=round(1000 * cpu / result.evaluations, 1),
                             bits_per_dim=round(result.bits_per_dim, 4), std_error=round(result.std_error, 4)))
            print(f"{setting:>15} {name:>10}: {result} | {cpu:6.1f} s CPU, {wall:6.1f} s wall, "
                  f"{result.evaluations} evaluations", flush=True)
    if args.out:
        write_json_and_markdown(args.out, dict(image="28x28x1 built-in model (0.69 M parameters)", rows=rows,
                                               **record.finish()))


if __name__ == "__main__":
    main()
