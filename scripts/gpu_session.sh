#!/usr/bin/env bash
# What this project checks on a lent GPU machine, as one prepared command per device call.
#
#   bash scripts/gpu_session.sh checks    # ~5 min: step timing of every method on the GPU (issue:
#                                         # ReTrack vs SISS/EraseDiff s/step), the Stable Diffusion
#                                         # check (the default fp32 whole-UNet batch 1 x 16 path at SD v1
#                                         # size: s/step, peak memory, projected 30 steps; fp16/bf16/LoRA;
#                                         # fp32 vs bf16 vs fp16+scaler gradients), the out-of-memory check
#   bash scripts/gpu_session.sh bench50k [SECONDS]   # the benchmark at the paper's 50,000 samples
#                                         # (ancestral DDPM-50; DDIM-50 at 5,000), eager bf16, 5,000 at
#                                         # once; methods in order of interest, stopped after SECONDS
#                                         # (default 500) and resumed by the next call while the machine
#                                         # is warm (/tmp/bench50k); a tar of the folder
#   bash scripts/gpu_session.sh checks+bench50k   # both in one call, the benchmark in what is left of 580 s
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
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 RETRACK_CACHE=/tmp/retrack-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
status=0
bench50k() {  # $1: seconds it may run (at least 10)
  mkdir -p /tmp/bench50k
  timeout $(($1 > 10 ? $1 : 10)) python3 -m retrack bench --methods pretrained,retrack,siss,oracle,vanilla,erasediff,neggrad \
    --samples 50000 --ddim-samples 5000 --sample-batch 5000 --device cuda --eager --out /tmp/bench50k \
    --beside "nothing (one process on a lent H200 machine, 16 CPU cores)" 2>&1 | tee -a /tmp/bench50k/log
  tar czf "$OUT/bench50k.tgz" -C /tmp bench50k
}
case "$what" in
  bench50k)
    bench50k "${2:-500}"
    ;;
  checks+bench50k)
    bash "$0" checks || status=1
    bench50k $((580 - SECONDS))
    ;;
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
    echo "usage: bash scripts/gpu_session.sh checks|bench50k [SECONDS]|checks+bench50k|rebuild" >&2
    exit 2
    ;;
esac
exit $status
