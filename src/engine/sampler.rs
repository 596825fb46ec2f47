//! Choosing the next token from a row of logits: greedy at temperature 0, otherwise
//! temperature → top-k → softmax → top-p (nucleus) → a draw from the request's own RNG, so a
//! seeded request draws the same numbers whatever else shares its batches.

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
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
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
    c
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
            seed: None,
        }
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
