"""GPU check of the Stable Diffusion path: a few ReTrack steps in fp32, fp16 and bf16, full UNet
and LoRA, with gradient checkpointing, and the seconds each step takes.

    python benchmarks/gpu_sd_check.py                    # on the GPU: tiny model, then SD v1 size
    python benchmarks/gpu_sd_check.py --device cpu       # the same checks in fp32 on the CPU (tiny only)

Two models, both random (no weights can be downloaded on the test machines):
- "tiny": retrack.tiny's pipeline (64 px, a 0.2 M-parameter UNet): checks that every precision and
  mode runs on the device, the losses stay finite, only the UNet (or LoRA) weights move, and the
  VAE and the text encoder stay exactly as they were;
- "sd-v1" (GPU only, or --sd-size): a pipeline with Stable Diffusion v1.4's architecture and sizes
  (860 M-parameter UNet, 512 px images, 64 x 64 latents, 77 x 768 text embeddings) and the published
  batch 1 x accumulation 16, so the seconds per step are what a real SD unlearning run costs.

Prints one row per run and exits with status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends.latent import LatentBackend  # noqa: E402
from retrack.engine import UnlearnConfig  # noqa: E402
from retrack.sampling import sample  # noqa: E402
from retrack.split import unlearn_prompt  # noqa: E402
from retrack.tiny import build_tiny_sd_pipeline, clip_tokenizer  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


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


def run_once(pipeline_factory, model: str, device: str, precision: str, lora_rank, steps: int, accum: int) -> dict:
    backend = LatentBackend(pipeline_factory())
    if lora_rank:
        backend.add_lora(lora_rank)
    backend.unet.enable_gradient_checkpointing()
    backend.to(device)
    frozen_before = [fingerprint(backend.vae), fingerprint(backend.text_encoder)]
    base = {n: p.detach().clone() for n, p in backend.unet.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in backend.unet.named_parameters() if p.requires_grad}

    g = torch.Generator().manual_seed(0)
    size = backend.image_size
    forget, retain = (torch.rand(n, 3, size, size, generator=g) * 2 - 1 for n in (2, 6))
    config = UnlearnConfig.preset("sd", k=4, steps=steps, grad_accum=accum, lr=1e-4, device=device,
                                  mixed_precision={"fp32": "no"}.get(precision, precision))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = unlearn_prompt(backend, forget, retain, PROMPT, config, knn_cache=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    images = sample(backend, 2, seed=0, steps=4, cond=backend.encode_prompt([PROMPT]), guidance=7.5).images

    step_seconds = [e.step_seconds for e in result.events]
    moved = [n for n, p in backend.unet.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    checks = {
        "finite losses": all(torch.isfinite(torch.tensor([e.loss, e.unlearn, e.retain, e.grad_norm])).all() for e in result.events),
        "trained weights moved": len(moved) > 0,
        "base UNet untouched": all(torch.equal(p, base[n]) for n, p in backend.unet.named_parameters() if n in base),
        "VAE + text encoder untouched": all(torch.equal(a, b) for a, b in zip(frozen_before, [fingerprint(backend.vae), fingerprint(backend.text_encoder)])),
        "finite samples": bool(torch.isfinite(images).all()),
    }
    return {
        "model": model, "precision": precision, "mode": f"LoRA r{lora_rank}" if lora_rank else "full UNet",
        "trainable": sum(p.numel() for p in backend.trainable_parameters()),
        "s/step": statistics.median(step_seconds[1:] or step_seconds), "first step": step_seconds[0],
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan"),
        "final loss": result.events[-1].loss, "failed": [name for name, ok in checks.items() if not ok],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per run (the first is warm-up)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step for the tiny model")
    parser.add_argument("--sd-size", choices=["auto", "yes", "no"], default="auto",
                        help="also time the SD v1-size model (auto: on a GPU only)")
    parser.add_argument("--sd-steps", type=int, default=3)
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    precisions = ["fp32", "fp16", "bf16"] if on_gpu else ["fp32"]
    if not on_gpu:
        print("CPU: fp16/bf16 autocast needs a GPU, so only fp32 runs here")
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}", flush=True)

    runs = [("tiny", lambda: build_tiny_sd_pipeline(seed=0, image_size=64), p, r, args.steps, args.accum)
            for p in precisions for r in (None, 4)]
    if args.sd_size == "yes" or (args.sd_size == "auto" and on_gpu):
        # SD v1 size: the published batch 1 x 16; full UNet in fp16 and bf16, LoRA in bf16.
        sd = lambda: build_sd_v1_size_pipeline(args.device)  # noqa: E731
        runs += [("sd-v1", sd, p, r, args.sd_steps, 16) for p, r in (("fp16", None), ("bf16", None), ("bf16", 8))]

    rows, started = [], time.perf_counter()
    header = f"{'model':6} {'prec':5} {'mode':10} {'trainable':>11} {'s/step':>8} {'1st step':>8} {'peak GiB':>8} {'loss':>10}  checks"
    print(header, flush=True)
    for model, factory, precision, rank, steps, accum in runs:
        try:
            row = run_once(factory, model, args.device, precision, rank, steps, accum)
        except Exception as exc:  # report and go on: one failing precision must not hide the others
            row = {"model": model, "precision": precision, "mode": f"LoRA r{rank}" if rank else "full UNet",
                   "failed": [f"{type(exc).__name__}: {exc}"]}
        rows.append(row)
        if "s/step" in row:
            print(f"{row['model']:6} {row['precision']:5} {row['mode']:10} {row['trainable']:>11,} {row['s/step']:>8.3f} "
                  f"{row['first step']:>8.3f} {row['peak GiB']:>8.2f} {row['final loss']:>10.4g}  "
                  f"{'ok' if not row['failed'] else 'FAILED: ' + ', '.join(row['failed'])}", flush=True)
        else:
            print(f"{row['model']:6} {row['precision']:5} {row['mode']:10} FAILED: {row['failed'][0]}", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    failed = [r for r in rows if r["failed"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} runs passed in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
