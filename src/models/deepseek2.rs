//! DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`): multi-head latent attention and a
//! mixture of experts.
//!
//! MLA runs in its absorbed form: the paged cache holds, per token and layer, only the
//! normalised KV latent (`kv_lora_rank`) and the shared rotary key (`qk_rope_head_dim`) as one
//! KV head, and never per-head K/V. `kv_b_proj` is split at load into `W_uk` (folded into the
//! queries: `q_nope · W_uk` scores against the latent directly) and `W_uv` (applied after
//! attention to the attended latent). Queries come from `q_proj`, or through the low-rank
//! `q_a_proj` → norm → `q_b_proj` when `q_lora_rank` is set. RoPE is interleaved on the rotary
//! part with YaRN scaling (cos/sin scaled by its attention factor, the softmax scale by
//! `mscale(factor, mscale_all_dim)^2`).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::layers::{
    paged_attend, AttnDims, GatedMlp, Linear, Moe, Pass, RmsNorm, RopeScaling, RopeStyle,
    RotaryEmbedding, Routing, TopkMethod, Trunk,
};
use super::weights::Weights;
use super::{CacheSpec, CausalLm, ForwardBatch, KvCache, ModelError, Result};

/// `config.json` of a DeepSeek-V2 checkpoint (hub form, or transformers 5's `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct DeepseekV2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    #[serde(default = "one")]
    pub routed_scaling_factor: f64,
    #[serde(default = "greedy")]
    pub topk_method: String,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    pub scoring_func: Option<String>,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn greedy() -> String {
    "greedy".into()
}

impl DeepseekV2Config {
    pub fn from_json(v: serde_json::Value) -> Result<Self> {
        let c: Self = serde_json::from_value(v).map_err(|e| ModelError::Config(e.to_string()))?;
        if let Some(f) = c.scoring_func.as_deref().filter(|f| *f != "softmax") {
            return Err(ModelError::Unsupported(format!(
                "DeepSeek scoring_func `{f}` (DeepSeek-V2 uses softmax)"
            )));
        }
        c.topk()?;
        if c.moe_layer_freq == 0 {
            return Err(ModelError::Config(
                "moe_layer_freq must be at least 1".into(),
            ));
        }
        Ok(c)
    }

    fn topk(&self) -> Result<TopkMethod> {
        match self.topk_method.as_str() {
            "greedy" => Ok(TopkMethod::Greedy),
            "group_limited_greedy" => Ok(TopkMethod::GroupLimitedGreedy),
            other => Err(ModelError::Unsupported(format!(
                "DeepSeek topk_method `{other}` (supported: greedy, group_limited_greedy)"
            ))),
        }
    }

    fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0)
    }

    fn rope_scaling(&self) -> Result<RopeScaling> {
        RopeScaling::from_hf(self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()))
            .map_err(ModelError::Config)
    }

    fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some()
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq)
    }

    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(4096)
    }

    /// Every weight's Hugging Face name and shape (for generated checkpoints).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        let (nope, rope, v, lora) = (
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.kv_lora_rank,
        );
        let mut w = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            w.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        let mlp = |w: &mut Vec<(String, Vec<usize>)>, p: String, i: usize| {
            w.push((format!("{p}.gate_proj.weight"), vec![i, h]));
            w.push((format!("{p}.up_proj.weight"), vec![i, h]));
            w.push((format!("{p}.down_proj.weight"), vec![h, i]));
        };
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            w.push((format!("{p}.input_layernorm.weight"), vec![h]));
            w.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            match self.q_lora_rank {
                None => w.push((format!("{a}.q_proj.weight"), vec![heads * (nope + rope), h])),
                Some(r) => {
                    w.push((format!("{a}.q_a_proj.weight"), vec![r, h]));
                    w.push((format!("{a}.q_a_layernorm.weight"), vec![r]));
                    w.push((
                        format!("{a}.q_b_proj.weight"),
                        vec![heads * (nope + rope), r],
                    ));
                }
            }
            w.push((
                format!("{a}.kv_a_proj_with_mqa.weight"),
                vec![lora + rope, h],
            ));
            w.push((format!("{a}.kv_a_layernorm.weight"), vec![lora]));
            w.push((
                format!("{a}.kv_b_proj.weight"),
                vec![heads * (nope + v), lora],
            ));
            w.push((format!("{a}.o_proj.weight"), vec![h, heads * v]));
            if self.is_moe_layer(l) {
                let mi = self.moe_intermediate_size.unwrap_or(self.intermediate_size);
                let e = self.n_routed_experts.unwrap_or(0);
                w.push((format!("{p}.mlp.gate.weight"), vec![e, h]));
                for x in 0..e {
                    mlp(&mut w, format!("{p}.mlp.experts.{x}"), mi);
                }
                if let Some(n) = self.n_shared_experts.filter(|&n| n > 0) {
                    mlp(&mut w, format!("{p}.mlp.shared_experts"), mi * n);
                }
            } else {
                mlp(&mut w, format!("{p}.mlp"), self.intermediate_size);
            }
        }
        w
    }
}

enum QProj {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

struct Mla {
    q: QProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    /// `[heads, qk_nope_head_dim, kv_lora_rank]`: folded into the queries.
    w_uk: Tensor,
    /// `[heads, kv_lora_rank, v_head_dim]`: applied to the attended latent.
    w_uv: Tensor,
    o_proj: Linear,
}

enum Ffn {
    Dense(GatedMlp),
    Moe(Moe),
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Mla,
    post_attention_layernorm: RmsNorm,
    mlp: Ffn,
}

pub struct DeepseekV2 {
    cfg: DeepseekV2Config,
    layers: Vec<Layer>,
    trunk: Trunk,
    softmax_scale: f32,
}

impl DeepseekV2 {
    pub fn load(cfg: DeepseekV2Config, w: &mut Weights, max_positions: usize) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let h = cfg.num_attention_heads;
        let (nope, vd, lora) = (cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let embedding = Trunk::embedding(w, cfg.tie_word_embeddings)?;
        let routing = Routing {
            top_k: cfg.num_experts_per_tok.unwrap_or(1),
            method: cfg.topk()?,
            n_group: cfg.n_group.unwrap_or(1),
            topk_group: cfg.topk_group.unwrap_or(1),
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let bias = cfg.attention_bias;
            let q = match cfg.q_lora_rank {
                None => QProj::Direct(w.linear(&format!("{a}.q_proj"), false)?),
                Some(_) => QProj::LowRank {
                    a: w.linear(&format!("{a}.q_a_proj"), bias)?,
                    norm: w.rms_norm(&format!("{a}.q_a_layernorm"), eps)?,
                    b: w.linear(&format!("{a}.q_b_proj"), false)?,
                },
            };
            let kv_b = w
                .tensor(&format!("{a}.kv_b_proj.weight"))?
                .reshape((h, nope + vd, lora))?;
            let self_attn = Mla {
                q,
                kv_a_proj_with_mqa: w.linear(&format!("{a}.kv_a_proj_with_mqa"), bias)?,
                kv_a_layernorm: w.rms_norm(&format!("{a}.kv_a_layernorm"), eps)?,
                w_uk: kv_b.narrow(1, 0, nope)?.contiguous()?,
                w_uv: kv_b.narrow(1, nope, vd)?.transpose(1, 2)?.contiguous()?,
                o_proj: w.linear(&format!("{a}.o_proj"), bias)?,
            };
            let mlp = if cfg.is_moe_layer(i) {
                let m = format!("{p}.mlp");
                let experts = (0..cfg.n_routed_experts.unwrap_or(0))
                    .map(|e| w.gated_mlp(&format!("{m}.experts.{e}")))
                    .collect::<Result<Vec<_>>>()?;
                let shared = match cfg.n_shared_experts {
                    Some(n) if n > 0 => Some(w.gated_mlp(&format!("{m}.shared_experts"))?),
                    _ => None,
                };
                Ffn::Moe(Moe {
                    gate: w
                        .tensor(&format!("{m}.gate.weight"))?
                        .to_dtype(DType::F32)?,
                    experts,
                    shared,
                    routing,
                })
            } else {
                Ffn::Dense(w.gated_mlp(&format!("{p}.mlp"))?)
            };
            layers.push(Layer {
                input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), eps)?,
                self_attn,
                post_attention_layernorm: w
                    .rms_norm(&format!("{p}.post_attention_layernorm"), eps)?,
                mlp,
            });
        }
        let scaling = cfg.rope_scaling()?;
        let rope = RotaryEmbedding::scaled(
            cfg.rope_theta(),
            cfg.qk_rope_head_dim,
            max_positions,
            RopeStyle::Interleaved,
            scaling,
        );
        let trunk = Trunk::finish(w, embedding, eps, rope)?;
        let qk_dim = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) as f64;
        let softmax_scale = (scaling.softmax_scale_factor() / qk_dim.sqrt()) as f32;
        Ok(Self {
            layers,
            trunk,
            softmax_scale,
            cfg,
        })
    }

    fn attention(
        &self,
        layer: usize,
        a: &Mla,
        x: &Tensor,
        kv: &mut KvCache,
        pass: &Pass,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (rope_tables, rows) = (&self.trunk.rope, &pass.rows);
        let t = x.dim(0)?;
        let h = c.num_attention_heads;
        let (nope, rope, lora, vd) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.kv_lora_rank,
            c.v_head_dim,
        );
        let q = match &a.q {
            QProj::Direct(l) => l.forward(x)?,
            QProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }
        .reshape((t, h, nope + rope))?;
        let q_pe = q
            .narrow(2, nope, rope)?
            .contiguous()?
            .reshape((t, h * rope))?;
        let q_pe = rope_tables
            .apply(&q_pe, rows, h, rope)?
            .reshape((t, h, rope))?;
        // Absorb W_uk: [heads, t, nope] x [heads, nope, lora] -> [t, heads, lora].
        let q_lat = q
            .narrow(2, 0, nope)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&a.w_uk)?
            .transpose(0, 1)?;
        let q = Tensor::cat(&[&q_lat, &q_pe], 2)?.reshape((t, h * (lora + rope)))?;

        let ckv = a.kv_a_proj_with_mqa.forward(x)?;
        let latent = a.kv_a_layernorm.forward(&ckv.narrow(1, 0, lora)?)?;
        let k_pe = rope_tables.apply(&ckv.narrow(1, lora, rope)?.contiguous()?, rows, 1, rope)?;
        let k = Tensor::cat(&[&latent, &k_pe], 1)?;

        let d = AttnDims {
            num_heads: h,
            num_kv_heads: 1,
            head_dim: lora + rope,
            v_head_dim: lora,
            values_in_keys: true,
            scale: self.softmax_scale,
        };
        let o = paged_attend(layer, &q, &k, None, pass.batch, kv, &pass.path, d)?;
        // Un-absorb W_uv: [heads, t, lora] x [heads, lora, v] -> [t, heads * v].
        let o = o
            .reshape((t, h, lora))?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&a.w_uv)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, h * vd))?;
        a.o_proj.forward(&o)
    }
}

impl CausalLm for DeepseekV2 {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor> {
        self.trunk
            .forward(batch, kv, self.layers.len(), |i, x, kv, pass| {
                let l = &self.layers[i];
                let h = l.input_layernorm.forward(&x)?;
                let x = (x + self.attention(i, &l.self_attn, &h, kv, pass)?)?;
                let h = l.post_attention_layernorm.forward(&x)?;
                let y = match &l.mlp {
                    Ffn::Dense(m) => m.forward(&h)?,
                    Ffn::Moe(m) => m.forward(&h)?,
                };
                Ok((x + y)?)
            })
    }

    /// One KV head holding the latent and the rotary key; the values are the latent.
    fn cache_spec(&self) -> CacheSpec {
        CacheSpec {
            num_layers: self.cfg.num_hidden_layers,
            num_kv_heads: 1,
            head_dim: self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,
            dtype: self.trunk.dtype,
            values_in_keys: Some(self.cfg.kv_lora_rank),
        }
    }

    fn device(&self) -> &Device {
        &self.trunk.device
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_positions()
    }
}
