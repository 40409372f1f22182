"""Faults during a run: divergence, running out of memory, cancelling and interrupted saves stop
with a reason, write nothing that looks like a model, and leave the app ready for the next job.

Faults are injected where they would really arise: NaN weights in a saved model, a network call
that starts returning inf, an allocation no machine can satisfy (the real allocator error), a
CUDA out-of-memory error raised from the network call, a save stopped after its files are written
(the disk as a kill would leave it) and a full disk while overwriting. benchmarks/gpu_oom_check.py
does the out-of-memory part with a real CUDA out-of-memory on a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from diffusers import DDPMPipeline

from helpers import folder_digest
from retrack.job_settings import EvalSettings
from retrack.backends import PixelBackend, load_backend
from retrack.cli import main
from retrack.engine import UnlearnConfig, save_model, unlearn
from retrack.errors import OutOfMemory, is_out_of_memory
from retrack.forget_set import build_forget_set
from retrack.jobs import Job
from retrack.models import open_model


def nothing_written(out: Path) -> bool:
    """Neither the folder nor a hidden partial one beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def impossible_allocation() -> None:
    """Ask the CPU allocator for 2**60 bytes, more than any address space: it fails at once
    with the error a real out-of-memory gives ("DefaultCPUAllocator: can't allocate memory")."""
    torch.empty(2**60, dtype=torch.uint8)


def failing_from_step(n: int, fault: Callable[[torch.Tensor], torch.Tensor], calls_per_step: int = 2) -> Callable:
    """A PixelBackend.denoise that runs normally, then passes its output through `fault` from
    step n on. ReTrack on the CPU makes two network calls per step, one per branch."""
    real = PixelBackend.denoise
    calls = 0

    def denoise(self, x_t, t, cond):
        nonlocal calls
        calls += 1
        if calls > (n - 1) * calls_per_step:
            return fault(real(self, x_t, t, cond))
        return real(self, x_t, t, cond)

    return denoise


def failing_while(training: bool, fault: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A PixelBackend.denoise whose output passes through `fault` in training calls (gradients
    on) when `training`, else in sampling calls (gradients off)."""
    real = PixelBackend.denoise

    def denoise(self, x_t, t, cond):
        eps = real(self, x_t, t, cond)
        return fault(eps) if torch.is_grad_enabled() == training else eps

    return denoise


def cli_unlearn(model: Path, folders: tuple[Path, Path], out: Path, capsys) -> tuple[int, str]:
    forget, retain = folders
    code = main(["unlearn", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--k", "3",
                 "--steps", "6", "--batch", "4", "--device", "cpu", "--out", str(out)])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


# ============================================================================ divergence
def test_model_with_nan_weights_stops_at_step_one_and_writes_nothing(tiny_pixel_model, image_folders, tmp_path,
                                                                      capsys):
    pipeline = DDPMPipeline.from_pretrained(tiny_pixel_model)
    with torch.no_grad():
        next(pipeline.unet.parameters()).fill_(float("nan"))
    broken = tmp_path / "nan-model"
    pipeline.save_pretrained(broken)
    out = tmp_path / "outputs" / "clean"
    code, last = cli_unlearn(broken, image_folders, out, capsys)
    assert code == 1 and last.startswith("retrack: stopped: ") and "became nan at step 1" in last, last
    assert "lower learning rate" in last and nothing_written(out)


def test_loss_turning_inf_mid_run_stops_with_the_step_and_writes_nothing(tiny_pixel_model, image_folders, tmp_path,
                                                                         capsys, monkeypatch):
    monkeypatch.setattr(PixelBackend, "denoise", failing_from_step(3, lambda eps: eps * float("inf")))
    out = tmp_path / "outputs" / "clean"
    code, last = cli_unlearn(tiny_pixel_model, image_folders, out, capsys)
    assert code == 1 and re.search(r"retrack: stopped: the .*loss became (inf|nan) at step 3;", last), last
    assert nothing_written(out)


# ============================================================================ out of memory
def cuda_out_of_memory() -> None:
    """What the CUDA caching allocator raises (it cannot happen on a machine without a GPU)."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def python_out_of_memory() -> None:
    raise MemoryError()


@pytest.mark.parametrize("fault", [impossible_allocation, cuda_out_of_memory, python_out_of_memory],
                         ids=["cpu-allocator", "cuda", "python-memory-error"])
def test_out_of_memory_is_reported_as_such(tiny_pixel_model, fault, monkeypatch):
    def out_of_memory(eps):
        fault()
        return eps

    monkeypatch.setattr(PixelBackend, "denoise", failing_from_step(2, out_of_memory))
    g = torch.Generator().manual_seed(0)
    forget, retain = torch.rand(2, 1, 8, 8, generator=g), torch.rand(12, 1, 8, 8, generator=g)
    steps = []
    with pytest.raises(OutOfMemory, match=r"the CPU ran out of memory with batch size 4 .*lower the batch size"):
        unlearn(load_backend(tiny_pixel_model), forget, retain, UnlearnConfig(k=3, steps=5, batch_size=4),
                on_step=steps.append, knn_cache=None)
    assert len(steps) == 1


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the allocators' error types count


def test_cli_reports_out_of_memory_in_one_line_and_writes_nothing(tiny_pixel_model, image_folders, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(PixelBackend, "denoise", failing_from_step(2, lambda eps: impossible_allocation()))
    out = tmp_path / "outputs" / "clean"
    code, last = cli_unlearn(tiny_pixel_model, image_folders, out, capsys)
    assert code == 1 and last.startswith("retrack: stopped: the CPU ran out of memory with batch size 4"), last
    assert nothing_written(out)


def test_cli_sampling_out_of_memory_is_one_line_too(tiny_pixel_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PixelBackend, "denoise", failing_from_step(1, lambda eps: impossible_allocation()))
    grid = tmp_path / "grid.png"
    code = main(["sample", "--model", str(tiny_pixel_model), "--n", "2", "--steps", "2", "--device", "cpu",
                 "--out", str(grid)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("retrack: stopped: out of memory (") and "can't allocate memory" in last
    assert not grid.exists()


# ============================================================================ interrupted saves
def test_save_killed_while_writing_leaves_nothing_that_looks_like_a_model(tiny_pixel_model, tmp_path, monkeypatch):
    """A process killed while it saves leaves the disk as it is at that moment (no clean-up
    runs): look at it then. Every file is written under a hidden `.NAME.<id>.partial` name;
    the real name appears only by an atomic rename once the folder is complete."""
    backend = load_backend(tiny_pixel_model)
    out = tmp_path / "clean"
    write, at_the_kill = backend.save_pretrained, {}

    def write_then_look(folder: Path) -> None:
        write(folder)  # every file of the model is on disk now, and the kill strikes
        at_the_kill["entries"] = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(ValueError, match="not a diffusers model folder"):
            load_backend(out)

    monkeypatch.setattr(backend, "save_pretrained", write_then_look)
    save_model(backend, out, {"run": 1})
    assert len(at_the_kill["entries"]) == 1 and re.fullmatch(r"\.clean\.[0-9a-f]{8}\.partial", at_the_kill["entries"][0])
    assert [p.name for p in tmp_path.iterdir()] == ["clean"] and load_backend(out).image_size == 8


def test_failed_overwrite_keeps_the_previous_model_intact(tiny_pixel_model, tmp_path, monkeypatch):
    backend = load_backend(tiny_pixel_model)
    out = save_model(backend, tmp_path / "clean", {"run": 1})
    before = folder_digest(out)

    def disk_full(folder: Path) -> None:
        DDPMPipeline(unet=backend.unet, scheduler=backend.scheduler).save_pretrained(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backend, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(backend, out, {"run": 2}, overwrite=True)
    assert folder_digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["clean"]


# ============================================================================ the app's jobs
@pytest.fixture
def app_job(tiny_app_model, tmp_path):
    """make(config overrides) -> a started Job on the tiny app model (forget items #0 and #1)."""
    model = open_model(*map(str, tiny_app_model))
    forget = build_forget_set(model, [0, 1])
    evaluation = EvalSettings(n_samples=2, sampling_steps=2, trajectory_points=2)

    def make(**overrides) -> Job:
        config = UnlearnConfig(**{**dict(k=3, steps=3, batch_size=4), **overrides})
        return Job(model, forget, config, evaluation, tmp_path / "app-output").start()

    return make


@pytest.mark.parametrize("while_training", [False, True], ids=["sampling", "training"])
def test_app_job_out_of_memory_fails_with_a_message_and_the_next_job_runs(app_job, tmp_path, monkeypatch,
                                                                          while_training):
    with monkeypatch.context() as patch:
        patch.setattr(PixelBackend, "denoise", failing_while(while_training, lambda eps: impossible_allocation()))
        failed = app_job().wait(timeout=120)
    assert failed.phase == "failed" and failed.message.startswith("Stopped: the ")
    assert "ran out of memory" in failed.message and ("batch size 4" in failed.message) == while_training
    assert not list((tmp_path / "app-output").rglob("model_index.json"))
    assert app_job().wait(timeout=120).phase == "done"  # the device was released


def test_app_job_that_diverges_stops_with_the_reason_and_saves_nothing(app_job, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(PixelBackend, "denoise", failing_while(True, lambda eps: eps * float("nan")))
        state = app_job().wait(timeout=120)
    assert state.phase == "failed" and re.search(r"loss became nan at step 1;", state.message), state.message
    assert state.model_dir is None and not list((tmp_path / "app-output").rglob("model_index.json"))


def test_cancelled_app_job_leaves_the_device_free_for_the_next(app_job):
    job = app_job(steps=5000)
    for state in job.watch(timeout=120):
        if state.losses:  # training has started
            job.cancel()
    assert state.phase == "cancelled" and re.match(r"Cancelled after \d+ of 5000 training steps", state.message)
    assert state.model_dir is None
    assert app_job().wait(timeout=120).phase == "done"  # the device was released
