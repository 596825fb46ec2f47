//! Turns a scheduler decision into the model's flat [`ForwardBatch`] and runs it: the only part
//! of the engine that touches candle and models.

use crate::models::{CausalLm, ForwardBatch, KvCache, ModelError};

use super::kv::KvManager;
use super::scheduler::{Scheduler, SchedulerOutput};

/// Flatten the scheduled sequences' new tokens, positions, block tables and slots.
pub fn build_batch(out: &SchedulerOutput, sched: &Scheduler, kv: &KvManager) -> ForwardBatch {
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

/// Run one batch; returns one logits row per sampling sequence, in `logits_indices` order.
pub fn execute(
    model: &dyn CausalLm,
    batch: &ForwardBatch,
    cache: &mut KvCache,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let logits = model.forward(batch, cache)?;
    if batch.logits_indices.is_empty() {
        return Ok(Vec::new());
    }
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduler::SchedulerConfig;
    use crate::engine::sequence::Sequence;

    #[test]
    fn flattens_a_mixed_prefill_chunk_and_decode_batch() {
        let mut kv = KvManager::new(8, 2);
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 4,
        });
        s.add(Sequence::new(1, vec![10, 11, 12]));
        let out = s.schedule(&mut kv);
        s.on_step_computed(&out, &mut kv);
        s.append_token(1, 13);
        s.add(Sequence::new(2, vec![20, 21, 22, 23, 24]));
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
}
