//! Choosing the next token from a row of (processed, see `logits`) logits: greedy at
//! temperature 0, otherwise temperature → top-k → softmax → top-p (nucleus) → min-p → a draw from
//! the request's own RNG, so a seeded request draws the same numbers whatever else shares its
//! batches. Also the log-probabilities reported back to the client.

use rand::rngs::StdRng;
use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// `None` disables top-k.
    pub top_k: Option<usize>,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 disables; > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids.
    pub logit_bias: Vec<(u32, f32)>,
    /// End tokens are masked until this many tokens were generated.
    pub min_tokens: usize,
    /// Report the sampled token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == Some(1)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Candidate tokens with their probabilities after temperature, top-k and top-p, sorted by
/// probability (descending); probabilities renormalized to sum to 1.
pub fn candidates(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let inv_t = 1.0 / p.temperature.max(1e-5);
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, x * inv_t))
        .collect();
    if c.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    let by_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = p.top_k.filter(|&k| k > 0 && k < c.len()) {
        c.select_nth_unstable_by(k - 1, by_desc);
        c.truncate(k);
    }
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0f32;
    for x in c.iter_mut() {
        x.1 = (x.1 - max).exp();
        z += x.1;
    }
    for x in c.iter_mut() {
        x.1 /= z;
    }
    if p.top_p < 1.0 {
        // Sort only as much of the head as the nucleus needs: grow a prefix until it holds top_p.
        let mut head = 64.min(c.len());
        loop {
            if head < c.len() {
                c.select_nth_unstable_by(head - 1, by_desc);
            }
            c[..head].sort_unstable_by(by_desc);
            let sum: f32 = c[..head].iter().map(|x| x.1).sum();
            if sum >= p.top_p || head == c.len() {
                break;
            }
            head = (head * 8).min(c.len());
        }
        let mut acc = 0f32;
        let mut keep = c.len();
        for (i, x) in c.iter().enumerate() {
            acc += x.1;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
        let z: f32 = c.iter().map(|x| x.1).sum();
        for x in c.iter_mut() {
            x.1 /= z;
        }
    } else {
        c.sort_unstable_by(by_desc);
    }
    if p.min_p > 0.0 {
        // Sorted descending: the first candidate is the most likely.
        let floor = c[0].1 * p.min_p;
        c.retain(|x| x.1 >= floor);
        let z: f32 = c.iter().map(|x| x.1).sum();
        for x in c.iter_mut() {
            x.1 /= z;
        }
    }
    c
}

/// Log-probabilities of one sampled token and of the `k` most likely tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities under the distribution sampled from: the processed logits divided by the
/// temperature (at temperature 0, the processed logits themselves), before top-k/p truncation.
pub fn logprobs(logits: &[f32], temperature: f32, token: u32, k: usize) -> TokenLogprobs {
    let inv_t = if temperature < 1e-5 {
        1.0
    } else {
        1.0 / temperature
    };
    let max = logits
        .iter()
        .map(|&x| x * inv_t)
        .fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|&x| (x * inv_t - max).exp()).sum();
    let log_z = max + z.ln();
    let lp = |i: usize| logits[i] * inv_t - log_z;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = k.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_desc);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_desc);
        top = idx.into_iter().map(|i| (i, lp(i as usize))).collect();
    }
    TokenLogprobs {
        logprob: lp(token as usize),
        top,
    }
}

pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let c = candidates(logits, p);
    let u: f32 = rng.random();
    let mut acc = 0f32;
    for &(id, prob) in &c {
        acc += prob;
        if u < acc {
            return id;
        }
    }
    c.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(temperature: f32, top_p: f32, top_k: Option<usize>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            ..Default::default()
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        let logits = [1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln(), 4.0f32.ln()];
        // probs 0.1 0.2 0.3 0.4; min_p 0.5 keeps p >= 0.2.
        let p = SamplingParams {
            min_p: 0.5,
            ..params(1.0, 1.0, None)
        };
        let c = candidates(&logits, &p);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert!((c[2].1 - 2.0 / 9.0).abs() < 1e-6);
    }

    #[test]
    fn logprobs_are_log_softmax_at_the_temperature() {
        let logits = [0.0f32, 1.0f32.ln() + 1.0, 2.0];
        let lp = logprobs(&logits, 1.0, 0, 2);
        let z = (1.0f32 + 1f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (0.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((lp.top[0].1 - (2.0 - z)).abs() < 1e-6);
        // Temperature 2 halves the logits first.
        let lp2 = logprobs(&logits, 2.0, 2, 0);
        let z2 = (1.0f32 + 0.5f32.exp() + 1f32.exp()).ln();
        assert!((lp2.logprob - (1.0 - z2)).abs() < 1e-6);
        assert!(lp2.top.is_empty());
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            sample(&[0.0, 1.0, 5.0], &params(0.0, 1.0, None), &mut rng),
            2
        );
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let logits = [1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln(), 4.0f32.ln()];
        // probs 0.1 0.2 0.3 0.4
        let c = candidates(&logits, &params(1.0, 1.0, Some(2)));
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!((c[0].1 - 4.0 / 7.0).abs() < 1e-6);
        let c = candidates(&logits, &params(1.0, 0.65, None));
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        let c = candidates(&logits, &params(1.0, 0.75, None));
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2, 1]);
    }

    #[test]
    fn top_p_over_a_large_flat_vocab_grows_the_sorted_head() {
        let logits = vec![0.0f32; 5000];
        let c = candidates(&logits, &params(1.0, 0.5, None));
        assert_eq!(c.len(), 2500);
        assert_eq!(c[0].0, 0);
    }

    #[test]
    fn temperature_sharpens_and_seed_reproduces() {
        let logits = [0.0f32, 1.0];
        let c = candidates(&logits, &params(0.5, 1.0, None));
        let e2 = (2.0f32).exp();
        assert!((c[0].1 - e2 / (1.0 + e2)).abs() < 1e-6);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..32)
                .map(|_| sample(&[0.0, 0.0, 0.0], &params(1.0, 1.0, None), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
