//! The scheduler: pure state transitions over waiting and running sequences.
//!
//! One rule, no phases: every step gives each sequence up to `num_tokens - num_computed_tokens`
//! new tokens to compute, within `max_num_batched_tokens` and `max_num_seqs`. A decode (1 token),
//! a whole prompt and a prompt chunk (chunked prefill) are the same subtraction and share a batch.
//! Running sequences go first, oldest first; when KV blocks run out the newest running sequence is
//! preempted by recompute (blocks freed, back to the head of the waiting queue); then waiting
//! sequences are admitted in arrival order. Requests that could never fit are refused before they
//! get here (the engine's `max_model_len` is at most the pool's tokens).

use std::collections::{HashMap, VecDeque};

use super::kv::{KvManager, SeqId};
use super::sequence::Sequence;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// Tokens computed this step, starting at the sequence's `num_computed_tokens`.
    pub num_new_tokens: usize,
    /// True when this step computes the sequence's last uncomputed token, so it samples.
    pub samples: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn num_batched_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_new_tokens).sum()
    }
}

/// The scheduler over sequences that each carry the caller's per-request state `R` (the
/// engine's sampler, detokenizer and client channel; `()` in tests): the one owner of both, so
/// a request and its sequence are added and removed together.
#[derive(Debug)]
pub struct Scheduler<R = ()> {
    cfg: SchedulerConfig,
    seqs: HashMap<SeqId, (Sequence, R)>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl<R> Scheduler<R> {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.max_num_seqs > 0 && cfg.max_num_batched_tokens > 0);
        Self {
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queue `seq` with its request state.
    pub fn add(&mut self, seq: Sequence, request: R) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, (seq, request));
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id).map(|(s, _)| s)
    }

    /// A sequence's request state.
    pub fn request(&self, id: SeqId) -> Option<&R> {
        self.seqs.get(&id).map(|(_, r)| r)
    }

    /// A sequence and its request state.
    pub fn get_mut(&mut self, id: SeqId) -> Option<(&mut Sequence, &mut R)> {
        self.seqs.get_mut(&id).map(|(s, r)| (s, r))
    }

    /// Every sequence's request state.
    pub fn requests(&self) -> impl Iterator<Item = (SeqId, &R)> {
        self.seqs.iter().map(|(&id, (_, r))| (id, r))
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Decide what each sequence computes in the next step, allocating KV slots for it.
    pub fn schedule(&mut self, kv: &mut KvManager) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some((seq, _)) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = seq.num_uncomputed().min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let target = seq.num_computed_tokens + n;
            let samples = target == seq.num_tokens();
            let mut scheduled = true;
            while kv.allocate_slots(id, target).is_err() {
                // Preempt the newest running sequence (never one already scheduled this step:
                // those sit before `i`).
                let Some(victim) = self.running.pop() else {
                    scheduled = false;
                    break;
                };
                self.preempt(victim, kv);
                out.preempted.push(victim);
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            out.scheduled.push(ScheduledSeq {
                seq_id: id,
                num_new_tokens: n,
                samples,
            });
            budget -= n;
            i += 1;
        }

        // Admit waiting sequences, unless this step had to preempt (no room to grow).
        if out.preempted.is_empty() {
            while let Some(&id) = self.waiting.front() {
                if budget == 0 || self.running.len() >= self.cfg.max_num_seqs {
                    break;
                }
                let Some((seq, _)) = self.seqs.get_mut(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                // A waiting sequence (new or preempted) holds no blocks; it starts from its
                // longest cached prefix, taken only if the whole allocation fits.
                let hit = kv.get_computed_blocks(&seq.token_ids);
                let start = hit.num_tokens;
                let n = (seq.num_tokens() - start).min(budget);
                let target = start + n;
                if kv.allocate_slots_with(id, target, hit).is_err() {
                    break;
                }
                seq.num_computed_tokens = start;
                out.scheduled.push(ScheduledSeq {
                    seq_id: id,
                    num_new_tokens: n,
                    samples: target == seq.num_tokens(),
                });
                budget -= n;
                self.waiting.pop_front();
                self.running.push(id);
            }
        }
        out
    }

    /// Record that a step computed what `out` scheduled, publishing blocks that became full.
    pub fn on_step_computed(&mut self, out: &SchedulerOutput, kv: &mut KvManager) {
        for s in &out.scheduled {
            if let Some((seq, _)) = self.seqs.get_mut(&s.seq_id) {
                seq.num_computed_tokens += s.num_new_tokens;
                kv.cache_full_blocks(s.seq_id, &seq.token_ids, seq.num_computed_tokens);
            }
        }
    }

    /// Append a sampled token to a running sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some((seq, _)) = self.seqs.get_mut(&id) {
            seq.token_ids.push(token);
        }
    }

    /// Remove a sequence (finished or aborted) wherever it is, free its blocks, and hand back
    /// its request state.
    pub fn remove(&mut self, id: SeqId, kv: &mut KvManager) -> Option<(Sequence, R)> {
        let seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        kv.free(id);
        Some(seq)
    }

    fn preempt(&mut self, id: SeqId, kv: &mut KvManager) {
        kv.free(id);
        if let Some((seq, _)) = self.seqs.get_mut(&id) {
            seq.num_computed_tokens = 0;
        }
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_num_seqs: usize, max_num_batched_tokens: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
        })
    }

    impl Scheduler {
        fn add_seq(&mut self, seq: Sequence) {
            self.add(seq, ());
        }
    }

    fn step(s: &mut Scheduler, kv: &mut KvManager) -> SchedulerOutput {
        let out = s.schedule(kv);
        s.on_step_computed(&out, kv);
        out
    }

    fn seq(id: SeqId, len: usize) -> Sequence {
        Sequence::new(id, (0..len as u32).collect())
    }

    fn sch(seq_id: SeqId, num_new_tokens: usize, samples: bool) -> ScheduledSeq {
        ScheduledSeq {
            seq_id,
            num_new_tokens,
            samples,
        }
    }

    #[test]
    fn prefill_then_decode_joins_new_requests() {
        let mut kv = KvManager::new(16, 4);
        let mut s = sched(8, 64);
        s.add_seq(seq(1, 6));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 6, true)]);
        assert_eq!(kv.block_table(1), &[0, 1]);

        s.append_token(1, 42);
        s.add_seq(seq(2, 3));
        // Continuous batching: seq 1 decodes while seq 2 prefills in the same step.
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 1, true), sch(2, 3, true)]);
        assert_eq!(kv.block_table(2), &[2]);
        assert_eq!(s.get(1).unwrap().num_computed_tokens, 7);

        s.remove(1, &mut kv);
        assert_eq!(kv.num_free_blocks(), 15);
    }

    #[test]
    fn chunked_prefill_within_token_budget() {
        let mut kv = KvManager::new(16, 4);
        let mut s = sched(8, 5);
        s.add_seq(seq(1, 12));
        s.add_seq(seq(2, 2));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 5, false)]);
        assert_eq!(kv.block_table(1), &[0, 1]);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 5, false)]);
        assert_eq!(kv.block_table(1), &[0, 1, 2]);
        // Last 2 tokens of seq 1, and seq 2 fills the rest of the budget.
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 2, true), sch(2, 2, true)]);
        assert_eq!(kv.block_table(2), &[3]);
        assert_eq!(out.num_batched_tokens(), 4);
    }

    #[test]
    fn a_long_waiting_prompt_is_chunked_after_running_decodes() {
        let mut kv = KvManager::new(16, 4);
        let mut s = sched(8, 4);
        s.add_seq(seq(1, 2));
        step(&mut s, &mut kv);
        s.append_token(1, 9);
        s.add_seq(seq(2, 10));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 1, true), sch(2, 3, false)]);
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut kv = KvManager::new(16, 4);
        let mut s = sched(2, 64);
        for id in 1..=3 {
            s.add_seq(seq(id, 2));
        }
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        s.remove(1, &mut kv);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(3, 2, true)]);
    }

    #[test]
    fn preempts_newest_by_recompute_and_resumes() {
        // 4 blocks of 2 tokens. Two sequences of 4 tokens take all of them.
        let mut kv = KvManager::new(4, 2);
        let mut s = sched(8, 64);
        s.add_seq(seq(1, 4));
        s.add_seq(seq(2, 4));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(1, 4, true), sch(2, 4, true)]);
        assert_eq!(kv.block_table(1), &[0, 1]);
        assert_eq!(kv.block_table(2), &[2, 3]);

        // Both decode; seq 1 needs a third block: seq 2 (newest) is preempted.
        s.append_token(1, 7);
        s.append_token(2, 8);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(out.scheduled, vec![sch(1, 1, true)]);
        assert_eq!(kv.block_table(1), &[0, 1, 3]);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.get(2).unwrap().num_computed_tokens, 0);
        assert_eq!(
            s.get(2).unwrap().num_tokens(),
            5,
            "generated tokens are kept"
        );
        assert_eq!(s.num_preemptions(), 1);

        // Seq 1 finishes; seq 2 is recomputed (prompt + its generated token) in one step.
        s.remove(1, &mut kv);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(2, 5, true)]);
        // Free list after seq 1's tail-first free: [2, 3, 1, 0].
        assert_eq!(kv.block_table(2), &[2, 3, 1]);
    }

    #[test]
    fn a_sequence_preempts_itself_when_alone_with_no_room() {
        let mut kv = KvManager::new(2, 2);
        let mut s = sched(8, 64);
        s.add_seq(seq(1, 4));
        step(&mut s, &mut kv);
        s.append_token(1, 1);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.preempted, vec![1]);
        assert!(out.scheduled.is_empty());
        assert_eq!(kv.num_free_blocks(), 2);
    }

    #[test]
    fn remove_from_waiting_frees_nothing_twice() {
        let mut kv = KvManager::new(4, 2);
        let mut s = sched(1, 64);
        s.add_seq(seq(1, 2));
        s.add_seq(seq(2, 2));
        step(&mut s, &mut kv);
        assert!(s.remove(2, &mut kv).is_some());
        assert!(s.remove(2, &mut kv).is_none());
        assert_eq!(kv.num_free_blocks(), 3);
        assert!(s.remove(1, &mut kv).is_some());
        assert!(s.is_empty());
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn a_prefix_hit_computes_only_the_rest_and_resumes_preempted_work_cheaply() {
        let mut kv = KvManager::with_prefix_caching(8, 4, true, "m");
        let mut s = sched(8, 64);
        let prompt: Vec<u32> = (0..10).collect();
        s.add_seq(Sequence::new(1, prompt.clone()));
        assert_eq!(step(&mut s, &mut kv).scheduled, vec![sch(1, 10, true)]);
        s.remove(1, &mut kv);

        // The same prompt again: 8 tokens come from cache, 2 are computed.
        s.add_seq(Sequence::new(2, prompt.clone()));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(2, 2, true)]);
        assert_eq!(kv.block_table(2), &[0, 1, 3]);
        assert_eq!(kv.prefix_cache_counters(), (20, 8));
    }

    #[test]
    fn a_failed_admission_returns_the_cached_blocks() {
        let mut kv = KvManager::with_prefix_caching(3, 4, true, "m");
        let mut s = sched(8, 64);
        s.add_seq(Sequence::new(1, (0..8).collect()));
        step(&mut s, &mut kv);
        s.remove(1, &mut kv);
        s.add_seq(Sequence::new(9, (100..108).collect())); // takes blocks 2 and 1 (evicting 1)
        step(&mut s, &mut kv);
        // Seq 2 hits cached block 0 but needs one more block and none is free: it keeps
        // waiting and holds nothing.
        let mut prompt: Vec<u32> = (0..4).collect();
        prompt.extend(200..204);
        s.add_seq(Sequence::new(2, prompt));
        let out = step(&mut s, &mut kv);
        assert!(out.scheduled.iter().all(|x| x.seq_id != 2));
        assert_eq!(kv.block_table(2), &[] as &[u32]);
        assert_eq!(s.get(2).unwrap().num_computed_tokens, 0);
        assert_eq!(kv.num_free_blocks(), 1);
        assert_eq!(kv.ref_count(0), 0);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_block() {
        let mut kv = KvManager::with_prefix_caching(8, 4, true, "m");
        let mut s = sched(8, 64);
        let prompt: Vec<u32> = (0..8).collect();
        s.add_seq(Sequence::new(1, prompt.clone()));
        step(&mut s, &mut kv);
        s.remove(1, &mut kv);
        // Both blocks are cached, but the last token must be computed to sample: the first
        // block is reused and the second recomputed into a fresh block.
        s.add_seq(Sequence::new(2, prompt));
        assert_eq!(step(&mut s, &mut kv).scheduled, vec![sch(2, 4, true)]);
        assert_eq!(kv.block_table(2), &[0, 2]);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn a_preempted_sequence_resumes_from_its_own_cached_blocks() {
        // 4 blocks of 2: seq 1 (4 tokens) and seq 2 (4 tokens) fill the pool.
        let mut kv = KvManager::with_prefix_caching(4, 2, true, "m");
        let mut s = sched(8, 64);
        s.add_seq(seq(1, 4));
        s.add_seq(Sequence::new(2, (10..14).collect()));
        step(&mut s, &mut kv);
        s.append_token(1, 4);
        s.append_token(2, 14);
        let out = step(&mut s, &mut kv);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(
            kv.block_table(1),
            &[0, 1, 3],
            "seq 2's tail block went to seq 1"
        );
        s.remove(1, &mut kv);
        // Seq 2's first block (tokens 10 11) is still cached: only 3 of its 5 tokens run.
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(2, 3, true)]);
        assert_eq!(kv.block_table(2)[0], 2);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn chunked_prefill_starts_after_a_prefix_hit() {
        let mut kv = KvManager::with_prefix_caching(16, 4, true, "m");
        let mut s = sched(8, 64);
        s.add_seq(seq(1, 9));
        step(&mut s, &mut kv);
        s.remove(1, &mut kv);
        // 8 tokens hit; the remaining 12 of 20 come in chunks of 5.
        let mut s = sched(8, 5);
        s.add_seq(seq(2, 20));
        let out = step(&mut s, &mut kv);
        assert_eq!(out.scheduled, vec![sch(2, 5, false)]);
        assert_eq!(s.get(2).unwrap().num_computed_tokens, 13);
        assert_eq!(&kv.block_table(2)[..2], &[0, 1]);
        assert_eq!(step(&mut s, &mut kv).scheduled, vec![sch(2, 5, false)]);
        assert_eq!(step(&mut s, &mut kv).scheduled, vec![sch(2, 2, true)]);
        assert_eq!(kv.block_table(2).len(), 5);
        kv.check_invariants().unwrap();
    }

    /// Seeded random workloads (arrivals with shared prefixes, decodes, aborts, preemption,
    /// tiny pools and budgets): after every step the pool's invariants hold, the step respects
    /// its limits and allocated what it scheduled, work always progresses, and once every
    /// request has ended no block or table is left.
    #[test]
    fn random_scenarios_keep_the_pool_consistent() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let bs = [1, 2, 4][rng.random_range(0..3)];
            let num_blocks = rng.random_range(3..20);
            let max_len = num_blocks * bs;
            let caching = rng.random_bool(0.8);
            let mut kv = KvManager::with_prefix_caching(num_blocks, bs, caching, "m");
            let (max_seqs, budget) = (rng.random_range(1..6), rng.random_range(1..24));
            // Each sequence carries the length at which it finishes.
            let mut s: Scheduler<usize> = Scheduler::new(SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: budget,
            });
            let prefixes: Vec<Vec<u32>> = (0..3)
                .map(|p| (0..max_len as u32).map(|t| p * 1000 + t).collect())
                .collect();
            let mut next_id = 0;
            let mut live: Vec<SeqId> = Vec::new();
            for step_no in 0..100_000 {
                if step_no < 200 && rng.random_bool(0.3) {
                    let len = rng.random_range(1..=max_len);
                    let mut prompt = prefixes[rng.random_range(0..3)].clone();
                    prompt.truncate(rng.random_range(1..=len));
                    prompt.resize(len, 7);
                    let end = rng.random_range(len..=max_len);
                    next_id += 1;
                    s.add(Sequence::new(next_id, prompt), end);
                    live.push(next_id);
                }
                if !live.is_empty() && rng.random_bool(0.05) {
                    let id = live.swap_remove(rng.random_range(0..live.len()));
                    s.remove(id, &mut kv);
                }
                let out = s.schedule(&mut kv);
                kv.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step_no}: {e}"));
                assert!(out.num_batched_tokens() <= budget && s.num_running() <= max_seqs);
                if !s.is_empty() {
                    assert!(
                        !out.scheduled.is_empty() || !out.preempted.is_empty(),
                        "seed {seed} step {step_no}: stalled"
                    );
                }
                for x in &out.scheduled {
                    let seq = s.get(x.seq_id).unwrap();
                    let target = seq.num_computed_tokens + x.num_new_tokens;
                    assert!(target <= seq.num_tokens());
                    assert!(kv.block_table(x.seq_id).len() * bs >= target);
                }
                s.on_step_computed(&out, &mut kv);
                kv.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step_no}: {e}"));
                for x in out.scheduled.iter().filter(|x| x.samples) {
                    let Some((seq, &mut end)) = s.get_mut(x.seq_id) else {
                        continue;
                    };
                    if seq.num_tokens() >= end {
                        s.remove(x.seq_id, &mut kv);
                        live.retain(|&id| id != x.seq_id);
                    } else {
                        s.append_token(x.seq_id, rng.random_range(0..50));
                    }
                }
                if step_no >= 200 && s.is_empty() {
                    break;
                }
            }
            assert!(
                s.is_empty(),
                "seed {seed}: {} requests never finished",
                live.len()
            );
            assert_eq!(
                kv.num_free_blocks(),
                num_blocks,
                "seed {seed}: leaked blocks"
            );
            assert_eq!(kv.num_sequences(), 0);
            kv.check_invariants().unwrap();
        }
    }
}
