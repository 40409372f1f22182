"""Command-line pieces for Stable Diffusion models; retrack/cli.py mounts them.

    retrack split   --model SD --prompt "..." --clip ViT-B-32 --clip-pretrained laion2b_s34b_b79k --out split/
    # look at split/grid.png; move files between split/forget and split/retain to correct the split
    retrack unlearn --model SD --forget split/forget --retain split/retain --prompt "..." --out sd-clean
                    [--train-prompt "a modified prompt"] [--lora-rank 8] [--gradient-checkpointing]
    retrack sd-eval --model SD sd-clean --prompt "..." --forget split/forget --retain split/retain --clip ... --out eval/

`add_sd_arguments` adds the Stable Diffusion options to the `unlearn` parser; `sd_load_options`
and `sd_conditioning` turn them into `load_backend` and `engine.unlearn` keyword arguments (empty
for pixel models). `add_sd_commands` registers `split` and `sd-eval`. This module imports nothing
heavy at import time, so `retrack --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .presets import GUIDANCE

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"


# ----------------------------------------------------------------------------- `unlearn` options
def add_sd_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `unlearn` that only text-to-image (Stable Diffusion) models use."""
    group = parser.add_argument_group("Stable Diffusion models")
    group.add_argument("--prompt", help="the prompt whose memorised images are forgotten (required for SD models)")
    group.add_argument("--train-prompt", help="condition the fine-tune on this modified prompt instead of --prompt")
    group.add_argument("--lora-rank", type=int, help="train a LoRA adapter of this rank instead of the whole UNet")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="less GPU memory, slower steps")


def sd_load_options(args: argparse.Namespace, model_path) -> dict:
    """`load_backend` keyword arguments for the SD options given; refuses them for pixel models."""
    from .backends import model_family

    options = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
               "gradient_checkpointing": args.gradient_checkpointing or None}
    given = {k: v for k, v in options.items() if v is not None}
    if given and model_family(model_path) != "latent":
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{names}: only for Stable Diffusion models")
    return given


def sd_conditioning(args: argparse.Namespace, backend) -> dict:
    """`engine.unlearn` keyword arguments: the (modified) prompt's embedding for every row."""
    prompt = args.train_prompt or args.prompt
    if backend.family != "latent":
        if prompt:
            raise ValueError("--prompt / --train-prompt are only for text-to-image (Stable Diffusion) models")
        return {}
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is required for Stable Diffusion models (the prompt to unlearn)")
    if not args.train_prompt:
        print("note: fine-tuning on the memorised prompt itself; the paper fine-tunes on a modified prompt "
              "(--train-prompt), e.g. the prompt without the words that trigger the copy", file=sys.stderr)
    cond = backend.encode_prompt([prompt])
    return {"forget_cond": cond, "retain_cond": cond}


# ----------------------------------------------------------------------------- `split` and `sd-eval`
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt the model memorised")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per image")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"classifier-free guidance scale (default {GUIDANCE})")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"open_clip model name or local folder (default {DEFAULT_CLIP})")
    p.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED,
                   help="open_clip pretrained tag or checkpoint file (ignored for a local folder)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1")


def add_sd_commands(subparsers) -> None:
    """Register `split` and `sd-eval` on the CLI's subparsers."""
    p = subparsers.add_parser("split", help="generate images for a prompt and split them into memorised / rest",
                              description="Generate --n images with seeds --seed.., embed them with CLIP and split "
                                          "them with 2-means into a forget folder and a retain folder. (The paper "
                                          "clusters 128 generations; here the clustering runs on CLIP features.)")
    p.add_argument("--model", required=True, help="Stable Diffusion model folder")
    _add_common(p)
    p.add_argument("--n", type=int, help="images to generate (default: 128 as in the paper on a GPU, 16 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--reference", help="an image known to be memorised: its cluster becomes the forget set")
    p.add_argument("--memorised", help="override: comma-separated image numbers that form the forget set")
    p.add_argument("--out", required=True, help="new folder: forget/, retain/, grid.png, split.json")
    p.set_defaults(run=cmd_split)

    p = subparsers.add_parser("sd-eval", help="CLIP memorisation of a prompt's samples, before/after grids",
                              description="For each model, sample --n images of --prompt (same seeds for all) and "
                                          "score them against the memorised images.")
    p.add_argument("--model", nargs="+", required=True, help="one or more model folders (e.g. original and unlearned)")
    _add_common(p)
    p.add_argument("--n", type=int, default=16, help="samples per model (default 16, as the paper evaluates)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first sample (default: not the split's)")
    p.add_argument("--forget", nargs="+", required=True, help="the memorised images (files or folders)")
    p.add_argument("--retain", help="folder of non-memorised images (the split's retain set): calibrates the "
                                    "threshold and, as the oracle, gives each model's excess over it")
    p.add_argument("--threshold", type=float, help="similarity at or above which a sample is a copy")
    p.add_argument("--out", required=True, help="folder for a grid per model (<number>_<name>.png) and metrics.json")
    p.set_defaults(run=cmd_sd_eval)


def _load(model: str, device: str):
    from .backends import load_backend
    from .devices import resolve_device

    backend = load_backend(model, device=resolve_device(device))
    if backend.family != "latent":
        raise ValueError(f"{model}: not a text-to-image (Stable Diffusion) model")
    return backend


def _scorer(args: argparse.Namespace):
    from .devices import resolve_device
    from .metrics import ClipScorer

    return ClipScorer.load(args.clip, args.clip_pretrained, device=resolve_device(args.device))


def _progress(label: str):
    return lambda done, total: print(f"{label}: {done}/{total} images", file=sys.stderr, flush=True)


def cmd_split(args: argparse.Namespace) -> int:
    from .images import load_images
    from .split import PAPER_GENERATIONS, default_generations, generate_and_split

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out folder")
    backend = _load(args.model, args.device)
    scorer = _scorer(args)
    reference = load_images([args.reference], backend.image_size, 3).tensor if args.reference else None
    n = args.n if args.n is not None else default_generations(backend.device)
    if n < PAPER_GENERATIONS:
        print(f"note: generating {n} images; the paper generates {PAPER_GENERATIONS} per prompt"
              f"{' (the default on a GPU; this runs on the CPU)' if backend.device.type == 'cpu' else ''}",
              file=sys.stderr)
    split = generate_and_split(backend, args.prompt, scorer, reference=reference, n=n, seed=args.seed,
                               steps=args.steps, guidance=args.guidance, on_batch=_progress("generated"))
    if args.memorised:
        split = split.with_memorised(_indices(args.memorised))
    split.save(out)
    print(f"{len(split.memorised)} of {len(split.seeds)} images memorised ({split.rule}): {split.memorised}")
    print(f"wrote {out}/forget, {out}/retain, grid.png, split.json; correct the split by moving files, then:")
    print(f"  retrack unlearn --model {args.model} --forget {out}/forget --retain {out}/retain "
          f"--prompt {json.dumps(args.prompt)} --out OUT")
    return 0


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--memorised must be comma-separated image numbers, got {text!r}") from None


def cmd_sd_eval(args: argparse.Namespace) -> int:
    from .atomic import write_file_atomically
    from .grids import samples_grid
    from .images import expand_paths, load_images
    from .metrics import calibrate_threshold
    from .split import evaluate_prompt

    scorer = _scorer(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threshold: Optional[float] = args.threshold
    records = []
    for number, model in enumerate(args.model):
        backend = _load(model, args.device)
        forget = load_images(expand_paths(args.forget), backend.image_size, 3).tensor
        retain = load_images(expand_paths([args.retain]), backend.image_size, 3).tensor if args.retain else None
        if threshold is None:
            if retain is None:
                raise ValueError("give --threshold, or --retain images to calibrate it from")
            threshold = calibrate_threshold(scorer.image_features(forget), scorer.image_features(retain))
        evaluation = evaluate_prompt(backend, args.prompt, scorer, forget, threshold, n=args.n, seed=args.seed,
                                     retained_images=retain, steps=args.steps, guidance=args.guidance,
                                     on_batch=_progress(Path(model).name))
        grid = out / f"{number}_{Path(model).name or 'model'}.png"
        samples_grid(evaluation, side=None).save(grid)
        records.append({"model": str(model), "grid": str(grid), **evaluation.summary()})
        print(f"{model}: {int(evaluation.clip_flags.sum())}/{evaluation.n} copies (threshold {threshold:.3f}), "
              f"mean similarity {evaluation.clip_similarity.mean():.3f}, text score {evaluation.text_score:.3f}, "
              f"{'success' if evaluation.success else 'still memorised'}")
    write_file_atomically(out / "metrics.json", json.dumps(records, indent=2))
    print(f"wrote {out}/metrics.json and one grid per model")
    return 0
