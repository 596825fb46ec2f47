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

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::family::{self, Family, FamilyConfig};
use super::layers::{
    paged_attend, AttnDims, GateUpLayout, GatedMlp, HfRope, Linear, Moe, MoeDims, Pass, RmsNorm,
    RopeStyle, RotaryEmbedding, Routing, TopkMethod, Trunk, TrunkDims,
};
use super::loader::GgufMeta;
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
    #[serde(default)]
    pub topk_method: TopkMethod,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub scoring_func: ScoringFunc,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(flatten)]
    pub rope: HfRope,
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

/// How router logits become probabilities; DeepSeek-V2 uses softmax (V3's sigmoid is not
/// implemented, so a V3 config fails at parse).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    #[default]
    Softmax,
}

/// The DeepSeek-V2 family: `DeepseekV2ForCausalLM` and GGUF `deepseek2`.
pub const FAMILY: Family = Family {
    name: "deepseek_v2",
    hf_architectures: &["DeepseekV2ForCausalLM"],
    from_hf: |v| Ok(Box::new(DeepseekV2Config::from_json(v)?)),
    gguf: Some((&["deepseek2"], |md, w| {
        Ok(Box::new(DeepseekV2Config::from_gguf(md, w)?))
    })),
};

impl FamilyConfig for DeepseekV2Config {
    fn max_position_embeddings(&self) -> usize {
        self.max_positions()
    }

    fn load(self: Box<Self>, w: &Weights, max_positions: usize) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(DeepseekV2::load(*self, w, max_positions)?))
    }
}

impl DeepseekV2Config {
    pub fn from_json(v: serde_json::Value) -> Result<Self> {
        let c: Self = family::parse(v)?;
        if c.moe_layer_freq == 0 {
            return Err(ModelError::Config(
                "moe_layer_freq must be at least 1".into(),
            ));
        }
        c.rope.scaling().map_err(ModelError::Config)?;
        Ok(c)
    }

    /// From llama.cpp's `deepseek2` metadata, written as the `config.json` it came from and
    /// parsed as one: MLA sizes from `key_length_mla` / `value_length_mla` (older files: per-
    /// head `key_length` / `value_length`), group-limited routing when the file has expert
    /// groups, and YaRN with `mscale = mscale_all_dim = yarn_log_multiplier / 0.1` (the
    /// converter stores `0.1 * mscale_all_dim`; DeepSeek's checkpoints set both equal).
    pub fn from_gguf(md: &GgufMeta, w: &Weights) -> Result<Self> {
        use serde_json::{json, Value};
        let u = |k: &str| md.arch_usize(k);
        let opt_u = |k: &str| u(k).ok();
        let rope = u("rope.dimension_count")?;
        let (key, value) = match (
            u("attention.key_length_mla"),
            u("attention.value_length_mla"),
        ) {
            (Ok(k), Ok(v)) => (k, v),
            _ => (u("attention.key_length")?, u("attention.value_length")?),
        };
        if let Ok(f) = u("expert_gating_func") {
            if f != 1 {
                return Err(ModelError::Unsupported(format!(
                    "deepseek2 expert_gating_func {f} (only softmax, 1, is implemented)"
                )));
            }
        }
        let groups = opt_u("expert_group_count").unwrap_or(1);
        let vocab = md.vocab_size()?;
        let mut cfg = json!({
            "vocab_size": vocab,
            "hidden_size": u("embedding_length")?,
            "intermediate_size": u("feed_forward_length")?,
            "moe_intermediate_size": opt_u("expert_feed_forward_length"),
            "num_hidden_layers": u("block_count")?,
            "num_attention_heads": u("attention.head_count")?,
            "n_shared_experts": opt_u("expert_shared_count"),
            "n_routed_experts": opt_u("expert_count"),
            "routed_scaling_factor": md.arch_f64("expert_weights_scale").unwrap_or(1.0),
            "topk_method": if groups > 1 { "group_limited_greedy" } else { "greedy" },
            "n_group": groups,
            "topk_group": opt_u("expert_group_used_count").unwrap_or(groups),
            "num_experts_per_tok": opt_u("expert_used_count"),
            "first_k_dense_replace": opt_u("leading_dense_block_count").unwrap_or(0),
            "norm_topk_prob": opt_u("expert_weights_norm").is_some_and(|n| n != 0),
            "q_lora_rank": opt_u("attention.q_lora_rank"),
            "kv_lora_rank": u("attention.kv_lora_rank")?,
            "qk_nope_head_dim": key.checked_sub(rope).ok_or_else(|| {
                ModelError::Config(format!("deepseek2 key length {key} < rope dimensions {rope}"))
            })?,
            "qk_rope_head_dim": rope,
            "v_head_dim": value,
            "rope_theta": md.arch_f64("rope.freq_base").unwrap_or(10_000.0),
            "rms_norm_eps": md.arch_f64("attention.layer_norm_rms_epsilon")?,
            "max_position_embeddings": opt_u("context_length"),
            "tie_word_embeddings": !w.contains("lm_head.weight"),
        });
        if md
            .string(&format!("{}.rope.scaling.type", md.arch))
            .ok()
            .as_deref()
            == Some("yarn")
        {
            let f = |k: &str| md.arch_f64(&format!("rope.scaling.{k}")).ok();
            let mut scaling = json!({
                "type": "yarn",
                "factor": f("factor").unwrap_or(1.0),
                "original_max_position_embeddings": opt_u("rope.scaling.original_context_length"),
                "beta_fast": f("yarn_beta_fast").unwrap_or(32.0),
                "beta_slow": f("yarn_beta_slow").unwrap_or(1.0),
            });
            if let Some(log_mul) = f("yarn_log_multiplier") {
                scaling["mscale"] = Value::from(log_mul / 0.1);
                scaling["mscale_all_dim"] = Value::from(log_mul / 0.1);
            }
            cfg["rope_scaling"] = scaling;
        }
        Self::from_json(cfg)
    }

    fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some()
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq)
    }

    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(4096)
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

impl Mla {
    fn load(w: &Weights, c: &DeepseekV2Config) -> Result<Self> {
        let (h, hidden, eps, bias) = (
            c.num_attention_heads,
            c.hidden_size,
            c.rms_norm_eps,
            c.attention_bias,
        );
        let (nope, rope, vd, lora) = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let q_out = h * (nope + rope);
        let q = match c.q_lora_rank {
            None => QProj::Direct(Linear::load(&w.pp("q_proj"), hidden, q_out, false)?),
            Some(r) => QProj::LowRank {
                a: Linear::load(&w.pp("q_a_proj"), hidden, r, bias)?,
                norm: RmsNorm::load(&w.pp("q_a_layernorm"), r, eps)?,
                b: Linear::load(&w.pp("q_b_proj"), r, q_out, false)?,
            },
        };
        // `[heads, nope + v, lora]`: Hugging Face's `kv_b_proj`, or llama.cpp's split of it
        // (`k_b` transposed, `[heads, lora, nope]`, and `v_b`, `[heads, v, lora]`).
        let kv_b = if w.contains("kv_b_proj.weight") {
            w.get("kv_b_proj.weight", (h * (nope + vd), lora))?
                .reshape((h, nope + vd, lora))?
        } else {
            let k_b = w.get("k_b_proj.weight", (h, lora, nope))?;
            let v_b = w.get("v_b_proj.weight", (h, vd, lora))?;
            let k_b = k_b.to_dtype(v_b.dtype())?.transpose(1, 2)?;
            Tensor::cat(&[&k_b, &v_b], 1)?
        };
        Ok(Self {
            q,
            kv_a_proj_with_mqa: Linear::load(
                &w.pp("kv_a_proj_with_mqa"),
                hidden,
                lora + rope,
                bias,
            )?,
            kv_a_layernorm: RmsNorm::load(&w.pp("kv_a_layernorm"), lora, eps)?,
            w_uk: kv_b.narrow(1, 0, nope)?.contiguous()?,
            w_uv: kv_b.narrow(1, nope, vd)?.transpose(1, 2)?.contiguous()?,
            o_proj: Linear::load(&w.pp("o_proj"), h * vd, hidden, bias)?,
        })
    }
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

impl Layer {
    fn load(w: &Weights, c: &DeepseekV2Config, i: usize, routing: Routing) -> Result<Self> {
        let (hidden, eps) = (c.hidden_size, c.rms_norm_eps);
        let mlp = w.pp("mlp");
        let mlp = if c.is_moe_layer(i) {
            let dims = MoeDims {
                hidden,
                n_routed_experts: c.n_routed_experts.unwrap_or(0),
                expert_intermediate: c.moe_intermediate_size.unwrap_or(c.intermediate_size),
                n_shared_experts: c.n_shared_experts.unwrap_or(0),
            };
            Ffn::Moe(Moe::load(&mlp, dims, routing)?)
        } else {
            let i = c.intermediate_size;
            Ffn::Dense(GatedMlp::load(&mlp, hidden, i, GateUpLayout::Separate)?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), hidden, eps)?,
            self_attn: Mla::load(&w.pp("self_attn"), c)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                hidden,
                eps,
            )?,
            mlp,
        })
    }
}

pub struct DeepseekV2 {
    cfg: DeepseekV2Config,
    layers: Vec<Layer>,
    trunk: Trunk,
    softmax_scale: f32,
}

impl DeepseekV2 {
    pub fn load(cfg: DeepseekV2Config, w: &Weights, max_positions: usize) -> Result<Self> {
        let routing = Routing {
            top_k: cfg.num_experts_per_tok.unwrap_or(1),
            method: cfg.topk_method,
            n_group: cfg.n_group.unwrap_or(1),
            topk_group: cfg.topk_group.unwrap_or(1),
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        };
        let scaling = cfg.rope.scaling().map_err(ModelError::Config)?;
        let rope = RotaryEmbedding::scaled(
            cfg.rope.theta(10_000.0),
            cfg.qk_rope_head_dim,
            max_positions,
            RopeStyle::Interleaved,
            scaling,
        );
        let dims = TrunkDims {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            tie_word_embeddings: cfg.tie_word_embeddings,
            rms_norm_eps: cfg.rms_norm_eps,
        };
        let trunk = Trunk::load(w, dims, rope)?;
        let layers = Trunk::load_layers(w, cfg.num_hidden_layers, |i, w| {
            Layer::load(w, &cfg, i, routing)
        })?;
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
