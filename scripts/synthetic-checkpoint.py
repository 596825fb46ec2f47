#!/usr/bin/env python3
"""Write a random-weight Hugging Face Llama checkpoint of a real model's shape (config.json and
sharded bf16 safetensors), to measure loading — e.g. the peak memory of `--quantize` — at sizes
no registry package holds. The weights are noise (normal, std 0.02); only shapes are real.

    python3 scripts/synthetic-checkpoint.py llama-8b-shape /tmp/llama-8b-bf16
    /usr/bin/time -v target/release/inferd serve --model /tmp/llama-8b-bf16 --quantize q4_k ...

Shapes: llama-1b-shape (Llama-3.2-1B, tied), llama-8b-shape (Llama-3.1-8B). Needs numpy.
Tensors are generated and written one at a time, so the script itself holds one tensor.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                           vocab_size=128256, tie_word_embeddings=True),
    "llama-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 4 << 30


def tensors(c):
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], h)


def bf16_noise(rng, shape, norm):
    if norm:
        return np.full(shape, 0x3F80, dtype=np.uint16)  # 1.0
    x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
    return (x >> 16).astype(np.uint16)


def write_shard(path, entries, rng):
    header, offset = {}, 0
    for name, shape in entries:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in entries:
            f.write(bf16_noise(rng, shape, name.endswith("norm.weight")).tobytes())


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(__doc__)
    shape, out = SHAPES[sys.argv[1]], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=131072, torch_dtype="bfloat16",
                  **shape)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shards, current, size = [], [], 0
    for name, dims in tensors(shape):
        n = int(np.prod(dims)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += n
    shards.append(current)
    rng = np.random.default_rng(0)
    for k, entries in enumerate(shards):
        path = out / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(path, entries, rng)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
