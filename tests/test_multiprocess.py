"""Data-parallel Stable Diffusion unlearning through `accelerate launch -m retrack unlearn`, on two
CPU processes.

The same command runs on N GPUs with `accelerate launch --num_processes N`; here two CPU
processes talk over gloo, started by either of accelerate's launchers:
- `--cpu --num_processes 2`: accelerate's multi-CPU mode. It starts the processes through MPI's
  `mpirun` and needs a host file (`--mpirun_hostfile`); without one, accelerate 1.x quietly starts
  a single process. scripts/setup-tests.sh installs Open MPI; without `mpirun` this case is skipped.
- `--multi_gpu --num_processes 2` with the CLI's `--device cpu`: torchrun's launcher, no MPI; it
  also passes `--mixed_precision bf16`, which the run (no precision of its own) must follow.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from helpers import REPO, free_port
from sd_fixtures import tiny_sd_model, write_images  # noqa: F401  (fixture)

from retrack.engine import weights_digest


def launcher_arguments(launcher: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """accelerate launch's arguments and extra environment for two local processes."""
    port = str(free_port())
    if launcher == "torchrun":
        return ["--multi_gpu", "--main_process_port", port], {}
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Open MPI: 'apt-get install openmpi-bin'); accelerate's --cpu mode needs it")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # Open MPI refuses to start as root unless told that is intended (CI runs as root).
    env = {"MASTER_PORT": port, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return ["--cpu", "--mpirun_hostfile", str(hostfile)], env


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["cpu-mpi", "torchrun"])
def test_two_processes_end_with_the_same_weights(tiny_sd_model, tmp_path, launcher):
    forget, retain = write_images(tmp_path / "forget", 2, seed=1), write_images(tmp_path / "retain", 6, seed=2)
    out = tmp_path / "unlearned"
    launch_args, launch_env = launcher_arguments(launcher, tmp_path)
    # The run sets no precision of its own: it runs in what accelerate launch says.
    precision = "bf16" if launcher == "torchrun" else "no"
    # PYTHONPATH: `-m retrack` from this checkout (the processes start in tmp_path).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRACK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **launch_env}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
               "-m", "retrack", "unlearn", "--model", str(tiny_sd_model), "--forget", str(forget), "--retain", str(retain),
               "--prompt", "a lighthouse", "--out", str(out), "--steps", "2", "--batch", "2", "--accum", "2",
               "--lr", "1e-3", "--k", "3", "--device", "cpu"]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"2 process(es), mixed precision {precision}," in run.stdout

    digests = json.loads((out / "retrack.json").read_text())["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]  # gradients were averaged: both copies took the same updates
    saved = UNet2DConditionModel.from_pretrained(out, subfolder="unet", local_files_only=True)
    original = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet", local_files_only=True)
    assert weights_digest(saved) == digests[0] != weights_digest(original)
