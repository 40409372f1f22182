#!/usr/bin/env bash
# Installs what the test suite needs: the Python packages, and Chromium for the browser test.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing; install it (e.g. 'sudo apt-get install chromium') or the browser test is skipped" >&2
  fi
fi
python3 -m pip install -q -r requirements-test.txt
