# Sourced by the scripts that run on a GPU machine (scripts/gpu_tests.sh, benchmarks/engines_gpu.sh), from the
# repository root: installs the wheels the machine lacks from .whl/ (when there) onto PYTHONPATH, and
# `machine_environment OUT` writes OUT/environment.txt (GPU, driver, torch, CUDA, cuDNN, commit, cores, CPU model and
# vector ISAs).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fluxtrt-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/fluxtrt-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
machine_environment() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    echo "fluxtrt commit ${FLUXTRT_COMMIT:-$(git log -1 --format=%H 2>/dev/null)}"
    echo "cores $(nproc)"
    # The host CPU, and the vector ISAs inductor probes with g++ (TRUSTED_HOST_ISA skips the base probe, not these).
    echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
    echo "cpu isa $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16|amx_fp16' | xargs)"
  } > "$1/environment.txt" 2>&1
}
