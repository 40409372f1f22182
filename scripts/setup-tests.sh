#!/usr/bin/env bash
# Installs what the test suite needs: the Python packages, Chromium for the browser test and
# Open MPI (mpirun) for the `accelerate launch --cpu --num_processes 2` test.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v mpirun >/dev/null || missing+=(openmpi-bin)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} missing; install with 'sudo apt-get install ${missing[*]}' or the tests that need them are skipped" >&2
  fi
fi
python3 -m pip install -q -r requirements.txt -r requirements-test.txt
