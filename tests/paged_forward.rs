//! The paged, batched forward pass against references.
//!
//! - Tiny random-weight Llama and Qwen2 checkpoints in Hugging Face layout (safetensors +
//!   config.json), loaded by inferd and by candle-transformers' own `llama` / `qwen2` (which
//!   match transformers to ~2e-6): prefill, token-by-token decode, a chunk at an offset, and a
//!   batch of sequences of different lengths, through scattered cache blocks.
//! - The real Qwen2.5 GGUF: a sequence's logits are bit-identical alone, batched, and chunked.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::tiny::{values, write_variant};
use common::*;
use inferd::models::{load_model, CausalLm, KvCache};

const VOCAB: usize = 256;
const BS: usize = 4;
const TOL: f32 = 1e-4;

/// candle-transformers' model, fed token by token or whole; returns last-token logits.
enum Oracle {
    Llama(
        candle_transformers::models::llama::Llama,
        candle_transformers::models::llama::Cache,
    ),
    Qwen2(candle_transformers::models::qwen2::ModelForCausalLM),
}

impl Oracle {
    fn new(dir: &Path, qwen2: bool) -> Self {
        let dev = Device::Cpu;
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
                .unwrap()
        };
        if qwen2 {
            let cfg: candle_transformers::models::qwen2::Config =
                serde_json::from_str(&text).unwrap();
            Self::Qwen2(
                candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap(),
            )
        } else {
            use candle_transformers::models::llama;
            let cfg = serde_json::from_str::<llama::LlamaConfig>(&text)
                .unwrap()
                .into_config(false);
            let cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
            Self::Llama(llama::Llama::load(vb, &cfg).unwrap(), cache)
        }
    }

    /// Feed `tokens` at `offset` (after what was fed before) and return the last logits.
    fn feed(&mut self, tokens: &[u32], offset: usize) -> Vec<f32> {
        let ids = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = match self {
            Self::Llama(m, cache) => m.forward(&ids, offset, cache).unwrap(),
            Self::Qwen2(m) => m.forward(&ids, offset).unwrap(),
        };
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    values(n, seed, 1.0)
        .iter()
        .map(|x| ((x + 1.0) * 127.0) as u32 % VOCAB as u32)
        .collect()
}

fn last_logits(m: &dyn CausalLm, kv: &mut KvCache, parts: &[SeqPart]) -> Vec<Vec<f32>> {
    m.forward(&batch_of(parts, BS), kv)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn check_family(qwen2: bool) {
    check_variant(
        qwen2,
        if qwen2 { "qwen2" } else { "llama" },
        false,
        serde_json::json!({}),
    );
}

fn check_variant(qwen2: bool, tag: &str, tied: bool, extra: serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("inferd-ref-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_variant(&dir, qwen2, VOCAB, tied, extra);
    let loaded = load_model(&dir, &Device::Cpu, Some(512)).unwrap();
    let m = loaded.model.as_ref();
    // Both cache storages: host blocks read by the CPU kernel, and device-style tensors read
    // by the gather path the GPU uses (run here on the CPU).
    let spec = m.cache_spec();
    let mut host = KvCache::new(spec, 32, BS);
    check_cache(&dir, qwen2, m, &mut host, "host cache");
    let mut tensors = KvCache::tensors(spec, 32, BS, &Device::Cpu).unwrap();
    check_cache(&dir, qwen2, m, &mut tensors, "tensor cache");
    std::fs::remove_dir_all(&dir).ok();
}

/// Prefill, decode, a chunk at an offset and a mixed batch through `kv`, against the oracle.
fn check_cache(dir: &Path, qwen2: bool, m: &dyn CausalLm, kv: &mut KvCache, what: &str) {
    let dir = dir.to_path_buf();
    let prompt = tokens(11, 7);

    // Prefill, with the sequence's blocks scattered over the pool.
    let table = vec![9, 2, 17, 5, 30];
    let mut oracle = Oracle::new(&dir, qwen2);
    let want = oracle.feed(&prompt, 0);
    let got = last_logits(
        m,
        kv,
        &[SeqPart {
            new: prompt.clone(),
            start: 0,
            table: table.clone(),
        }],
    );
    let d = max_abs_diff(&got[0], &want);
    assert!(d < TOL, "{what}: prefill differs by {d}");

    // Token-by-token decode through the paged cache.
    let mut oracle = Oracle::new(&dir, qwen2);
    let mut worst = 0f32;
    for (i, &t) in prompt.iter().enumerate() {
        let want = oracle.feed(&[t], i);
        let got = last_logits(
            m,
            kv,
            &[SeqPart {
                new: vec![t],
                start: i,
                table: table.clone(),
            }],
        );
        worst = worst.max(max_abs_diff(&got[0], &want));
    }
    assert!(worst < TOL, "{what}: decode differs by {worst}");

    // Chunked prefill: 5 tokens, then a 6-token chunk at offset 5.
    let mut oracle = Oracle::new(&dir, qwen2);
    oracle.feed(&prompt[..5], 0);
    let want = oracle.feed(&prompt[5..], 5);
    let table2 = vec![1, 3, 8];
    last_logits(
        m,
        kv,
        &[SeqPart {
            new: prompt[..5].to_vec(),
            start: 0,
            table: table2.clone(),
        }],
    );
    let got = last_logits(
        m,
        kv,
        &[SeqPart {
            new: prompt[5..].to_vec(),
            start: 5,
            table: table2,
        }],
    );
    let d = max_abs_diff(&got[0], &want);
    assert!(d < TOL, "{what}: chunk at an offset differs by {d}");

    // A batch of three sequences of different lengths, one of them decoding.
    let a = tokens(3, 11);
    let b = tokens(13, 12);
    let mut parts = vec![
        SeqPart {
            new: a.clone(),
            start: 0,
            table: vec![20],
        },
        SeqPart {
            new: b.clone(),
            start: 0,
            table: vec![21, 22, 23, 24],
        },
    ];
    // The third sequence is the chunked one above, decoding its 12th token.
    parts.push(SeqPart {
        new: vec![42],
        start: 11,
        table: vec![1, 3, 8],
    });
    let got = last_logits(m, kv, &parts);
    let mut o = Oracle::new(&dir, qwen2);
    assert!(max_abs_diff(&got[0], &o.feed(&a, 0)) < TOL, "batched seq a");
    let mut o = Oracle::new(&dir, qwen2);
    assert!(max_abs_diff(&got[1], &o.feed(&b, 0)) < TOL, "batched seq b");
    let mut o = Oracle::new(&dir, qwen2);
    o.feed(&prompt, 0);
    let d = max_abs_diff(&got[2], &o.feed(&[42], 11));
    assert!(d < TOL, "{what}: batched decode differs by {d}");
}

#[test]
fn llama_hf_checkpoint_matches_reference() {
    check_family(false);
}

#[test]
fn qwen2_hf_checkpoint_matches_reference() {
    check_family(true);
}

/// Llama 3.1/3.2 shape: `rope_scaling` of type llama3 (hub form, at the top level; the
/// positions used stay short, but the scaling changes low frequencies everywhere) and tied
/// embeddings, as Llama 3.2 1B/3B ship.
#[test]
fn llama3_rope_scaling_and_tied_embeddings_match_reference() {
    let scaling = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "rope_theta": 500000.0});
    check_variant(false, "llama3", true, scaling);
}

#[test]
fn qwen_gguf_logits_do_not_depend_on_the_batch_or_chunking() {
    let loaded = load_model(&model_path(QWEN), &Device::Cpu, Some(1024)).unwrap();
    let m = loaded.model.as_ref();
    let mut kv = KvCache::new(m.cache_spec(), 64, BS);
    let a: Vec<u32> = (1000..1019).collect();
    let other: Vec<u32> = (3000..3007).collect();

    let alone = last_logits(
        m,
        &mut kv,
        &[SeqPart {
            new: a.clone(),
            start: 0,
            table: (0..5).collect(),
        }],
    );
    let batched = last_logits(
        m,
        &mut kv,
        &[
            SeqPart {
                new: other.clone(),
                start: 0,
                table: vec![10, 11],
            },
            SeqPart {
                new: a.clone(),
                start: 0,
                table: (5..10).collect(),
            },
        ],
    );
    assert_eq!(alone[0], batched[1], "prefill alone vs batched");

    last_logits(
        m,
        &mut kv,
        &[SeqPart {
            new: a[..8].to_vec(),
            start: 0,
            table: (20..25).collect(),
        }],
    );
    let chunked = last_logits(
        m,
        &mut kv,
        &[SeqPart {
            new: a[8..].to_vec(),
            start: 8,
            table: (20..25).collect(),
        }],
    );
    assert_eq!(alone[0], chunked[0], "whole prompt vs two chunks");

    // Decode one more token: alone, then alongside one and three other decodes.
    let decode = |kv: &mut KvCache, others: usize| {
        let mut parts = vec![SeqPart {
            new: vec![77],
            start: 19,
            table: (0..5).collect(),
        }];
        for i in 0..others {
            parts.push(SeqPart {
                new: vec![5 + i as u32],
                start: 7,
                table: vec![10, 11],
            });
        }
        last_logits(m, kv, &parts).remove(0)
    };
    let d1 = decode(&mut kv, 0);
    assert_eq!(d1, decode(&mut kv, 1), "decode alone vs with one other");
    assert_eq!(d1, decode(&mut kv, 3), "decode alone vs with three others");
}
