"""The tiny open_clip scorer: trained contrastively (open_clip's ClipLoss) on the built-in images and
captions of their classes, saved as an open_clip folder (float16) with its record and card."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch

from retrack.atomic import write_folder_atomically
from retrack.data import CLASS_NAMES, TSHIRT_LABEL, BuiltinDataset
from retrack.images import uint8_to_tensor
from retrack.runrecord import describe_machine

from .augment import DIGITS_PER_BATCH, TSHIRTS_PER_BATCH, augmented_batch
from .cards import write_card
from .data import dataset_description
from .networks import CLIP_CONFIG, CLIP_PREPROCESS
from .runtime import fused, log, uses_bf16, write_json
from .training import run_training

# Templates every class shares (so zero-shot prompts like "a photo of a {}." work) ...
SHARED_TEMPLATES = ("a photo of a {name}.", "a drawing of a {name}.", "an image of a {name}.", "a {name}.")
# ... and class-specific phrasings.
DIGIT_TEMPLATES = ("a handwritten digit {name}.", "a photo of the digit {number}.", "the number {name}.",
                   "a handwritten {number}.")
AUGMENT_MAX_NOISE = 0.3  # --clip-augment: unlearning leaves T-shirts speckled about this strongly
TSHIRT_TEMPLATES = ("a photo of a shirt.", "a piece of clothing.", "a short-sleeved shirt.", "a drawing of a tee shirt.")


def class_captions() -> list[list[str]]:
    """Training captions per label 0..10 (same count for every class)."""
    captions = []
    for label, name in enumerate(CLASS_NAMES):
        specific = TSHIRT_TEMPLATES if label == TSHIRT_LABEL else DIGIT_TEMPLATES
        captions.append([t.format(name=name, number=label) for t in SHARED_TEMPLATES + specific])
    return captions


def train_clip(args: argparse.Namespace, dataset: BuiltinDataset, device: torch.device) -> dict:
    """Train the tiny open_clip model contrastively on the images and their class captions."""
    import open_clip

    from retrack.metrics import save_open_clip_folder

    part = "clip"
    data = uint8_to_tensor(dataset.images, device=device)
    captions = class_captions()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the standard CLIP BPE, context 77, offline
    tokens = tokenizer([c for per_class in captions for c in per_class]).to(device)  # (11 * T, 77)

    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**CLIP_CONFIG)
    if args.clip_init is not None:
        from safetensors.torch import load_file

        stored = load_file(str(args.clip_init / "open_clip_model.safetensors"))
        model.load_state_dict({name: value.float() for name, value in stored.items()})
    model = model.to(device).train()
    optimizer = clip_optimizer(model, args, device)
    n_params = sum(p.numel() for p in model.parameters())
    batch = DIGITS_PER_BATCH + TSHIRTS_PER_BATCH if args.clip_augment else args.batch
    log(part, f"{len(data)} images, {len(tokens)} captions, {n_params:,} parameters, batch {batch}, "
              f"device {describe_machine(str(device))}")
    labels = torch.from_numpy(dataset.labels).to(device)
    loss = (augmented_clip_loss(model, args, device, dataset, tokens, len(captions[0])) if args.clip_augment
            else clip_loss(model, args, device, data, labels, tokens, len(captions[0])))

    def clamp_temperature(step: int) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does

    record = run_training(part, args, device, optimizer, args.clip_lr, loss, clamp_temperature)
    info = {
        **record,
        "batch": batch,
        "kind": "open_clip",
        "trained_on": "all images (digits + T-shirt copies) with class captions",
        "dataset": dataset_description(args, dataset),
        "captions": captions,
        "optimizer": {"name": "AdamW", "lr": args.clip_lr, "betas": [0.9, 0.98], "eps": 1e-6,
                      "weight_decay": "0.1 on matrices, 0 on gains/biases/temperature",
                      "warmup_steps": args.warmup_steps, "grad_clip": 1.0},
        "loss": "open_clip.loss.ClipLoss (symmetric InfoNCE)",
        "augmentation": (f"builtin_build.augment.augmented_batch, noise up to {AUGMENT_MAX_NOISE}: 128 digits + 16 "
                         "T-shirts per batch, warped, blurred, faded, noised, a third on grey backgrounds"
                         if args.clip_augment else None),
        "initialised_from": None if args.clip_init is None else str(args.clip_init),
        "final_logit_scale": float(model.logit_scale.detach().exp()),
        "model_cfg": CLIP_CONFIG,
        "preprocess_cfg": CLIP_PREPROCESS,
        "parameters": n_params,
        "stored_dtype": "float16 (loaded into float32)",
        "tokenizer": "open_clip SimpleTokenizer (CLIP BPE, 49,408 tokens, context 77)",
    }
    folder = args.out / part

    def write(tmp: Path) -> None:
        save_open_clip_folder(model.float(), CLIP_CONFIG, tmp, preprocess_cfg=CLIP_PREPROCESS, dtype=torch.float16)
        write_json(tmp / "retrack.json", info)

    write_folder_atomically(folder, write, overwrite=True)
    write_card(folder)
    log(part, f"saved {folder} after {info['steps']} steps in {info['wall_seconds']:.0f}s")
    return info


def clip_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as CLIP's recipe has it: weight decay on matrices only, not on gains, biases or the
    temperature."""
    decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                             lr=args.clip_lr, betas=(0.9, 0.98), eps=1e-6, **fused(device))


def _caption_loss(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, tokens: torch.Tensor,
                  templates_per_class: int, generator: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The symmetric InfoNCE of a batch of images in [-1, 1] against a random caption of each one's label."""
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=uses_bf16(args, device))

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        template = torch.randint(0, templates_per_class, (len(images),), device=device, generator=generator)
        caption_ids = labels * templates_per_class + template
        # Many images share a caption: encode each distinct caption once and spread it back.
        unique_ids, position = torch.unique(caption_ids, return_inverse=True)
        with autocast:
            image_features = model.encode_image(images.expand(-1, 3, -1, -1), normalize=True)
            text_features = model.encode_text(tokens[unique_ids], normalize=True)[position]
            return loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())

    return loss


def augmented_clip_loss(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                        dataset: BuiltinDataset, tokens: torch.Tensor, templates_per_class: int) -> Callable[[int], torch.Tensor]:
    """`clip_loss` on degraded images (`augment.augmented_batch`), drawn on the CPU from their own generator."""
    digits = torch.from_numpy(dataset.retain_images).float().div(255.0).unsqueeze(1)
    digit_labels = torch.from_numpy(dataset.labels[~dataset.is_forget])
    tshirt = torch.from_numpy(dataset.tshirt.copy()).float().div(255.0)[None, None]
    generator = torch.Generator().manual_seed(args.seed + 3)
    caption_loss = _caption_loss(model, args, device, tokens, templates_per_class,
                                 torch.Generator(device).manual_seed(args.seed + 2))

    def loss(step: int) -> torch.Tensor:
        images01, labels = augmented_batch(digits, digit_labels, tshirt, generator, max_noise=AUGMENT_MAX_NOISE)
        return caption_loss((images01 * 2 - 1).to(device), labels.to(device))

    return loss


def clip_loss(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, data: torch.Tensor,
              labels: torch.Tensor, tokens: torch.Tensor, templates_per_class: int) -> Callable[[int], torch.Tensor]:
    """The loss of one step: a batch of images, each with a random caption of its class, through
    open_clip's symmetric InfoNCE, drawn from the CLIP part's own generator."""
    generator = torch.Generator(device).manual_seed(args.seed + 2)
    caption_loss = _caption_loss(model, args, device, tokens, templates_per_class, generator)

    def loss(step: int) -> torch.Tensor:
        index = torch.randint(0, len(data), (args.batch,), device=device, generator=generator)
        return caption_loss(data[index], labels[index])

    return loss
