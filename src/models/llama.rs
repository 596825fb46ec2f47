//! The Llama decoder (`LlamaForCausalLM`), which also serves Qwen2 (`Qwen2ForCausalLM`: the
//! same blocks with q/k/v biases) and GLM-4 (`glm4.rs`: fused gate_up, partial interleaved RoPE).
//! Fields are named after the checkpoint's tensors.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::layers::{
    paged_attend, AttnDims, GatedMlp, Linear, Pass, Projections, RmsNorm, RopeScaling, RopeStyle,
    RotaryEmbedding, Trunk,
};
use super::weights::Weights;
use super::{CacheSpec, CausalLm, ForwardBatch, KvCache, ModelError, Result};

/// Normalized configuration, whichever format it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// Fraction of each head's dimensions that are rotated (GLM-4: 0.5); the rest pass through.
    pub partial_rotary_factor: f64,
}

impl LlamaConfig {
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

/// `config.json` of a Hugging Face Llama or Qwen2 checkpoint.
#[derive(Debug, Deserialize)]
pub struct HfLlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    pub vocab_size: usize,
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl HfLlamaConfig {
    pub fn into_config(self, qwen2: bool) -> Result<LlamaConfig> {
        // transformers 5.x moves rope_theta under rope_parameters; hub checkpoints keep it on top.
        let rope_theta = self
            .rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_scaling =
            RopeScaling::from_hf(self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()))
                .map_err(ModelError::Config)?;
        Ok(LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            vocab_size: self.vocab_size,
            attention_bias: self.attention_bias.unwrap_or(qwen2),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_style: RopeStyle::Neox,
            rope_scaling,
            partial_rotary_factor: 1.0,
        })
    }
}

impl LlamaConfig {
    /// Every weight's Hugging Face name and shape (for generated checkpoints).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
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
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut add = |n: &str, s: Vec<usize>| w.push((format!("{p}.{n}"), s));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            add("self_attn.q_proj.weight", vec![q, h]);
            add("self_attn.k_proj.weight", vec![kv, h]);
            add("self_attn.v_proj.weight", vec![kv, h]);
            add("self_attn.o_proj.weight", vec![h, q]);
            if self.attention_bias {
                add("self_attn.q_proj.bias", vec![q]);
                add("self_attn.k_proj.bias", vec![kv]);
                add("self_attn.v_proj.bias", vec![kv]);
            }
            add("mlp.gate_proj.weight", vec![i, h]);
            add("mlp.up_proj.weight", vec![i, h]);
            add("mlp.down_proj.weight", vec![h, i]);
        }
        w
    }
}

struct Attention {
    /// q, k, v.
    qkv: Projections,
    o_proj: Linear,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

pub struct Llama {
    cfg: LlamaConfig,
    layers: Vec<DecoderLayer>,
    trunk: Trunk,
}

impl Llama {
    /// `max_positions`: how many positions the RoPE tables cover (the serving context length).
    pub fn load(cfg: LlamaConfig, w: &mut Weights, max_positions: usize) -> Result<Self> {
        if !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(ModelError::Config(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        let embedding = Trunk::embedding(w, cfg.tie_word_embeddings)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let b = cfg.attention_bias;
            layers.push(DecoderLayer {
                input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), cfg.rms_norm_eps)?,
                self_attn: Attention {
                    qkv: w.projections(
                        &["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}")),
                        b,
                    )?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), false)?,
                },
                post_attention_layernorm: w
                    .rms_norm(&format!("{p}.post_attention_layernorm"), cfg.rms_norm_eps)?,
                mlp: w.gated_mlp(&format!("{p}.mlp"))?,
            });
        }
        let mut inv_freq = cfg.rope_scaling.inv_freqs(cfg.rope_theta, cfg.rotary_dim());
        // llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors.
        if w.contains("rope_freqs.weight") {
            let factors = w
                .tensor("rope_freqs.weight")?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != inv_freq.len() {
                return Err(ModelError::Config(format!(
                    "rope_freqs.weight has {} factors for {} frequencies",
                    factors.len(),
                    inv_freq.len()
                )));
            }
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d as f64;
            }
        }
        let rope = RotaryEmbedding::from_inv_freqs(
            &inv_freq,
            cfg.rope_scaling.attention_factor(),
            max_positions,
            cfg.rope_style,
        );
        let trunk = Trunk::finish(w, embedding, cfg.rms_norm_eps, rope)?;
        Ok(Self { layers, trunk, cfg })
    }

    fn attn_dims(&self) -> AttnDims {
        AttnDims::mha(
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )
    }

    fn attention(
        &self,
        layer: usize,
        a: &Attention,
        x: &Tensor,
        kv: &mut KvCache,
        pass: &Pass,
    ) -> Result<Tensor> {
        let d = self.attn_dims();
        let rope = &self.trunk.rope;
        let [q, k, v]: [Tensor; 3] = a
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| ModelError::Batch("q/k/v projections".into()))?;
        let q = rope.apply(&q, &pass.rows, d.num_heads, d.head_dim)?;
        let k = rope.apply(&k, &pass.rows, d.num_kv_heads, d.head_dim)?;
        let o = paged_attend(layer, &q, &k, Some(&v), pass.batch, kv, &pass.path, d)?;
        a.o_proj.forward(&o)
    }
}

impl CausalLm for Llama {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor> {
        self.trunk
            .forward(batch, kv, self.layers.len(), |i, x, kv, pass| {
                let l = &self.layers[i];
                let h = l.input_layernorm.forward(&x)?;
                let x = (x + self.attention(i, &l.self_attn, &h, kv, pass)?)?;
                let h = l.post_attention_layernorm.forward(&x)?;
                Ok((&x + l.mlp.forward(&h)?)?)
            })
    }

    fn cache_spec(&self) -> CacheSpec {
        CacheSpec {
            num_layers: self.cfg.num_hidden_layers,
            num_kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            dtype: self.trunk.dtype,
            values_in_keys: None,
        }
    }

    fn device(&self) -> &Device {
        &self.trunk.device
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}
