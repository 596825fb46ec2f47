//! Paged attention on the CPU: each query token attends, causally, over its sequence's K/V read
//! in place from the cache blocks — no gather into a contiguous copy. GQA maps query head `h` to
//! KV head `h / (num_heads / num_kv_heads)`. One work item per (token, head), each with its own
//! online softmax, so a token's result never depends on what else is in the batch.

use rayon::prelude::*;

use crate::models::kv_cache::LayerKv;
use crate::models::ForwardBatch;

#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Query/key width per head.
    pub head_dim: usize,
    /// Value (and output) width per head.
    pub v_head_dim: usize,
    /// MLA: the values are the first `v_head_dim` dimensions of each key row.
    pub values_in_keys: bool,
    pub scale: f32,
}

impl AttnDims {
    /// Standard multi-head / grouped-query attention: values as wide as keys, stored apart.
    pub fn mha(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_heads,
            num_kv_heads,
            head_dim,
            v_head_dim: head_dim,
            values_in_keys: false,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// `q`: `[tokens, num_heads, head_dim]` (flat, RoPE applied). Returns `[tokens, num_heads,
/// v_head_dim]`.
/// The batch's K/V must already be written into `cache`.
pub fn paged_attention(q: &[f32], cache: &LayerKv, batch: &ForwardBatch, d: AttnDims) -> Vec<f32> {
    let (hd, vd) = (d.head_dim, d.v_head_dim);
    let group = d.num_heads / d.num_kv_heads;
    let slot_w = d.num_kv_heads * hd;
    let v_slot_w = d.num_kv_heads * vd;
    let bs = batch.block_size;

    // Token -> (sequence, number of keys it sees). A token at query offset i of a sequence
    // whose context after this step is L (with n new tokens) sees keys 0..=L-n+i.
    let mut token_seq = Vec::with_capacity(batch.num_tokens());
    for s in 0..batch.num_seqs() {
        let (lo, hi) = (batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]);
        let first = batch.seq_lens[s] - (hi - lo);
        for i in 0..hi - lo {
            token_seq.push((s, first + i + 1));
        }
    }

    let mut out = vec![0f32; q.len() / hd * vd];
    out.par_chunks_mut(vd).enumerate().for_each_init(
        || vec![0f32; vd],
        |acc, (idx, o)| {
            let t = idx / d.num_heads;
            let h = idx % d.num_heads;
            let (s, num_keys) = token_seq[t];
            let table = &batch.block_tables[s];
            let kv_off = (h / group) * hd;
            let v_off = (h / group) * vd;
            let qrow = &q[idx * hd..(idx + 1) * hd];

            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut m = f32::NEG_INFINITY;
            let mut l = 0f32;
            for j in 0..num_keys {
                let slot = table[j / bs] as usize * bs + j % bs;
                let base = slot * slot_w + kv_off;
                let krow = &cache.k[base..base + hd];
                let score = dot(qrow, krow) * d.scale;
                if score > m {
                    let c = (m - score).exp();
                    l *= c;
                    acc.iter_mut().for_each(|a| *a *= c);
                    m = score;
                }
                let p = (score - m).exp();
                l += p;
                let vrow = if d.values_in_keys {
                    &cache.k[base..base + vd]
                } else {
                    let vb = slot * v_slot_w + v_off;
                    &cache.v[vb..vb + vd]
                };
                for (a, &v) in acc.iter_mut().zip(vrow) {
                    *a += p * v;
                }
            }
            let inv = 1.0 / l;
            for (o, a) in o.iter_mut().zip(acc.iter()) {
                *o = a * inv;
            }
        },
    );
    out
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorize without reassociating.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kv_cache::{CacheSpec, KvCache};

    /// Naive causal attention over contiguous K/V for one sequence, for comparison.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, d: AttnDims, first: usize) -> Vec<f32> {
        let hd = d.head_dim;
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![0f32; q.len()];
        for t in 0..n {
            for h in 0..d.num_heads {
                let qr = &q[(t * d.num_heads + h) * hd..][..hd];
                let kvh = h / group;
                let keys = first + t + 1;
                let scores: Vec<f32> = (0..keys)
                    .map(|j| {
                        let kr = &k[(j * d.num_kv_heads + kvh) * hd..][..hd];
                        qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * d.scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vr = &v[(j * d.num_kv_heads + kvh) * hd..][..hd];
                    for i in 0..hd {
                        out[(t * d.num_heads + h) * hd + i] += w / z * vr[i];
                    }
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn paged_matches_contiguous_with_scattered_blocks_and_gqa() {
        let d = AttnDims {
            scale: 0.35,
            ..AttnDims::mha(4, 2, 8)
        };
        let spec = CacheSpec {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 8,
            dtype: candle_core::DType::F32,
            values_in_keys: None,
        };
        let bs = 2;
        let mut cache = KvCache::new(spec, 8, bs);
        // One sequence of 7 tokens in scattered blocks [5, 1, 6, 3]; the last 3 tokens are the
        // new ones (a chunk at an offset), the first 4 were cached by an earlier step.
        let table = vec![5u32, 1, 6, 3];
        let n_ctx = 7;
        let k = pseudo(n_ctx * 16, 1);
        let v = pseudo(n_ctx * 16, 2);
        let slots: Vec<usize> = (0..n_ctx)
            .map(|p| table[p / bs] as usize * bs + p % bs)
            .collect();
        cache.write(0, &k, &v, &slots);
        let q_all = pseudo(n_ctx * 32, 3);
        let q = &q_all[4 * 32..];
        let batch = ForwardBatch {
            input_ids: vec![0; 3],
            positions: vec![4, 5, 6],
            cu_seqlens_q: vec![0, 3],
            seq_lens: vec![7],
            block_tables: vec![table],
            slot_mapping: slots[4..].to_vec(),
            logits_indices: vec![2],
            block_size: bs,
        };
        batch.validate(cache.num_slots()).unwrap();
        let got = paged_attention(q, cache.host_layer(0).unwrap(), &batch, d);
        let want = reference(q, &k, &v, 3, d, 4);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
