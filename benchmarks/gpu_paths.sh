#!/usr/bin/env bash
# The GPU-only code paths on the tiny model, in a few minutes: an AOTInductor fp8 engine directory built on CUDA
# (static FP8 linears, FP8 attention where a kernel runs, CUDA-graph replay), an edit from it, and `compare` on CUDA
# of stage 0, stage 3 (eager) and those engines. Writes OUT/gpu_paths.log, OUT/edit.png and OUT/compare/.
#     bash benchmarks/gpu_paths.sh OUT
set -uo pipefail
out="${1:?usage: gpu_paths.sh OUT}"
mkdir -p "$out"
work="$(mktemp -d)"
range=(--min-resolution 256x256 --opt-resolution 512x512 --max-resolution 1024x1024)
{
  python3 -m fluxtrt build --model tiny --backend aotinductor --precision fp8 --device cuda --cuda-graph \
    --calibration-edits 1 "${range[@]}" --out "$work/aoti-fp8" 2>&1 | tail -12
  echo "build exit ${PIPESTATUS[0]}"
  python3 -m fluxtrt inspect "$work/aoti-fp8" 2>&1 | grep -E "attention|fp8|cuda_graph|sm|gpu"
  python3 -m fluxtrt infer --engines "$work/aoti-fp8" --image examples/input.png --prompt "make the house blue" \
    --out "$out/edit.png" 2>&1 | tail -12
  echo "infer exit ${PIPESTATUS[0]}"
  python3 -m fluxtrt compare --model tiny --device cuda --stages 0,3:compile=off --engines "$work/aoti-fp8" \
    --runs 2 --report "$out/compare" 2>&1 | tail -16
  echo "compare exit ${PIPESTATUS[0]}"
} 2>&1 | tee "$out/gpu_paths.log"
rm -rf "$work"
