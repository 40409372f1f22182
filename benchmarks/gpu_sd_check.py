"""GPU check of the Stable Diffusion path: the published default run (fp32, full UNet), mixed
precision and LoRA runs, and a gradient comparison of the precisions on one micro-batch.

    python benchmarks/gpu_sd_check.py                          # on the GPU: tiny model, then SD v1 size
    python benchmarks/gpu_sd_check.py --out results.json       # the same, rows also written as JSON
    python benchmarks/gpu_sd_check.py --device cpu             # every check at tiny size on the CPU

Two models, both random (no weights can be downloaded on the test machines):
- "tiny": retrack.testing's pipeline (64 px, a 0.2 M-parameter UNet): checks that every precision and
  mode runs on the device, the losses stay finite, only the UNet (or LoRA) weights move, and the
  VAE and the text encoder stay exactly as they were;
- "sd-v1" (GPU only, or --sd-size yes): a pipeline with Stable Diffusion v1.4's architecture and sizes
  (860 M-parameter UNet, 512 px images, 64 x 64 latents, 77 x 768 text embeddings).

Runs, each a few ReTrack steps (the first is warm-up and left out of s/step):
- "default": what `retrack unlearn` does with no options, i.e. the published setting: fp32, the
  whole UNet, no gradient checkpointing, batch 1 x accumulation 16, lr 1e-5. It reports seconds
  per step, peak GPU memory and the projected time of the published 30 steps;
- fp16 (with the engine's gradient scaler) and bf16, full UNet and LoRA, with gradient
  checkpointing (the memory-saving options), at accumulation 16 on SD v1 size.
Then the gradient comparison: one fixed micro-batch of the ReTrack loss, its gradient in fp32,
bf16, fp16 with loss scaling (torch.amp.GradScaler, as the engine does) and, for contrast, fp16
without; each compared with fp32 (relative L2 error, cosine, share of entries that are exactly 0
where fp32's are not: underflow).

Prints one row per run and exits with status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack import objectives  # noqa: E402
from retrack.backends.latent import LatentBackend  # noqa: E402
from retrack.devices import AUTOCAST_DTYPES  # noqa: E402
from retrack.engine import UnlearnConfig  # noqa: E402
from retrack.presets import GUIDANCE, PRESETS  # noqa: E402
from retrack.runrecord import RunRecord, add_beside_argument, script_command, write_json_and_markdown  # noqa: E402
from retrack.sampling import sample  # noqa: E402
from retrack.split import unlearn_prompt  # noqa: E402
from retrack.testing import build_tiny_sd_pipeline, clip_tokenizer  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
PUBLISHED_STEPS = PRESETS["sd"]["steps"]  # 30


def build_sd_v1_size_pipeline(device: str):
    """Stable Diffusion v1.4's architecture with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD v1 defaults
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512))
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Per-tensor sums and absolute sums in float64: equal before and after iff (practically) untouched."""
    with torch.no_grad():
        return torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in module.state_dict().values()]).cpu()


def test_images(backend: LatentBackend) -> tuple[torch.Tensor, torch.Tensor]:
    """2 forget and 6 retain random images at the model's size."""
    g = torch.Generator().manual_seed(0)
    size = backend.image_size
    forget, retain = (torch.rand(n, 3, size, size, generator=g) * 2 - 1 for n in (2, 6))
    return forget, retain


def run_once(pipeline_factory: Callable, model: str, device: str, precision: str, lora_rank: Optional[int],
             steps: int, accum: int, checkpointing: bool, lr: float, label: str = "") -> dict:
    backend = LatentBackend(pipeline_factory())
    if lora_rank:
        backend.add_lora(lora_rank)
    if checkpointing:
        backend.unet.enable_gradient_checkpointing()
    backend.to(device)
    frozen_before = [fingerprint(backend.vae), fingerprint(backend.text_encoder)]
    base = {n: p.detach().clone() for n, p in backend.unet.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in backend.unet.named_parameters() if p.requires_grad}

    forget, retain = test_images(backend)
    config = UnlearnConfig.preset("sd", k=4, steps=steps, grad_accum=accum, lr=lr, device=device,
                                  mixed_precision={"fp32": "no"}.get(precision, precision))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = unlearn_prompt(backend, forget, retain, PROMPT, config, knn_cache=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    images = sample(backend, 2, seed=0, steps=4, cond=backend.encode_prompt([PROMPT]), guidance=GUIDANCE).images

    step_seconds = [e.step_seconds for e in result.events]
    per_step = statistics.median(step_seconds[1:] or step_seconds)
    moved = [n for n, p in backend.unet.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    checks = {
        "finite losses": all(torch.isfinite(torch.tensor([e.loss, e.unlearn, e.retain, e.grad_norm])).all() for e in result.events),
        "trained weights moved": len(moved) > 0,
        "base UNet untouched": all(torch.equal(p, base[n]) for n, p in backend.unet.named_parameters() if n in base),
        "VAE + text encoder untouched": all(torch.equal(a, b) for a, b in zip(frozen_before, [fingerprint(backend.vae), fingerprint(backend.text_encoder)])),
        "finite samples": bool(torch.isfinite(images).all()),
    }
    return {
        "model": model, "run": label or precision, "precision": precision,
        "mode": f"LoRA r{lora_rank}" if lora_rank else "full UNet", "checkpointing": checkpointing,
        "batch x accum": f"{config.batch_size} x {accum}", "lr": lr,
        "trainable": sum(p.numel() for p in backend.trainable_parameters()),
        "s/step": per_step, "first step": step_seconds[0], "peak GiB": peak,
        f"projected {PUBLISHED_STEPS} steps (s)": per_step * PUBLISHED_STEPS + step_seconds[0] - per_step,
        "fp16 overflow skips": result.overflow_skips, "final loss": result.events[-1].loss,
        "failed": [name for name, ok in checks.items() if not ok],
    }


# ----------------------------------------------------------------------------- gradient comparison
def micro_batch_gradient(backend: LatentBackend, batch: objectives.Batch, device: str, precision: str,
                         loss_scaling: bool) -> tuple[torch.Tensor, dict]:
    """The ReTrack loss's gradient on `batch` (same t and noise every call: a fresh seeded
    generator), flattened to one fp32 vector. fp16 with `loss_scaling` runs torch's GradScaler the
    way the engine does: scale, backward, unscale; on an overflow the scale halves and it retries."""
    parameters = backend.trainable_parameters()
    dtype = AUTOCAST_DTYPES[precision]
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16" and loss_scaling)
    holder = torch.optim.SGD(parameters, lr=0.0)  # never stepped: the scaler unscales through it
    params = objectives.Params(lam=PRESETS["sd"]["lam"])
    for attempt in range(1, 41):
        holder.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else torch.enable_grad():
            terms = objectives.retrack(backend.denoise, batch, backend.schedule, torch.Generator().manual_seed(7), params)
        scaler.scale(terms.loss).backward()
        scale = scaler.get_scale()
        scaler.unscale_(holder)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in parameters])
        scaler.update()
        if torch.isfinite(flat).all() or not scaler.is_enabled():
            return flat, {"loss scale": scale, "attempts": attempt}
    raise RuntimeError("fp16 gradients overflowed at every loss scale tried")


def gradient_comparison(pipeline_factory: Callable, model: str, device: str) -> list[dict]:
    """One ReTrack micro-batch (batch 1, as published), its gradient in each precision, compared with fp32."""
    backend = LatentBackend(pipeline_factory()).to(device)
    backend.unet.train()
    forget, retain = (backend.encode(x)[:1] for x in test_images(backend))
    neighbours = backend.encode(test_images(backend)[1])[:4].unsqueeze(0)  # K = 4 neighbours
    cond = backend.encode_prompt([PROMPT]).to(device)
    batch = objectives.Batch(forget=forget.to(device), neighbours=neighbours.to(device), retain=retain.to(device),
                             forget_cond=cond, retain_cond=cond)
    reference = micro_batch_gradient(backend, batch, device, "no", loss_scaling=False)[0].double()
    rows = []
    for precision, scaling, label in (("bf16", False, "bf16"), ("fp16", True, "fp16 + scaler"),
                                      ("fp16", False, "fp16, no scaling")):
        grad, info = micro_batch_gradient(backend, batch, device, precision, scaling)
        grad = grad.double()  # the comparison itself in float64
        finite = bool(torch.isfinite(grad).all())
        error = float((grad - reference).norm() / reference.norm()) if finite else math.inf
        cosine = float(torch.nn.functional.cosine_similarity(grad, reference, dim=0)) if finite else math.nan
        lost = float(((grad == 0) & (reference != 0)).float().mean())
        rows.append({"model": model, "precision": label, "relative L2 error": error, "cosine": cosine,
                     "underflowed share": lost, **info, "finite": finite})
    return rows


# ----------------------------------------------------------------------------- main
def print_run(row: dict) -> None:
    if "s/step" not in row:
        print(f"{row['model']:6} {row['run']:8} {row['mode']:10} FAILED: {row['failed'][0]}", flush=True)
        return
    print(f"{row['model']:6} {row['run']:8} {row['mode']:10} {'yes' if row['checkpointing'] else 'no':5} "
          f"{row['batch x accum']:>7} {row['trainable']:>11,} {row['s/step']:>8.3f} {row['first step']:>8.3f} "
          f"{row['peak GiB']:>8.2f} {row[f'projected {PUBLISHED_STEPS} steps (s)']:>9.1f} {row['fp16 overflow skips']:>5} "
          f"{'ok' if not row['failed'] else 'FAILED: ' + ', '.join(row['failed'])}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per tiny run (the first is warm-up)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step of the tiny mixed-precision runs")
    parser.add_argument("--sd-size", choices=["auto", "yes", "no"], default="auto",
                        help="also run the SD v1-size model (auto: on a GPU only)")
    parser.add_argument("--sd-steps", type=int, default=3)
    parser.add_argument("--out", help="also write every row to this JSON file")
    add_beside_argument(parser)
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    record = RunRecord.start(script_command(__file__), args.beside, args.device)
    print(f"device {record.device}", flush=True)
    published = dict(accum=PRESETS["sd"]["grad_accum"], lr=PRESETS["sd"]["lr"])

    tiny = lambda: build_tiny_sd_pipeline(seed=0, image_size=64)  # noqa: E731
    # (factory, model, precision, LoRA rank, steps, accum, checkpointing, lr, label)
    runs = [(tiny, "tiny", "fp32", None, args.steps, published["accum"], False, published["lr"], "default")]
    runs += [(tiny, "tiny", p, r, args.steps, args.accum, True, 1e-4, p) for p in ("fp32", "fp16", "bf16") for r in (None, 4)]
    models = [(tiny, "tiny")]
    if args.sd_size == "yes" or (args.sd_size == "auto" and on_gpu):
        sd = lambda: build_sd_v1_size_pipeline(args.device)  # noqa: E731
        models.append((sd, "sd-v1"))
        runs += [(sd, "sd-v1", "fp32", None, args.sd_steps, published["accum"], False, published["lr"], "default")]
        runs += [(sd, "sd-v1", p, r, args.sd_steps, published["accum"], True, published["lr"], p)
                 for p, r in (("fp16", None), ("bf16", None), ("bf16", 8))]

    rows, started = [], time.perf_counter()
    print(f"{'model':6} {'run':8} {'mode':10} {'ckpt':5} {'batch':>7} {'trainable':>11} {'s/step':>8} {'1st step':>8} "
          f"{'peak GiB':>8} {f'{PUBLISHED_STEPS} steps':>9} {'skips':>5}  checks", flush=True)
    for factory, model, precision, rank, steps, accum, checkpointing, lr, label in runs:
        try:
            row = run_once(factory, model, args.device, precision, rank, steps, accum, checkpointing, lr, label)
        except Exception as exc:  # report and go on: one failing run must not hide the others
            row = {"model": model, "run": label, "precision": precision, "mode": f"LoRA r{rank}" if rank else "full UNet",
                   "failed": [f"{type(exc).__name__}: {exc}"]}
        rows.append(row)
        print_run(row)
        if on_gpu:
            torch.cuda.empty_cache()

    print("gradient of one micro-batch vs fp32:", flush=True)
    comparisons = []
    for factory, model in models:
        try:
            found = gradient_comparison(factory, model, args.device)
        except Exception as exc:
            found = [{"model": model, "precision": "all", "failed": [f"{type(exc).__name__}: {exc}"]}]
        for row in found:
            if "failed" in row:
                print(f"{model:6} FAILED: {row['failed'][0]}", flush=True)
                continue
            print(f"{model:6} {row['precision']:17} relative L2 error {row['relative L2 error']:.2e}, cosine "
                  f"{row['cosine']:.6f}, underflowed {row['underflowed share']:.2%}, loss scale {row['loss scale']:g} "
                  f"(attempt {row['attempts']})", flush=True)
        comparisons += found
        if on_gpu:
            torch.cuda.empty_cache()

    failed = [r for r in rows + comparisons if r.get("failed")]
    # The scaled fp16 gradient must be finite; without scaling it may lose entries, which is the point.
    failed += [r for r in comparisons if r.get("precision") == "fp16 + scaler" and not r.get("finite")]
    if args.out:
        write_json_and_markdown(args.out, {**record.finish(), "runs": rows, "gradients": comparisons})
    print(f"{len(rows) + len(comparisons) - len(failed)}/{len(rows) + len(comparisons)} checks passed in "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
