#!/usr/bin/env bash
# Create (once) the virtual environment the Python test suites use, from
# tests/python/requirements.txt (pinned), under ${INFERD_CACHE:-~/.cache/inferd}; print its path.
# A changed requirements file gets a fresh environment.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/tests/python/requirements.txt"
cache="${INFERD_CACHE:-$HOME/.cache/inferd}"
venv="$cache/venv-$(sha256sum "$req" | cut -c1-12)"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv"
