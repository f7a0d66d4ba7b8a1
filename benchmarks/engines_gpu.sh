#!/usr/bin/env bash
# The README's full-size engines on a GPU machine, measured in calls that each fit 10 minutes; run the second at once
# after the first, on the same machine, so that the engines are still there.
#     bash benchmarks/engines_gpu.sh OUT build   # the FP8 AOTInductor build of random-full for 1024x1024 (timed, with
#                                              # inductor's phases in OUT/build/manifest.json), the up-to-date rerun,
#                                              # then benchmarks.lora_gpu on the engines
#     bash benchmarks/engines_gpu.sh OUT serve   # finishes the build if the first call stopped it, then
#                                              # benchmarks.serve_gpu (infer from process start, the first edit, the
#                                              # concurrent and pinned loads, compare, serve under load)
# Installs the wheels the machine lacks from .whl/ when there (scripts/gpu_machine.sh). BUILD_TIMEOUT (default 440) bounds the first build.
set -uo pipefail
out="${1:?usage: engines_gpu.sh OUT build|serve}"
part="${2:-}"
case "$part" in build|serve) ;; *) echo "engines_gpu.sh: part is '$part': expected build or serve" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
source scripts/gpu_machine.sh
engines=build/headline/random-full-aotinductor-fp8-1024x1024
build=(python3 -m fluxtrt build --model random-full --backend aotinductor --precision fp8 --device cuda
       --aoti-weights external --min-resolution 1024x1024 --opt-resolution 1024x1024 --max-resolution 1024x1024
       --out "$engines")
mkdir -p "$out/build"
machine_environment "$out"
timed() {  # LABEL TIMEOUT CMD...: CMD's output to OUT/build/LABEL.log, its exit status and wall seconds at the end
  local label="$1" limit="$2" start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$out/build/$label.log" 2>&1
  local status=$?
  echo "$label: exit $status in $((SECONDS - start)) s" | tee -a "$out/build/$label.log"
  return "$status"
}
if [ "$part" = build ]; then
  timed build "${BUILD_TIMEOUT:-440}" "${build[@]}"
  status=$?
  cp "$engines/manifest.json" "$out/build/" 2>/dev/null
  [ "$status" -eq 0 ] || exit "$status"
  timed rebuild 60 "${build[@]}"
  timeout 150 python3 -m benchmarks.lora_gpu --engines "$engines" --out "$out/lora" --warmup 2 --iters 5 \
    > "$out/lora.log" 2>&1
  echo "lora_gpu: exit $?"
  exit 0
fi
timed build-again 420 "${build[@]}" || exit $?
cp "$engines/manifest.json" "$out/build/" 2>/dev/null
left=$(( 570 - SECONDS ))
python3 -m benchmarks.serve_gpu --engines "$engines" --out "$out/serve" --budget-s "$left" --runs 2 \
  --concurrency 1,4 --requests 1 --skip warmup_edit > "$out/serve.log" 2>&1
status=$?
rm -f "$out/serve/infer.png"  # a device call returns at most 8 files: keep them for the records and logs
echo "serve_gpu: exit $status"
exit "$status"
