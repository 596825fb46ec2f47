#!/usr/bin/env bash
# Runs the CUDA build of inferd on a GPU machine, from the repo root, with the `.gpu` folder
# made by scripts/build-cuda.sh beside it. Finds CUDA 13 user-space libraries (the driver's
# libcuda, and cudart/cublas/curand from /usr/local/cuda or a PyTorch install's nvidia-* wheels),
# checks that the binary links, logs to $OUT (or /tmp/gpu-out), and runs:
#   bash .gpu/gpu-run.sh bench --self-serve --synthetic-model llama-1b-shape --device cuda \
#        --concurrency 1,16,64 --num-requests 128 --prompt-tokens 128 --max-tokens 128
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/${LOG:-gpu-run.log}") 2>&1
BIN=.gpu/inferd
if [ -f .gpu/inferd.xz ]; then   # python's lzma: no dependence on an xz binary there
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    .gpu/inferd.xz /tmp/inferd && chmod +x /tmp/inferd && BIN=/tmp/inferd
fi
echo "== host: $(uname -m), $(. /etc/os-release; echo "$PRETTY_NAME"), $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
NV=$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0])' 2>/dev/null || true)
export LD_LIBRARY_PATH="${NV:+$NV/lib:}/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
if ldd "$BIN" | grep -q 'not found'; then
  ldd "$BIN" | grep 'not found'
  echo "missing CUDA libraries; candidates:"
  find / -xdev \( -name 'libcuda.so.1' -o -name 'libcudart.so.13*' -o -name 'libcublas.so.13*' \
     -o -name 'libcurand.so.10*' \) 2>/dev/null | head -20
  exit 2
fi
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/cuda-jit-cache}   # the driver's PTX JIT cache
echo "== $BIN $*"
timeout "${RUN_TIMEOUT:-480}" "$BIN" "$@"; rc=$?
echo "== rc=$rc"
nvidia-smi --query-gpu=clocks.sm,memory.used --format=csv
exit $rc
