"""What every part of the build shares: the device, progress lines, and the facts each record cites
(device name, precision, library versions, the command) written as JSON atomically."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from retrack.atomic import write_file_atomically
from retrack.runrecord import script_command


def pick_device(requested: str | None) -> torch.device:
    """--device, else CUDA when available (with TF32 and cuDNN autotuning), else the CPU."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def uses_bf16(args: argparse.Namespace, device: torch.device) -> bool:
    return args.bf16 and device.type == "cuda"


def fused(device: torch.device) -> dict:
    """AdamW's keyword for its fused CUDA kernel (not available on the CPU)."""
    return {"fused": True} if device.type == "cuda" else {}


def log(part: str, message: str) -> None:
    print(f"[{part}] {message}", flush=True)


def versions() -> dict:
    import diffusers

    found = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import open_clip

        found["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return found


def build_command() -> str:
    """The command that started this build (the parent's, when run as a part of --what all)."""
    return os.environ.get("RETRACK_BUILD_COMMAND") or script_command("scripts/build_builtin.py")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically; a unique temporary name lets concurrent parts write the same file."""
    write_file_atomically(path, json.dumps(data, indent=2, default=str) + "\n")
