//! Logits processors, applied in place to one sequence's row before sampling, in vLLM's order:
//! `logit_bias`, the `min_tokens` mask on end tokens, then repetition / frequency / presence
//! penalties. Pure functions over plain slices; the per-request counts live in [`TokenHistory`].

use std::collections::{HashMap, HashSet};

use super::sampler::SamplingParams;

/// What the penalties need to know about a sequence's tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Generated tokens and how often each occurred.
    pub output_counts: HashMap<u32, u32>,
    /// Distinct prompt tokens (kept only when a repetition penalty is set).
    pub prompt_tokens: HashSet<u32>,
    pub num_output: usize,
}

impl TokenHistory {
    pub fn new(prompt: &[u32], params: &SamplingParams) -> Self {
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            output_counts: HashMap::new(),
            prompt_tokens,
            num_output: 0,
        }
    }

    pub fn push(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.num_output += 1;
    }
}

/// Whether [`process`] would leave the logits as they are (no bias, no end-token mask at this
/// point of the output, no penalties).
pub fn is_identity(p: &SamplingParams, h: &TokenHistory) -> bool {
    p.logit_bias.is_empty()
        && h.num_output >= p.min_tokens
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
}

/// Apply every processor `p` asks for. `end_tokens` (EOS and `stop_token_ids`) are masked
/// while fewer than `min_tokens` tokens have been generated.
pub fn process(logits: &mut [f32], p: &SamplingParams, h: &TokenHistory, end_tokens: &[u32]) {
    for &(tok, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(tok as usize) {
            *l += bias;
        }
    }
    if h.num_output < p.min_tokens {
        for &t in end_tokens {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if p.repetition_penalty != 1.0 {
        let seen = h.prompt_tokens.iter().chain(h.output_counts.keys());
        let mut done = HashSet::new();
        for &t in seen {
            if !done.insert(t) {
                continue;
            }
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &count) in &h.output_counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn history(prompt: &[u32], output: &[u32], p: &SamplingParams) -> TokenHistory {
        let mut h = TokenHistory::new(prompt, p);
        for &t in output {
            h.push(t);
        }
        h
    }

    #[test]
    fn logit_bias_adds_and_ignores_out_of_range_ids() {
        let p = SamplingParams {
            logit_bias: vec![(1, 2.5), (3, -100.0), (99, 1.0)],
            ..params()
        };
        let mut l = vec![0.0, 1.0, 2.0, 3.0];
        process(&mut l, &p, &TokenHistory::default(), &[]);
        assert_eq!(l, vec![0.0, 3.5, 2.0, -97.0]);
    }

    #[test]
    fn min_tokens_masks_end_tokens_until_reached() {
        let p = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        let mut l = vec![1.0, 2.0, 3.0];
        process(&mut l, &p, &history(&[], &[0], &p), &[2]);
        assert_eq!(l, vec![1.0, 2.0, f32::NEG_INFINITY]);
        let mut l = vec![1.0, 2.0, 3.0];
        process(&mut l, &p, &history(&[], &[0, 0], &p), &[2]);
        assert_eq!(l, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output_once_each() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params()
        };
        let mut l = vec![4.0, -4.0, 4.0, 4.0];
        // Token 0 in the prompt, token 1 in prompt and output (twice), token 2 never.
        let h = history(&[0, 1], &[1, 1], &p);
        process(&mut l, &p, &h, &[]);
        assert_eq!(l, vec![2.0, -8.0, 4.0, 4.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_use_output_counts_only() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..params()
        };
        let mut l = vec![0.0; 4];
        let h = history(&[3, 3, 3], &[1, 2, 2, 2], &p);
        process(&mut l, &p, &h, &[]);
        assert_eq!(l, vec![0.0, -1.5, -2.5, 0.0]);
    }

    #[test]
    fn identity_only_without_any_processor() {
        let p = params();
        assert!(is_identity(&p, &history(&[1], &[], &p)));
        let biased = SamplingParams {
            logit_bias: vec![(3, 1.0)],
            ..params()
        };
        assert!(!is_identity(&biased, &history(&[1], &[], &biased)));
        let min = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        assert!(!is_identity(&min, &history(&[1], &[5], &min)));
        assert!(is_identity(&min, &history(&[1], &[5, 6], &min)));
        let pen = SamplingParams {
            presence_penalty: 0.5,
            ..params()
        };
        assert!(!is_identity(&pen, &history(&[1], &[], &pen)));
    }
}
