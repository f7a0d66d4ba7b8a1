#!/usr/bin/env bash
# The GPU tier on a GPU machine, in one call: installs the wheels the machine lacks (from .whl/, when there), runs
# `pytest -m gpu` in one process, then (with --all) the rest of the suite spread over three quarters of the machine's
# cores, and keeps the logs with each part's wall time. --rest runs only that rest (a second call, where one call
# would not hold both).
#     bash scripts/gpu_tests.sh OUT [--all|--rest]
# Writes OUT/gpu_tier.log (and OUT/suite.log with --all or --rest), and OUT/environment.txt (GPU, driver, torch).
set -uo pipefail
out="${1:?usage: gpu_tests.sh OUT [--all|--rest]}"
mode="${2:-}"
case "$mode" in ""|--all|--rest) ;; *) echo "gpu_tests.sh: unknown option '$mode': expected --all or --rest" >&2; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
source scripts/gpu_machine.sh
export FLUXTRT_GPU_TIER_LOGS="$out"
# Each line of the log with the time it was written (a test's outcome line: when it ended).
stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }
machine_environment "$out"
cat "$out/environment.txt"
status=0
if [ "$mode" != "--rest" ]; then
  start=$SECONDS
  python3 -m pytest -m gpu -n 0 -v -ra --durations=15 2>&1 | stamp | tee "$out/gpu_tier.log"
  status=${PIPESTATUS[0]}
  echo "gpu tier: exit $status in $((SECONDS - start)) s" | tee -a "$out/gpu_tier.log"
fi
if [ -n "$mode" ]; then
  workers=$(( $(nproc) > 4 ? $(nproc) * 3 / 4 : 0 ))
  spread=(-n "$workers" --dist loadfile)
  start=$SECONDS
  # Every test's outcome goes to the log as it ends (a run cut short still names what failed); the summary to stdout.
  python3 -m pytest -v -rfE -m "not gpu" "${spread[@]}" --durations=10 2>&1 | stamp >"$out/suite.log"
  rest=${PIPESTATUS[0]}
  grep -E "^[0-9:]+ (FAILED|ERROR)|passed|failed" "$out/suite.log" | tail -40
  echo "rest of the suite: exit $rest in $((SECONDS - start)) s" | tee -a "$out/suite.log"
  [ "$status" -eq 0 ] && status=$rest
fi
exit "$status"
