"""Unlearn images from a Stable Diffusion model, on one process or many (data parallel).

    python scripts/sd_unlearn_job.py --model SD --forget forget/ --retain retain/ --prompt "..." --out OUT
    accelerate launch --num_processes 4 scripts/sd_unlearn_job.py ...          # 4 GPUs, same code
    accelerate launch --cpu --num_processes 2 --mpirun_hostfile HOSTS scripts/sd_unlearn_job.py ... --device cpu
                      # CPU processes: accelerate starts them through Open MPI's mpirun, HOSTS
                      # holding "localhost slots=2"; without a host file it starts only one

Every process loads the model and the images, draws its own rows (the engine averages gradients
across processes before each update, so all copies stay identical), and writes a sha256 of its
final trainable weights to OUT.digests/rank<N>.txt so the agreement can be checked. Only the
main process saves the model. --batch is the total over all processes and must divide evenly.
Mixed precision follows `accelerate launch --mixed_precision` unless --mixed-precision is given.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import load_backend  # noqa: E402
from retrack.engine import UnlearnConfig, save_model, training_device  # noqa: E402
from retrack.images import expand_paths, load_images  # noqa: E402
from retrack.split import unlearn_prompt  # noqa: E402


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Stable Diffusion folder (or Hub id when online)")
    p.add_argument("--forget", nargs="+", required=True, help="images or folders to forget")
    p.add_argument("--retain", required=True, help="folder of images to keep")
    p.add_argument("--prompt", required=True, help="prompt (or modified prompt) to condition the fine-tune on")
    p.add_argument("--out", required=True, help="new folder for the unlearned model (or LoRA adapter)")
    p.add_argument("--method", default="retrack")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=1, help="rows per branch per step, over all processes")
    p.add_argument("--accum", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, help="train a LoRA adapter of this rank instead of the UNet")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="default: accelerate launch's --mixed_precision (fp16 adds gradient scaling)")
    p.add_argument("--device", default="auto", help="auto (this process's GPU when present) or cpu")
    args = p.parse_args()

    config = UnlearnConfig.preset("sd", method=args.method, steps=args.steps, batch_size=args.batch,
                                  grad_accum=args.accum, lr=args.lr, k=args.k, seed=args.seed,
                                  mixed_precision=args.mixed_precision, device=args.device)
    state = PartialState(cpu=args.device == "cpu")
    backend = load_backend(args.model, device=training_device(args.device), lora_rank=args.lora_rank,
                           gradient_checkpointing=args.gradient_checkpointing)
    forget = load_images(expand_paths(args.forget), backend.image_size, backend.channels).tensor
    retain = load_images(expand_paths([args.retain]), backend.image_size, backend.channels).tensor

    def report(event) -> None:
        if state.is_main_process:
            print(f"step {event.step}/{event.steps} loss {event.loss:.4g} grad {event.grad_norm:.3g} "
                  f"({event.step_seconds:.2f} s)", flush=True)

    result = unlearn_prompt(backend, forget, retain, args.prompt, config, on_step=report)

    digests = Path(f"{args.out}.digests")
    digests.mkdir(parents=True, exist_ok=True)
    (digests / f"rank{state.process_index}.txt").write_text(weights_digest(backend.unet) + "\n")
    if state.is_main_process:
        saved = save_model(backend, args.out, result.metadata(prompt=args.prompt))
        print(f"saved {saved}: {result.world_size} process(es), mixed precision {result.config.mixed_precision}, "
              f"{result.seconds_per_step:.3f} s/step", flush=True)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
