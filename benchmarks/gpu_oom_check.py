"""GPU check of out-of-memory handling: a real CUDA out-of-memory in the middle of unlearning is
reported as `OutOfMemory` (quickly: not a hang, not a traceback), what the failed run held is
freed, and the next run on the same GPU in the same process works; the same through an app job.

    python benchmarks/gpu_oom_check.py

The GPU is made small with `torch.cuda.set_per_process_memory_fraction` (1 GiB), so a large batch
overflows it at once and for real: the caching allocator raises torch.OutOfMemoryError; nothing is
injected. Models and data are tiny and random. Prints one line per check and exits with status 1
if any failed.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retrack.backends import PixelBackend  # noqa: E402
from retrack.engine import UnlearnConfig, unlearn  # noqa: E402
from retrack.errors import OutOfMemory  # noqa: E402
from retrack.runrecord import describe_machine  # noqa: E402

LIMIT_BYTES = 2**30
failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def pixel_model(size: int, channels: int, widths: tuple[int, ...]):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * len(widths),
                       up_block_types=("UpBlock2D",) * len(widths), norm_num_groups=4)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def engine_checks() -> None:
    pipeline = pixel_model(32, 3, (32, 64, 64))
    backend = PixelBackend(pipeline.unet.to("cuda"), pipeline.scheduler)
    g = torch.Generator().manual_seed(0)
    forget, retain = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    torch.cuda.synchronize()
    held_before = torch.cuda.memory_allocated()

    started = time.perf_counter()
    try:
        unlearn(backend, forget, retain, UnlearnConfig(k=3, steps=3, batch_size=8192, device="cuda"), knn_cache=None)
        check("engine: batch 8192 in 1 GiB", False, "no out-of-memory error")
    except OutOfMemory as exc:
        seconds = time.perf_counter() - started
        expected = "the GPU (cuda) ran out of memory with batch size 8192"
        check("engine: batch 8192 in 1 GiB", expected in str(exc) and seconds < 60,
              f"OutOfMemory after {seconds:.2f} s: {exc}")
    gc.collect()
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - held_before
    check("engine: memory released", left < 16 * 2**20,
          f"{left / 2**20:.1f} MiB still allocated beyond the model; reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB")

    result = unlearn(backend, forget, retain, UnlearnConfig(k=3, steps=3, batch_size=8, device="cuda"), knn_cache=None)
    check("engine: next run on the same GPU", len(result.events) == 3 and np.isfinite(result.events[-1].loss),
          f"3 steps, final loss {result.events[-1].loss:.4g}, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def app_job_checks(root: Path) -> None:
    from PIL import Image

    from retrack.job_settings import EvalSettings
    from retrack.forget_set import build_forget_set
    from retrack.jobs import Job
    from retrack.models import open_model
    from retrack.testing import build_tiny_clip

    pixel_model(8, 1, (8, 16)).save_pretrained(root / "model")
    build_tiny_clip(root / "clip")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "data" / f"{i:02d}.png")
    model = open_model(str(root / "model"), str(root / "data"))
    forget = build_forget_set(model, [0, 1])
    evaluation = EvalSettings(n_samples=4, sampling_steps=3, trajectory_points=2)

    started = time.perf_counter()
    failed = Job(model, forget, UnlearnConfig(k=3, steps=3, batch_size=65536, device="cuda"), evaluation,
                 root / "out").start().wait(timeout=300)
    seconds = time.perf_counter() - started
    expected = "the GPU (cuda) ran out of memory with batch size 65536"
    check("app job: batch 65536 in 1 GiB", failed.phase == "failed" and expected in failed.message,
          f"{failed.phase} after {seconds:.1f} s: {failed.message}")
    check("app job: nothing saved", failed.model_dir is None and not list((root / "out").rglob("model_index.json")),
          "no model folder written")
    done = Job(model, forget, UnlearnConfig(k=3, steps=3, batch_size=8, device="cuda"), evaluation,
               root / "out").start().wait(timeout=300)
    check("app job: next job on the same GPU", done.phase == "done", done.message)


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU here: nothing to check")
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(LIMIT_BYTES / total)
    print(f"{describe_machine('cuda')}, limited to {LIMIT_BYTES / 2**30:.0f} GiB of {total / 2**30:.0f} GiB", flush=True)
    engine_checks()
    with tempfile.TemporaryDirectory() as folder:
        app_job_checks(Path(folder))
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
