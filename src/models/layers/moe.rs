//! Mixture of experts with softmax routing (DeepSeek-V2): each token goes to `top_k` routed
//! experts chosen greedily or within the best groups (`group_limited_greedy`), weighted by its
//! routing probabilities, plus the shared experts every token goes through.

use candle_core::{DType, Tensor};

use super::{GateUpLayout, GatedMlp};
use crate::models::weights::Weights;
use crate::models::Result;

/// DeepSeek's `topk_method`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// The `top_k` highest scores.
    #[default]
    Greedy,
    /// Only experts in the `topk_group` groups whose best expert scores highest compete.
    GroupLimitedGreedy,
    /// Groups ranked by the sum of their two best scores instead (DeepSeek-V3's group rule,
    /// which llama.cpp applies to every model with expert groups, DeepSeek-V2's included). No
    /// checkpoint asks for it; it reproduces llama.cpp's reading of a file.
    #[serde(skip)]
    GroupTopTwoSum,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    /// Renormalise the chosen weights to sum to 1 (when `top_k > 1`); otherwise they are
    /// multiplied by `routed_scaling_factor` (DeepSeek-V2's rule).
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Indices of the `k` largest values, largest first (the lower index wins a tie).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// One token's experts and weights from its routing probabilities.
pub fn route(scores: &[f32], r: &Routing) -> Vec<(usize, f32)> {
    let mut s = scores.to_vec();
    if r.method != TopkMethod::Greedy && r.n_group > 1 {
        let per = s.len() / r.n_group;
        let best: Vec<f32> = s
            .chunks(per)
            .map(|g| match r.method {
                TopkMethod::GroupTopTwoSum => top_indices(g, 2).iter().map(|&i| g[i]).sum(),
                _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            })
            .collect();
        let keep = top_indices(&best, r.topk_group);
        for (g, chunk) in s.chunks_mut(per).enumerate() {
            if !keep.contains(&g) {
                chunk.fill(0.0);
            }
        }
    }
    let mut chosen: Vec<(usize, f32)> = top_indices(&s, r.top_k)
        .into_iter()
        .map(|i| (i, s[i]))
        .collect();
    if r.top_k > 1 && r.norm_topk_prob {
        let sum = chosen.iter().map(|c| c.1).sum::<f32>() + 1e-20;
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    } else {
        chosen
            .iter_mut()
            .for_each(|c| c.1 *= r.routed_scaling_factor);
    }
    chosen
}

#[derive(Debug, Clone)]
pub struct Moe {
    /// `[n_routed_experts, hidden]`, f32 (routing runs in f32).
    pub gate: Tensor,
    pub experts: Vec<GatedMlp>,
    pub shared: Option<GatedMlp>,
    pub routing: Routing,
}

/// The sizes of a mixture-of-experts block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeDims {
    pub hidden: usize,
    pub n_routed_experts: usize,
    /// Each expert's intermediate size.
    pub expert_intermediate: usize,
    /// Shared experts run as one MLP `n_shared_experts` times as wide; 0 for none.
    pub n_shared_experts: usize,
}

impl Moe {
    /// `gate`, `experts.{e}` and `shared_experts` under `w` (DeepSeek's names).
    pub fn load(w: &Weights, d: MoeDims, routing: Routing) -> Result<Self> {
        let (h, i) = (d.hidden, d.expert_intermediate);
        let experts = (0..d.n_routed_experts)
            .map(|e| GatedMlp::load(&w.pp(format!("experts.{e}")), h, i, GateUpLayout::Separate))
            .collect::<Result<Vec<_>>>()?;
        let shared = (d.n_shared_experts > 0)
            .then(|| {
                let wide = i * d.n_shared_experts;
                GatedMlp::load(&w.pp("shared_experts"), h, wide, GateUpLayout::Separate)
            })
            .transpose()?;
        Ok(Self {
            gate: w
                .get("gate.weight", (d.n_routed_experts, h))?
                .to_dtype(DType::F32)?,
            experts,
            shared,
            routing,
        })
    }

    /// `x`: `[tokens, hidden]`. Routing is decided on the host (a few floats per token); each
    /// expert then runs once on the rows routed to it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let mut rows: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (t, p) in probs.iter().enumerate() {
            for (e, w) in route(p, &self.routing) {
                rows[e].0.push(t as u32);
                rows[e].1.push(w);
            }
        }
        let mut out = x.zeros_like()?;
        for (expert, (idx, w)) in self.experts.iter().zip(&rows) {
            if idx.is_empty() {
                continue;
            }
            let idx = Tensor::new(idx.as_slice(), x.device())?;
            let y = expert.forward(&x.index_select(&idx, 0)?)?;
            let w = Tensor::new(w.as_slice(), x.device())?
                .to_dtype(y.dtype())?
                .unsqueeze(1)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(match &self.shared {
            Some(s) => (out + s.forward(x)?)?,
            None => out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(method: TopkMethod) -> Routing {
        Routing {
            top_k: 3,
            method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: false,
            routed_scaling_factor: 2.0,
        }
    }

    #[test]
    fn group_limited_routing_only_picks_from_the_best_groups() {
        // Groups of two: best scores 0.30, 0.20, 0.195, 0.05 -> groups 0 and 1 survive.
        let s = [0.30, 0.01, 0.20, 0.19, 0.195, 0.0, 0.05, 0.005];
        let greedy = route(&s, &routing(TopkMethod::Greedy));
        assert_eq!(greedy, vec![(0, 0.6), (2, 0.4), (4, 0.39)]);
        let grouped = route(&s, &routing(TopkMethod::GroupLimitedGreedy));
        assert_eq!(grouped, vec![(0, 0.6), (2, 0.4), (3, 0.38)]);
        // Top-two sums: 0.31, 0.39, 0.195, 0.055 -> groups 1 and 0.
        let top_two = route(&s, &routing(TopkMethod::GroupTopTwoSum));
        assert_eq!(top_two, grouped);
        let s2 = [0.30, 0.0, 0.20, 0.0, 0.18, 0.17, 0.05, 0.005];
        // Best: groups 0 and 1; top-two sums 0.30, 0.20, 0.35: groups 2 and 0.
        let best = route(&s2, &routing(TopkMethod::GroupLimitedGreedy));
        assert_eq!(best.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        let sums = route(&s2, &routing(TopkMethod::GroupTopTwoSum));
        assert_eq!(sums.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 4, 5]);
    }

    #[test]
    fn normalised_weights_sum_to_one() {
        let r = Routing {
            norm_topk_prob: true,
            ..routing(TopkMethod::Greedy)
        };
        let w = route(&[0.5, 0.25, 0.125, 0.125], &r);
        assert_eq!(w.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!((w.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
