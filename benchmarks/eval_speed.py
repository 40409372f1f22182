"""How long one evaluation at the paper's protocol takes: 5,000 samples of the built-in model.

    python benchmarks/eval_speed.py                 # the evaluation's defaults, 5,000 samples
    python benchmarks/eval_speed.py --batch 125 --precision fp32 --n 500

Draws `--n` samples of the built-in model with the evaluation's default sampler (ancestral DDPM,
50 steps: the paper's) and measures them with the built-in reference, as `retrack bench` does for
every model, and splits the seconds into drawing (the network) and measuring (pixel L2, CLIP and
the classifier, quality). The network's share is what batch size, bf16 and threads act on.
Writes eval_speed.json and eval_speed.md into --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.evaluation import SamplerSettings, builtin_reference, draw, evaluate_samples  # noqa: E402
from retrack.paths import BUILTIN_MODEL  # noqa: E402
from retrack.runrecord import (  # noqa: E402
    RunRecord, add_beside_argument, describe_run, script_command, write_json_and_markdown,
)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=SamplerSettings().batch_size)
    parser.add_argument("--precision", default=SamplerSettings().precision, choices=("fp32", "bf16", "auto"))
    add_beside_argument(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    settings = SamplerSettings(n_samples=args.n, batch_size=args.batch, precision=args.precision)
    record = RunRecord.start(script_command(__file__, argv), args.beside)
    reference = builtin_reference("cpu")
    backend = load_backend(BUILTIN_MODEL, device="cpu")
    t0 = time.perf_counter()
    samples = draw(backend, settings)
    t1 = time.perf_counter()
    result = evaluate_samples(samples, reference, sampler=settings.describe("cpu"))
    t2 = time.perf_counter()
    data = dict(sampler=result.sampler, batch_size=args.batch, samples=args.n, drawing_seconds=round(t1 - t0, 1),
                measuring_seconds=round(t2 - t1, 1), evaluation_seconds=round(t2 - t0, 1),
                seconds_per_sample=round((t2 - t0) / args.n, 4), rates=result.rates(), counts=result.counts(),
                **record.finish())
    text = (f"One evaluation of the built-in model: {args.n} samples ({result.sampler}, batch {args.batch}) took "
            f"{data['evaluation_seconds']:.0f} s: {data['drawing_seconds']:.0f} s drawing, "
            f"{data['measuring_seconds']:.0f} s measuring ({data['seconds_per_sample']} s per sample). T-shirt counts "
            f"{data['counts']}. {describe_run(data)}\n")
    write_json_and_markdown(Path(args.out) / "eval_speed.json", data, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
