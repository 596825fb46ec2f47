//! Time of one model forward pass for decode steps, without the engine or HTTP: one sequence,
//! then 16 sequences batched, each at contexts growing from 100 tokens.
//! `cargo bench --bench decode [-- MODEL [STEPS [CACHE_DTYPE [QUANTIZE]]]]` (default:
//! SmolLM2-135M Q4_1, 128 steps, an f16 KV cache as the daemon uses on the CPU; `f32` for the
//! other; QUANTIZE as `--quantize` for a Hugging Face directory).
use std::time::Instant;

mod common;

use candle_core::{DType, Device};
use inferd::models::quantize::LoadQuant;
use inferd::models::{load_model_with, CacheSpec, ForwardBatch, KvCache, LoadOptions};

fn main() {
    let (args, path) = common::setup("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    let dtype = match args.get(2).map(String::as_str) {
        Some("f32") => DType::F32,
        _ => DType::F16,
    };
    let opts = LoadOptions {
        max_positions: Some(4096),
        dtype: None,
        quantize: args.get(3).and_then(|q| LoadQuant::parse(q)),
    };
    let m = load_model_with(&path, &Device::Cpu, &opts)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/fetch-models.sh fetches it)",
                path.display()
            )
        })
        .model;
    let bs = 16;
    let prompt: Vec<u32> = (1000..1100).collect();
    let blocks_per_seq = (prompt.len() + steps).div_ceil(bs) as u32;
    for seqs in [1u32, 16] {
        let spec = CacheSpec {
            dtype,
            ..m.cache_spec()
        };
        let mut kv = KvCache::new(spec, (blocks_per_seq * seqs) as usize, bs);
        let table =
            |s: u32| -> Vec<u32> { (s * blocks_per_seq..(s + 1) * blocks_per_seq).collect() };
        for s in 0..seqs {
            let mut b = ForwardBatch::new(bs);
            b.push_sequence(&prompt, 0, &table(s));
            m.forward(&b, &mut kv).unwrap();
        }
        let t0 = Instant::now();
        for i in 0..steps {
            let mut b = ForwardBatch::new(bs);
            for s in 0..seqs {
                b.push_sequence(&[1000 + i as u32], prompt.len() + i, &table(s));
            }
            let logits = m.forward(&b, &mut kv).unwrap();
            let _ = logits.to_vec2::<f32>().unwrap();
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        println!(
            "{}{} ({dtype:?} cache): {seqs:>2} sequence(s), {steps} decode steps from context {}: {ms:.2} ms/step, {:.1} tok/s",
            path.display(),
            opts.quantize.map_or(String::new(), |q| format!(" --quantize {}", q.name())),
            prompt.len(),
            seqs as f64 * 1000.0 / ms
        );
    }
}
