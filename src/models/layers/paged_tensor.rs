//! Paged attention from candle tensor ops, for caches held as device tensors (the CUDA path; it
//! runs on the CPU too, which is how it is tested against the CPU kernel).
//!
//! K/V never leave the device: new rows are scattered into their slots, and each attention
//! group gathers its sequences' slots with `index_select` on the device. One [`TensorAttnPlan`]
//! is built per forward pass from the batch's block tables (a few small uploads) and reused by
//! every layer. Sequences are grouped so no query row is padding: all single-token (decode)
//! sequences form one batched group whose keys are padded to the longest context and masked;
//! each multi-token (prefill chunk) sequence is its own group with a causal mask.

use candle_core::{DType, Device, Tensor};

use super::AttnDims;
use crate::models::kv_cache::TensorLayerKv;
use crate::models::{ForwardBatch, Result};

struct Group {
    /// Sequences in the group, query rows per sequence, keys per sequence (padded).
    b: usize,
    q_len: usize,
    k_len: usize,
    /// `[b * q_len]` rows of the flat batch.
    q_rows: Tensor,
    /// `[b * k_len]` cache slots (padding points at slot 0 and is masked).
    kv_slots: Tensor,
    /// `[b, 1, 1, q_len, k_len]` additive f32 mask (0 or -inf).
    mask: Tensor,
}

/// What one forward pass's layers share: where K/V rows go and which slots each group reads.
pub struct TensorAttnPlan {
    /// `[tokens, slot_width]` u32: each token's slot repeated along its row (scatter indexes).
    write_idx: Tensor,
    groups: Vec<Group>,
    /// Row `t` of the output is row `unpermute[t]` of the groups' concatenated outputs;
    /// `None` when the groups already come in batch order.
    unpermute: Option<Tensor>,
}

impl TensorAttnPlan {
    pub fn new(batch: &ForwardBatch, slot_width: usize, device: &Device) -> Result<Self> {
        let t = batch.num_tokens();
        let slots: Vec<u32> = batch.slot_mapping.iter().map(|&s| s as u32).collect();
        let write_idx = Tensor::from_vec(slots, (t, 1), device)?
            .broadcast_as((t, slot_width))?
            .contiguous()?;

        let bs = batch.block_size;
        let slot = |s: usize, j: usize| batch.block_tables[s][j / bs] * bs as u32 + (j % bs) as u32;
        let q_range = |s: usize| batch.cu_seqlens_q[s]..batch.cu_seqlens_q[s + 1];

        let mut groups = Vec::new();
        let mut order: Vec<u32> = Vec::with_capacity(t);
        // Decode group: every sequence with exactly one new token.
        let decode: Vec<usize> = (0..batch.num_seqs())
            .filter(|&s| q_range(s).len() == 1)
            .collect();
        if !decode.is_empty() {
            let k_len = decode.iter().map(|&s| batch.seq_lens[s]).max().unwrap_or(1);
            let mut kv_slots = Vec::with_capacity(decode.len() * k_len);
            let mut mask = Vec::with_capacity(decode.len() * k_len);
            for &s in &decode {
                order.push(batch.cu_seqlens_q[s] as u32);
                let n = batch.seq_lens[s];
                for j in 0..k_len {
                    kv_slots.push(if j < n { slot(s, j) } else { 0 });
                    mask.push(if j < n { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            groups.push(Group::new(
                decode.len(),
                1,
                k_len,
                &order,
                kv_slots,
                mask,
                device,
            )?);
        }
        // One group per prefill chunk, causal within the chunk, over all earlier context.
        for s in (0..batch.num_seqs()).filter(|&s| q_range(s).len() > 1) {
            let rows = q_range(s);
            let (q_len, k_len) = (rows.len(), batch.seq_lens[s]);
            let first = k_len - q_len;
            let start = order.len();
            order.extend(rows.map(|r| r as u32));
            let kv_slots: Vec<u32> = (0..k_len).map(|j| slot(s, j)).collect();
            let mut mask = Vec::with_capacity(q_len * k_len);
            for i in 0..q_len {
                for j in 0..k_len {
                    mask.push(if j <= first + i {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
            groups.push(Group::new(
                1,
                q_len,
                k_len,
                &order[start..],
                kv_slots,
                mask,
                device,
            )?);
        }
        let identity = order.iter().enumerate().all(|(i, &r)| i as u32 == r);
        let unpermute = if identity {
            None
        } else {
            let mut inv = vec![0u32; t];
            for (pos, &row) in order.iter().enumerate() {
                inv[row as usize] = pos as u32;
            }
            Some(Tensor::from_vec(inv, t, device)?)
        };
        Ok(Self {
            write_idx,
            groups,
            unpermute,
        })
    }

    /// Scatter this batch's K/V rows (`[tokens, slot_width]`) into their slots, in place
    /// (`v: None` when the values live in K).
    pub fn write(&self, cache: &TensorLayerKv, k: &Tensor, v: Option<&Tensor>) -> Result<()> {
        let dt = cache.k.dtype();
        cache
            .k
            .scatter_set(&self.write_idx, &k.to_dtype(dt)?.contiguous()?, 0)?;
        if let Some(v) = v {
            cache
                .v
                .scatter_set(&self.write_idx, &v.to_dtype(dt)?.contiguous()?, 0)?;
        }
        Ok(())
    }

    /// `q`: `[tokens, num_heads * head_dim]` (RoPE applied); the batch's K/V already written.
    /// Returns `[tokens, num_heads * v_head_dim]` in `q`'s dtype. Scores and softmax run in f32.
    pub fn attend(&self, q: &Tensor, cache: &TensorLayerKv, d: AttnDims) -> Result<Tensor> {
        let (h, kvh, hd, vd) = (d.num_heads, d.num_kv_heads, d.head_dim, d.v_head_dim);
        let g = h / kvh;
        let dt = cache.k.dtype();
        let q = q.to_dtype(dt)?;
        let mut outs = Vec::with_capacity(self.groups.len());
        for grp in &self.groups {
            let (b, ql, kl) = (grp.b, grp.q_len, grp.k_len);
            // [b, kvh, g * ql, hd]: query rows of one KV head's group share its keys.
            let qg = q
                .index_select(&grp.q_rows, 0)?
                .reshape((b, ql, kvh, g, hd))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, kvh, g * ql, hd))?;
            let keys = cache
                .k
                .index_select(&grp.kv_slots, 0)?
                .reshape((b, kl, kvh, hd))?;
            let v = if d.values_in_keys {
                keys.narrow(3, 0, vd)?
            } else {
                cache
                    .v
                    .index_select(&grp.kv_slots, 0)?
                    .reshape((b, kl, kvh, vd))?
            };
            let k = keys.permute((0, 2, 3, 1))?.contiguous()?; // [b, kvh, hd, kl]
            let v = v.transpose(1, 2)?.contiguous()?; // [b, kvh, kl, vd]
            let scores = (qg.matmul(&k)?.to_dtype(DType::F32)? * d.scale as f64)?
                .reshape((b, kvh, g, ql, kl))?
                .broadcast_add(&grp.mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(dt)?
                .reshape((b, kvh, g * ql, kl))?;
            let o = p
                .matmul(&v)?
                .reshape((b, kvh, g, ql, vd))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * ql, h * vd))?;
            outs.push(o);
        }
        let o = if outs.len() == 1 {
            outs.pop().unwrap_or(q)
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(match &self.unpermute {
            Some(p) => o.index_select(p, 0)?,
            None => o,
        })
    }
}

impl Group {
    fn new(
        b: usize,
        q_len: usize,
        k_len: usize,
        q_rows: &[u32],
        kv_slots: Vec<u32>,
        mask: Vec<f32>,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            b,
            q_len,
            k_len,
            q_rows: Tensor::new(q_rows, device)?,
            kv_slots: Tensor::from_vec(kv_slots, b * k_len, device)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, q_len, k_len), device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kv_cache::{CacheSpec, KvCache};
    use crate::models::layers::attention::tests::pseudo;
    use crate::models::layers::paged_attention;

    /// A mixed batch — two decodes with different context lengths around a prefill chunk at
    /// an offset, scattered blocks, GQA — gives the CPU kernel's result through tensors.
    #[test]
    fn tensor_path_matches_the_cpu_kernel_on_a_mixed_batch() {
        let d = AttnDims {
            scale: 0.35,
            ..AttnDims::mha(4, 2, 8)
        };
        let spec = CacheSpec {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 8,
            dtype: DType::F32,
            values_in_keys: None,
        };
        let (bs, w) = (2, 16);
        let dev = Device::Cpu;
        let mut host = KvCache::new(spec, 16, bs);
        let tens = KvCache::tensors(spec, 16, bs, &dev).unwrap();
        // seq 0: decode at context 5 (blocks 7,2,9); seq 1: a 3-token chunk ending at context
        // 6 (blocks 5,1,6); seq 2: decode at context 2 (block 12).
        let tables = [vec![7u32, 2, 9], vec![5, 1, 6], vec![12]];
        let lens = [5usize, 6, 2];
        let new = [1usize, 3, 1];
        let slot = |s: usize, p: usize| tables[s][p / bs] as usize * bs + p % bs;
        // Earlier context of every sequence, written beforehand.
        let mut pre_slots = Vec::new();
        for s in 0..3 {
            for p in 0..lens[s] - new[s] {
                pre_slots.push(slot(s, p));
            }
        }
        let (pk, pv) = (
            pseudo(pre_slots.len() * w, 11),
            pseudo(pre_slots.len() * w, 12),
        );
        host.write(0, &pk, &pv, &pre_slots);
        let pre = ForwardBatch {
            input_ids: vec![0; pre_slots.len()],
            positions: vec![0; pre_slots.len()],
            cu_seqlens_q: vec![0, pre_slots.len()],
            seq_lens: vec![pre_slots.len()],
            block_tables: vec![(0..16).collect()],
            slot_mapping: pre_slots.clone(),
            logits_indices: vec![],
            block_size: bs,
        };
        let to_t = |x: &[f32], rows: usize| Tensor::from_slice(x, (rows, w), &dev).unwrap();
        let plan = TensorAttnPlan::new(&pre, w, &dev).unwrap();
        let layer = tens.tensor_layer(0).unwrap();
        plan.write(
            layer,
            &to_t(&pk, pre_slots.len()),
            Some(&to_t(&pv, pre_slots.len())),
        )
        .unwrap();

        let mut batch = ForwardBatch {
            cu_seqlens_q: vec![0],
            block_size: bs,
            ..Default::default()
        };
        for s in 0..3 {
            for p in lens[s] - new[s]..lens[s] {
                batch.input_ids.push(0);
                batch.positions.push(p as u32);
                batch.slot_mapping.push(slot(s, p));
            }
            batch.cu_seqlens_q.push(batch.input_ids.len());
            batch.seq_lens.push(lens[s]);
            batch.block_tables.push(tables[s].clone());
        }
        batch.validate(32).unwrap();
        let t = batch.num_tokens();
        let (k, v) = (pseudo(t * w, 21), pseudo(t * w, 22));
        let q = pseudo(t * 32, 23);
        host.write(0, &k, &v, &batch.slot_mapping);
        let want = paged_attention(&q, host.host_layer(0).unwrap(), &batch, d);

        let plan = TensorAttnPlan::new(&batch, w, &dev).unwrap();
        plan.write(layer, &to_t(&k, t), Some(&to_t(&v, t))).unwrap();
        let q = Tensor::from_slice(&q, (t, 32), &dev).unwrap();
        let got = plan.attend(&q, layer, d).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
