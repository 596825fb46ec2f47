//! Time to first token of one long prompt, without the engine or HTTP: the prompt prefilled
//! in chunks of 512 tokens (the daemon's default `--max-num-batched-tokens`), then decode
//! steps at that context. `cargo bench --bench prefill [-- MODEL [TOKENS... [CACHE_DTYPE]]]`
//! (default: Qwen2.5-0.5B Q4_K_M, 1024 4096 tokens, an f16 KV cache; `q8_0` or `f32` else).
use std::time::Instant;

mod common;

use candle_core::{DType, Device};
use inferd::models::kv_cache::KV_Q8_0;
use inferd::models::{load_model, CacheSpec, ForwardBatch, KvCache};

const CHUNK: usize = 512;
const BS: usize = 16;
const DECODE_STEPS: usize = 8;

fn main() {
    let (args, path) = common::setup("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let mut lengths: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    if lengths.is_empty() {
        lengths = vec![1024, 4096];
    }
    let dtype = match args.iter().skip(1).find(|a| a.parse::<usize>().is_err()) {
        Some(d) if d == "q8_0" => KV_Q8_0,
        Some(d) if d == "f32" => DType::F32,
        _ => DType::F16,
    };
    let longest = lengths.iter().copied().max().unwrap_or(0) + DECODE_STEPS;
    let m = load_model(&path, &Device::Cpu, Some(longest))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .model;
    for &n in &lengths {
        let blocks = (n + DECODE_STEPS).div_ceil(BS);
        let spec = CacheSpec {
            dtype,
            ..m.cache_spec()
        };
        let mut kv = KvCache::new(spec, blocks, BS);
        let table: Vec<u32> = (0..blocks as u32).collect();
        // deterministic ordinary token ids
        let prompt: Vec<u32> = (0..n as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
        let t0 = Instant::now();
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            let mut b = ForwardBatch::new(BS);
            b.push_sequence(&prompt[start..end], start, &table);
            let _ = m.forward(&b, &mut kv).unwrap().to_vec2::<f32>().unwrap();
            start = end;
        }
        let ttft = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for i in 0..DECODE_STEPS {
            let mut b = ForwardBatch::new(BS);
            b.push_sequence(&[1000], n + i, &table);
            let _ = m.forward(&b, &mut kv).unwrap().to_vec2::<f32>().unwrap();
        }
        let step = t1.elapsed().as_secs_f64() * 1000.0 / DECODE_STEPS as f64;
        println!(
            "{} ({}) {n} tokens: prefill {ttft:.2} s ({:.0} tok/s), then decode {step:.1} ms/step",
            path.display(),
            if dtype == KV_Q8_0 {
                "q8_0".to_string()
            } else {
                format!("{dtype:?}")
            },
            n as f64 / ttft
        );
    }
}
