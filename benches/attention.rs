//! Paged attention alone, on the default model's shape (14 query heads, 2 KV heads of 64):
//! one decode token at each context, and one 512-token prefill chunk ending at it, over a
//! cache of random K/V in scattered blocks. `cargo bench --bench attention [-- [CONTEXTS...]
//! [f16|q8_0|f32]]` (default 4096 16384, f16). Prints milliseconds per call (median of runs).
use std::time::Instant;

mod common;

use candle_core::DType;
use inferd::models::kv_cache::KV_Q8_0;
use inferd::models::layers::attention::{paged_attention, AttnDims};
use inferd::models::{CacheSpec, ForwardBatch, KvCache};

const BS: usize = 16;
const CHUNK: usize = 512;

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    let (args, _) = common::setup("");
    let mut contexts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if contexts.is_empty() {
        contexts = vec![4096, 16384];
    }
    let (dtype, name) = match args.iter().find(|a| a.parse::<usize>().is_err()) {
        Some(d) if d == "q8_0" => (KV_Q8_0, "q8_0"),
        Some(d) if d == "f32" => (DType::F32, "f32"),
        _ => (DType::F16, "f16"),
    };
    let d = AttnDims::mha(14, 2, 64);
    for &n in &contexts {
        let blocks = n.div_ceil(BS) + 1;
        let spec = CacheSpec {
            num_layers: 1,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            dtype,
            values_in_keys: None,
        };
        let mut kv = KvCache::new(spec, blocks, BS);
        // blocks in a scattered order, as a long-running server hands them out
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| (b * 7) % blocks as u32)
            .collect();
        let slots: Vec<usize> = (0..n)
            .map(|p| table[p / BS] as usize * BS + p % BS)
            .collect();
        let width = d.num_kv_heads * d.head_dim;
        kv.write(0, &pseudo(n * width, 1), &pseudo(n * width, 2), &slots);
        let layer = kv.host_layer(0).expect("host cache");
        let batch = |tokens: usize| ForwardBatch {
            input_ids: vec![0; tokens],
            positions: (n - tokens..n).map(|p| p as u32).collect(),
            cu_seqlens_q: vec![0, tokens],
            seq_lens: vec![n],
            block_tables: vec![table.clone()],
            slot_mapping: slots[n - tokens..].to_vec(),
            logits_indices: vec![tokens - 1],
            block_size: BS,
        };
        let q1 = pseudo(d.num_heads * d.head_dim, 3);
        let b1 = batch(1);
        let decode = median_ms(41, || {
            std::hint::black_box(paged_attention(&q1, layer, &b1, d));
        });
        let qc = pseudo(CHUNK * d.num_heads * d.head_dim, 4);
        let bc = batch(CHUNK.min(n));
        let prefill = median_ms(5, || {
            std::hint::black_box(paged_attention(&qc, layer, &bc, d));
        });
        println!(
            "{name} context {n}: decode {decode:.3} ms/layer, {CHUNK}-token chunk {prefill:.1} ms/layer"
        );
    }
}
