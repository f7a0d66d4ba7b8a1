#!/usr/bin/env bash
# The GPU tier on a GPU machine, in one call: installs the wheels the machine lacks (from .whl/, when there), runs
# `pytest -m gpu`, then (with --all) the rest of the suite, and keeps the logs.
#     bash scripts/gpu_tests.sh OUT [--all]
# Writes OUT/gpu_tier.log (and OUT/suite.log with --all), and OUT/environment.txt (GPU, driver, torch).
set -uo pipefail
out="${1:?usage: gpu_tests.sh OUT [--all]}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fluxtrt-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/fluxtrt-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  git log -1 --format='fluxtrt commit %H' 2>/dev/null
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
python3 -m pytest -m gpu -v -ra --durations=15 2>&1 | tee "$out/gpu_tier.log"
status=${PIPESTATUS[0]}
if [ "${2:-}" = "--all" ]; then
  python3 -m pytest -q -ra -m "not gpu" -x --durations=10 2>&1 | tee "$out/suite.log"
  rest=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] && status=$rest
fi
exit "$status"
