//! A sequence as the scheduler sees it: token ids and how many of them are already in the KV
//! cache. Everything else about a request (sampling, detokenizer, client channel) lives in the
//! engine loop, keyed by the same id.

use super::kv::SeqId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt tokens followed by generated tokens.
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V are in the cache. Catches up with `token_ids.len()` step by step; reset
    /// to 0 when the sequence is preempted (recompute).
    pub num_computed_tokens: usize,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        Self {
            id,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// Tokens still to be computed before this sequence can sample again.
    pub fn num_uncomputed(&self) -> usize {
        self.token_ids.len() - self.num_computed_tokens
    }
}
