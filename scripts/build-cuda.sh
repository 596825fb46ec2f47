#!/usr/bin/env bash
# Builds inferd with `--features cuda` on a machine without a GPU (or with one), and packs the
# binary for a GPU machine that has no Rust toolchain.
#
#   scripts/build-cuda.sh            # build target-cuda/release/inferd, pack .gpu/
#
# Needs: Rust, Python 3 + pip (for the CUDA 13.0 kit, ~45 s from PyPI wheels, cached in
# ~/.cache/cuda13-kit; a user with their own CUDA >= 12 toolkit can set CUDA_HOME and
# CUDA_COMPUTE_CAP instead, see the README). The first build takes 18-25 min on 2 cores
# (candle's kernels are compiled by nvcc); later builds are incremental.
# Output: .gpu/inferd.xz (stripped, xz) and .gpu/gpu-run.sh, ready to carry to the GPU machine:
#   bash .gpu/gpu-run.sh bench --self-serve --synthetic-model llama-1b-shape --device cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch -q
if [ -z "${CUDA_HOME:-}" ]; then
  eval "$(bash scripts/cuda-kit.sh)"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
cargo build --release --features cuda --target-dir target-cuda --bin inferd
mkdir -p .gpu
strip -o .gpu/inferd target-cuda/release/inferd
xz -T0 -6 -f .gpu/inferd
cp scripts/gpu-run.sh .gpu/gpu-run.sh
ls -la .gpu
