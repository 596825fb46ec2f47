#!/usr/bin/env bash
# inferd vs llama.cpp's llama-server on the same GGUF, same machine, same threads.
#
# Builds llama-server from the llama.cpp tree inside the PyPI sdist llama-cpp-python==0.3.36
# (CMake Release, CPU; ~20 min on 2 cores the first time; cached under ~/.cache/inferd), starts
# both servers on loopback, and runs `inferd bench` against each, alternating, at each
# concurrency. Prints both tables' key figures and the inferd/llama.cpp ratios.
#
# Environment: MODEL (default: SmolLM2-135M Q4_1), THREADS (default: nproc), CONCURRENCIES
# ("1 4 16"), PROMPT_TOKENS (100), MAX_TOKENS (128), NUM_REQUESTS (per concurrency: 4 x c, at
# least 8), ROUNDS (alternations per concurrency, 2), WARMUP (1: one untimed round of c
# requests per server first; 0 skips it, for long prompts), FLASH_ATTN (llama.cpp's `-fa`:
# on), REQUEST_TIMEOUT (seconds per request, 600; raise it for 32K prompts), CPU (`native`, the default: llama.cpp
# built for this CPU and inferd's widest kernel path; `avx2`: llama.cpp built for AVX2 alone —
# -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON, AVX-512 off, its own build
# directory — against inferd with INFERD_CPU_KERNELS=avx2, so an AVX-512 machine measures the
# AVX2-only comparison; `avx512`: llama.cpp built for AVX-512 (+VNNI, BF16) without AMX or
# -march=native — for machines whose native build fails, as on AMX Xeons here — against
# inferd's avx512 path).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-$(nproc)}"
CONCURRENCIES="${CONCURRENCIES:-1 4 16}"
PROMPT_TOKENS="${PROMPT_TOKENS:-100}"
MAX_TOKENS="${MAX_TOKENS:-128}"
ROUNDS="${ROUNDS:-2}"
WARMUP="${WARMUP:-1}"
FLASH_ATTN="${FLASH_ATTN:-on}"
REQUEST_TIMEOUT="${REQUEST_TIMEOUT:-600}"
CPU="${CPU:-native}"
cache="${INFERD_CACHE:-$HOME/.cache/inferd}/llama.cpp"
case "$CPU" in
  native) build="$cache/build"; kernels=""; cpu_flags=(-DGGML_NATIVE=ON) ;;
  avx2) build="$cache/build-avx2"; kernels="avx2"
    cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF) ;;
  avx512) build="$cache/build-avx512"; kernels="avx512"
    cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON) ;;
  *) echo "CPU must be native, avx2 or avx512, not $CPU" >&2; exit 2 ;;
esac
server="$build/bin/llama-server"

bash scripts/fetch-models.sh >/dev/null
if [ ! -x "$server" ]; then
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake
  mkdir -p "$cache/sdist"
  if [ ! -d "$cache/src" ]; then
    # Only this package from source (its build tools as wheels), so the download stays quick.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$cache/sdist" llama-cpp-python==0.3.36
    tar -xzf "$cache"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$cache/sdist"
    mv "$cache/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp" "$cache/src"
  fi
  cmake -S "$cache/src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF "${cpu_flags[@]}"
  cmake --build "$build" --target llama-server -j "$THREADS"
fi
cargo build --release --bin inferd
inferd="$root/target/release/inferd"

max_c=0
for c in $CONCURRENCIES; do [ "$c" -gt "$max_c" ] && max_c=$c; done
ctx=$(( max_c * (PROMPT_TOKENS + MAX_TOKENS + 32) ))
lport=18081
iport=18082
logs="$root/target/bench-vs-llama-cpp"
mkdir -p "$logs"

# --poll 0: llama.cpp's compute threads park instead of spinning (faster on shared cores).
"$server" -m "$MODEL" --host 127.0.0.1 --port $lport -t "$THREADS" -np "$max_c" -c "$ctx" \
  --poll 0 -fa "$FLASH_ATTN" >"$logs/llama-server.log" 2>&1 &
lpid=$!
env ${kernels:+INFERD_CPU_KERNELS=$kernels} RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS" \
  "$inferd" serve --model "$MODEL" --port $iport --max-num-seqs "$max_c" >"$logs/inferd.log" 2>&1 &
ipid=$!
trap 'kill $lpid $ipid 2>/dev/null || true' EXIT

wait_up() { # wait_up URL PATH: bounded wait until the server answers 200 on PATH
  for _ in $(seq 1 600); do
    curl -fsS "$1$2" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2
  return 1
}
wait_up "http://127.0.0.1:$lport" /health # llama.cpp: 503 while loading
wait_up "http://127.0.0.1:$iport" /ready  # inferd: /health is liveness (200 while loading)

bench() { # bench PORT CONCURRENCY N -> one JSON line
  "$inferd" bench --base-url "http://127.0.0.1:$1" --concurrency "$2" --num-requests "$3" \
    --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" --seed "$4" \
    --request-timeout "$REQUEST_TIMEOUT" | tail -n 1
}

results="$logs/results.jsonl"
: >"$results"
for c in $CONCURRENCIES; do
  n=$(( 4 * c )); [ "$n" -lt 8 ] && n=8
  n="${NUM_REQUESTS:-$n}"
  if [ "$WARMUP" = 1 ]; then
    bench $lport "$c" "$c" 99 >/dev/null
    bench $iport "$c" "$c" 99 >/dev/null
  fi
  for r in $(seq 1 "$ROUNDS"); do
    echo "{\"server\":\"llama.cpp\",\"round\":$r,\"report\":$(bench $lport "$c" "$n" "$r")}" >>"$results"
    echo "{\"server\":\"inferd\",\"round\":$r,\"report\":$(bench $iport "$c" "$n" "$r")}" >>"$results"
  done
done

python3 - "$results" "$MODEL" "$THREADS" "$CPU" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"model {sys.argv[2]}, {sys.argv[3]} threads, CPU={sys.argv[4]}; medians over rounds")
print(f"{'conc':>4} {'server':>10} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
by = {}
for r in rows:
    by.setdefault((r["report"]["concurrency"], r["server"]), []).append(r["report"])
for c in sorted({k[0] for k in by}):
    f = {}
    for s in ("llama.cpp", "inferd"):
        reps = by[(c, s)]
        f[s] = (st.median(x["output_throughput"] for x in reps),
                st.median(x["ttft"]["median_ms"] for x in reps),
                st.median(x["tpot"]["median_ms"] for x in reps))
        print(f"{c:>4} {s:>10} {f[s][0]:>10.1f} {f[s][1]:>12.1f} {f[s][2]:>12.1f}")
    i, l = f["inferd"], f["llama.cpp"]
    print(f"{c:>4} {'ratio':>10} {i[0]/l[0]:>10.2f} {i[1]/l[1]:>12.2f} {i[2]/l[2]:>12.2f}   (inferd / llama.cpp)")
PY
