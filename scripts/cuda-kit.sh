#!/usr/bin/env bash
# Installs a CUDA 13.0 build kit (nvcc + headers + link libs) from PyPI wheels, no GPU needed.
# Usage: scripts/cuda-kit.sh [KIT_DIR]   (default ~/.cache/cuda13-kit); prints the env to source.
set -euo pipefail
KIT=${1:-$HOME/.cache/cuda13-kit}
T=$KIT/nvidia/cu13
if [ -x "$T/bin/nvcc" ] && [ -e "$T/lib/stubs/libcuda.so" ]; then echo "kit present: $T" >&2; else
  mkdir -p "$KIT/whl"
  # Pin 13.0: the driver on the H200 box is r580 (CUDA 13.0). PTX from nvcc >= 13.1 (ISA >= 9.1)
  # fails there with CUDA_ERROR_UNSUPPORTED_PTX_VERSION; cudarc also needs the 13.x sonames.
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$KIT/whl" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
  for w in "$KIT"/whl/*.whl; do python3 -m zipfile -e "$w" "$KIT"; done
  chmod +x "$T"/bin/* "$T"/nvvm/bin/*
  rm -rf "$KIT/whl"
  # nvcc.profile expects the toolkit's targets/x86_64-linux layout; cudarc/cudaforge look in lib64.
  mkdir -p "$T/targets" "$T/lib/stubs"; ln -sfn .. "$T/targets/x86_64-linux"; ln -sfn lib "$T/lib64"
  for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sf "$f" "$T/lib/${f%%.so*}.so"; done
  # libcuda.so comes with the driver, not with any wheel: make a link-time stub (soname libcuda.so.1)
  # exporting every driver symbol cudarc binds. Never put it on LD_LIBRARY_PATH at run time.
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print "int " $4 "(void){return 999;}"}' \
    | sort -u > "$KIT/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$T/lib/stubs/libcuda.so" "$KIT/libcuda_stub.c"
fi
cat <<ENV
export CUDA_HOME=$T PATH=$T/bin:\$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$T/lib:$T/lib/stubs
ENV
