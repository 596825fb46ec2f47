//! `--kv-cache-dtype q8_0` against the f16 cache it would replace, both measured against an
//! f32 cache, on both real models (heads of 64): the same prompt prefilled into each cache,
//! then 32 greedy steps decoded from the f32 run's tokens. Q8_0 rounds each stored K/V value
//! to one of 255 steps of its group's largest magnitude, so logits move more than with f16
//! (Qwen2.5's keys carry large bias channels, which set their groups' scale); the test states
//! how much, and that greedy choices hold wherever the f32 run's best logit leads by 0.5 or more
//! (near ties may flip: at most one step in eight for q8_0).

mod common;

use candle_core::{DType, Device};
use common::*;
use inferd::models::kv_cache::KV_Q8_0;
use inferd::models::{load_model, CacheSpec, CausalLm, ForwardBatch, KvCache};
use inferd::tokenizer::Tokenizer;

const BS: usize = 16;
const STEPS: usize = 32;

fn logits(
    m: &dyn CausalLm,
    kv: &mut KvCache,
    ids: &[u32],
    start: usize,
    table: &[u32],
) -> Vec<f32> {
    let mut b = ForwardBatch::new(BS);
    b.push_sequence(ids, start, table);
    let out = m.forward(&b, kv).unwrap();
    out.to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .remove(0)
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let mx = v.iter().copied().fold(f32::MIN, f32::max);
    let z = v.iter().map(|x| (x - mx).exp()).sum::<f32>().ln() + mx;
    v.iter().map(|x| x - z).collect()
}

/// A lead of the f32 cache's best logit over its second that no cache type may flip.
const CLEAR_MARGIN: f32 = 0.5;

/// How far the best logit leads the second.
fn top_margin(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &x in v {
        if x > a {
            (a, b) = (x, a);
        } else if x > b {
            b = x;
        }
    }
    a - b
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

#[test]
fn q8_0_cache_keeps_greedy_choices_near_the_f16_cache() {
    let text = "The history of the printing press begins in the fifteenth century, when Johannes \
        Gutenberg combined movable metal type, oil-based ink and a screw press adapted from wine \
        making. Within fifty years presses were working in more than two hundred European \
        cities, and the price of books fell so far that reading spread beyond monasteries and \
        universities to merchants and craftsmen. Pamphlets carried news and arguments faster \
        than any courier, and scholars could compare identical copies of a text for the first \
        time. Summarise the consequences of this invention in three sentences.";
    for file in [QWEN, SMOLLM] {
        let path = model_path(file);
        let m = load_model(&path, &Device::Cpu, Some(1024)).unwrap().model;
        let tok = Tokenizer::from_gguf(&inferd::models::loader::read_gguf_header(&path).unwrap())
            .unwrap();
        let prompt = tok.encode(text, false).unwrap();
        let n = prompt.len();
        let blocks = (n + STEPS).div_ceil(BS);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let spec = |dtype| CacheSpec {
            dtype,
            ..m.cache_spec()
        };
        // f32 is the reference; f16 (the CPU default) and q8_0 are measured against it.
        let dtypes = [DType::F32, DType::F16, KV_Q8_0];
        let names = ["f32", "f16", "q8_0"];
        let mut caches: Vec<KvCache> = dtypes
            .iter()
            .map(|&d| KvCache::new(spec(d), blocks, BS))
            .collect();
        assert!(matches!(
            caches[2].host_layer(0),
            Some(inferd::models::kv_cache::LayerKv::Q8(_))
        ));
        let mut rows: Vec<Vec<f32>> = caches
            .iter_mut()
            .map(|kv| logits(m.as_ref(), kv, &prompt, 0, &table))
            .collect();
        let mut agree = [0usize; 3];
        let (mut worst_lp, mut worst_logit) = ([0f32; 3], [0f32; 3]);
        for step in 0..STEPS {
            let next = argmax(&rows[0]);
            let reference = log_softmax(&rows[0]);
            let margin = top_margin(&rows[0]);
            for (c, r) in rows.iter().enumerate() {
                agree[c] += usize::from(argmax(r) == next);
                if argmax(r) != next {
                    eprintln!(
                        "{file} {}: step {step} differs; f32 margin {margin:.3}",
                        names[c]
                    );
                    // only a near tie may flip
                    assert!(margin < CLEAR_MARGIN, "{file} {}: step {step}", names[c]);
                }
                let lp = log_softmax(r);
                worst_lp[c] = worst_lp[c].max((lp[next as usize] - reference[next as usize]).abs());
                worst_logit[c] = worst_logit[c].max(max_abs_diff(r, &rows[0]));
            }
            for (kv, r) in caches.iter_mut().zip(rows.iter_mut()) {
                *r = logits(m.as_ref(), kv, &[next], n + step, &table);
            }
        }
        for c in [1, 2] {
            eprintln!(
                "{file}: {n}-token prompt, {STEPS} steps, {} cache against f32: the same greedy token at {}/{STEPS}; \
                 its logprob moves by at most {:.3}, any logit by {:.3}",
                names[c], agree[c], worst_lp[c], worst_logit[c]
            );
        }
        assert!(
            agree[1] + 1 >= STEPS && agree[2] + STEPS / 8 >= STEPS,
            "{file}: {agree:?}"
        );
        assert!(worst_lp[2] < 1.0, "{file}: {worst_lp:?}");
        // and it is smaller: 34 bytes per 32 values instead of 64
        assert_eq!(
            spec(KV_Q8_0).bytes_per_token() * 64,
            spec(DType::F16).bytes_per_token() * 34
        );
    }
}
