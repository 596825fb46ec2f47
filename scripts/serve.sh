#!/usr/bin/env bash
# Start inferd on its default model (Qwen2.5-Coder-0.5B-Instruct) at http://127.0.0.1:8000.
# Fetches the model on first use, builds in release, then serves; extra arguments go to
# `inferd serve` (see `inferd serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-models.sh
cargo build --release --bin inferd
exec target/release/inferd serve "$@"
