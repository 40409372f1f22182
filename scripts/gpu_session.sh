#!/usr/bin/env bash
# What this project checks on a lent GPU machine, as one prepared command per device call.
#
#   bash scripts/gpu_session.sh checks    # ~5 min: step timing of every method on the GPU (issue:
#                                         # ReTrack vs SISS/EraseDiff s/step), the Stable Diffusion
#                                         # check (the default fp32 whole-UNet batch 1 x 16 path at SD v1
#                                         # size: s/step, peak memory, projected 30 steps; fp16/bf16/LoRA;
#                                         # fp32 vs bf16 vs fp16+scaler gradients), the out-of-memory check
#   bash scripts/gpu_session.sh rebuild   # ~9 min: retrain setting v1's model, oracle and CLIP
#                                         # scorer (150 s each) and evaluate; a tar of the folder. The
#                                         # shipped assets/builtin is setting v2: its commands are in
#                                         # assets/builtin/README.md ("Rebuilding")
#
# The GPU image has torch, accelerate, transformers, peft and the rest, but not diffusers,
# open_clip and two of their needs, and it has no network. Prepare them here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth importlib_metadata==8.7.0
#   python3 -c "from retrack.data import build_digits_tshirt; build_digits_tshirt()" && cp ~/.cache/retrack/digits_tshirt_*.npz .whl/
# then call the device tool with carry [".whl"], e.g. command "bash scripts/gpu_session.sh checks".
# Everything it writes goes under $OUT (the device tool's folder; ./gpu-out when run by hand).
set -uo pipefail
what=${1:-checks}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 RETRACK_CACHE=/tmp/retrack-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
status=0
case "$what" in
  checks)
    timeout 150 python3 benchmarks/step_timing.py --device cuda --rounds 5 --out "$OUT/step_timing_cuda.json" \
      2>&1 | tee "$OUT/step_timing.log" || status=1
    timeout 300 python3 benchmarks/gpu_sd_check.py --out "$OUT/gpu_sd_check.json" 2>&1 \
      | tee "$OUT/gpu_sd_check.log" || status=1
    timeout 120 python3 benchmarks/gpu_oom_check.py 2>&1 | tee "$OUT/gpu_oom_check.log" || status=1
    ;;
  rebuild)
    data=$(ls .whl/digits_tshirt_*.npz | head -1)
    timeout 560 python3 scripts/build_builtin.py --setting v1 --out "$OUT/builtin" --what all --device cuda --batch 512 \
      --max-seconds 150 --data "$data" 2>&1 | tee "$OUT/build.log" || status=1
    tar czf "$OUT/builtin.tgz" -C "$OUT" builtin && rm -rf "$OUT/builtin"
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh checks|rebuild" >&2
    exit 2
    ;;
esac
exit $status
