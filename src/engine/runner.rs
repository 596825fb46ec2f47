//! Turns a scheduler decision into the model's flat [`ForwardBatch`] and runs it, returning
//! host logits rows or (plain greedy on an accelerator) the tokens picked there. The engine
//! touches candle only here and through the `KvCache` it owns.

use crate::models::{CausalLm, ForwardBatch, KvCache, ModelError};

use super::kv::KvManager;
use super::scheduler::{Scheduler, SchedulerOutput};

/// Flatten the scheduled sequences' new tokens, positions, block tables and slots.
pub fn build_batch<R>(out: &SchedulerOutput, sched: &Scheduler<R>, kv: &KvManager) -> ForwardBatch {
    let mut b = ForwardBatch {
        block_size: kv.block_size(),
        cu_seqlens_q: vec![0],
        ..Default::default()
    };
    for s in &out.scheduled {
        let Some(seq) = sched.get(s.seq_id) else {
            continue;
        };
        let start = seq.num_computed_tokens;
        let end = start + s.num_new_tokens;
        b.input_ids.extend_from_slice(&seq.token_ids[start..end]);
        for pos in start..end {
            b.positions.push(pos as u32);
            // Slots exist: the scheduler allocated them before scheduling the tokens.
            b.slot_mapping
                .push(kv.slot(s.seq_id, pos).unwrap_or(usize::MAX));
        }
        b.cu_seqlens_q.push(b.input_ids.len());
        b.seq_lens.push(end);
        b.block_tables.push(kv.block_table(s.seq_id).to_vec());
        if s.samples {
            b.logits_indices.push(b.input_ids.len() - 1);
        }
    }
    b
}

/// What a forward pass hands back per sampling sequence, in `logits_indices` order.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampled {
    /// Full logits rows, for the host's logits processors and sampler.
    Logits(Vec<Vec<f32>>),
    /// Greedy tokens picked on the model's device (only the ids cross to the host).
    Tokens(Vec<u32>),
}

/// Run one batch. With `greedy_on_device` (every sampling sequence is plain greedy), the
/// argmax runs where the logits are, so a GPU sends back one id per sequence instead of
/// `vocab` floats.
pub fn execute(
    model: &dyn CausalLm,
    batch: &ForwardBatch,
    cache: &mut KvCache,
    greedy_on_device: bool,
) -> Result<Sampled, ModelError> {
    let logits = model.forward(batch, cache)?;
    if batch.logits_indices.is_empty() {
        return Ok(Sampled::Logits(Vec::new()));
    }
    if greedy_on_device {
        return Ok(Sampled::Tokens(
            logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?,
        ));
    }
    Ok(Sampled::Logits(
        logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduler::SchedulerConfig;
    use crate::engine::sequence::Sequence;

    #[test]
    fn flattens_a_mixed_prefill_chunk_and_decode_batch() {
        let mut kv = KvManager::new(8, 2);
        let mut s: Scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 4,
        });
        s.add(Sequence::new(1, vec![10, 11, 12]), ());
        let out = s.schedule(&mut kv);
        s.on_step_computed(&out, &mut kv);
        s.append_token(1, 13);
        s.add(Sequence::new(2, vec![20, 21, 22, 23, 24]), ());
        let out = s.schedule(&mut kv);
        // seq 1 decodes its 4th token; seq 2 gets a 3-token chunk of its 5-token prompt.
        let b = build_batch(&out, &s, &kv);
        assert_eq!(b.input_ids, vec![13, 20, 21, 22]);
        assert_eq!(b.positions, vec![3, 0, 1, 2]);
        assert_eq!(b.cu_seqlens_q, vec![0, 1, 4]);
        assert_eq!(b.seq_lens, vec![4, 3]);
        assert_eq!(b.block_tables, vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(b.slot_mapping, vec![3, 4, 5, 6]);
        assert_eq!(
            b.logits_indices,
            vec![0],
            "only the decode samples; the chunk does not"
        );
        b.validate(16).unwrap();
    }

    /// The device-side greedy path picks the same tokens as the host's argmax of the logits.
    #[test]
    fn greedy_on_device_matches_the_host_argmax() {
        use crate::engine::sampler::argmax;
        let m = crate::models::load_model(
            std::path::Path::new("synthetic:tiny"),
            &candle_core::Device::Cpu,
            Some(64),
        )
        .unwrap()
        .model;
        let mut b = ForwardBatch::new(4);
        b.push_sequence(&[1000, 2000, 3000], 0, &[0]);
        b.push_sequence(&[4000, 5000], 0, &[1]);
        let mut cache = KvCache::new(m.cache_spec(), 4, 4);
        let Sampled::Logits(rows) = execute(m.as_ref(), &b, &mut cache, false).unwrap() else {
            panic!("logits expected")
        };
        let want: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        let got = execute(m.as_ref(), &b, &mut cache, true).unwrap();
        assert_eq!(got, Sampled::Tokens(want));
    }
}
