//! The Llama decoder and the Llama family (`LlamaForCausalLM`, GGUF `llama`). The same decoder
//! serves Qwen2 (`qwen2.rs`: q/k/v biases) and GLM-4 (`glm4.rs`: fused gate_up, partial
//! interleaved RoPE), whose configs it takes as [`LlamaConfig`]. Fields are named after the
//! checkpoint's tensors.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::family::{self, Family, FamilyConfig};
use super::layers::{
    paged_attend, AttnDims, GateUpLayout, GatedMlp, HfRope, Linear, Pass, Projections, RmsNorm,
    RopeScaling, RopeStyle, RotaryEmbedding, Trunk, TrunkDims,
};
use super::loader::GgufMeta;
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
    /// llama.cpp's per-frequency divisors (a GGUF's `rope_freqs.weight`: Llama 3.1's scaling
    /// as llama.cpp converts it), applied after `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f64>>,
    pub gate_up: GateUpLayout,
    /// GLM-4-0414: each sublayer's output is normed again before the residual add
    /// (`post_self_attn_layernorm`, `post_mlp_layernorm`).
    pub sandwich_norms: bool,
}

impl LlamaConfig {
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

/// The Llama family: `LlamaForCausalLM` and GGUF `llama`.
pub const FAMILY: Family = Family {
    name: "llama",
    hf_architectures: &["LlamaForCausalLM"],
    from_hf: |v| {
        Ok(Box::new(
            family::parse::<HfLlamaConfig>(v)?.into_config(false)?,
        ))
    },
    // llama.cpp permutes Llama's Q/K rows so that its RoPE pairs adjacent dimensions.
    gguf: Some((&["llama"], |md, w| {
        let cfg = LlamaConfig::from_gguf(md, w, false, RopeStyle::Interleaved)?;
        Ok(Box::new(cfg))
    })),
};

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
    #[serde(flatten)]
    pub rope: HfRope,
    pub max_position_embeddings: Option<usize>,
    pub vocab_size: usize,
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl HfLlamaConfig {
    /// `attention_bias`: whether q/k/v carry biases when the config does not say (Qwen2 does).
    pub fn into_config(self, attention_bias: bool) -> Result<LlamaConfig> {
        Ok(LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope.theta(10_000.0),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            vocab_size: self.vocab_size,
            attention_bias: self.attention_bias.unwrap_or(attention_bias),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_style: RopeStyle::Neox,
            rope_scaling: self.rope.scaling().map_err(ModelError::Config)?,
            partial_rotary_factor: 1.0,
            rope_freq_factors: None,
            gate_up: GateUpLayout::Separate,
            sandwich_norms: false,
        })
    }
}

impl LlamaConfig {
    /// From a GGUF file's `{arch}.*` metadata (llama.cpp's Llama-style converters), with
    /// `attention_bias` and the RoPE pairing the converter implies. A file without
    /// `output.weight` ties its head to the embeddings.
    pub fn from_gguf(
        md: &GgufMeta,
        w: &Weights,
        attention_bias: bool,
        rope_style: RopeStyle,
    ) -> Result<Self> {
        let hidden = md.arch_usize("embedding_length")?;
        let heads = md.arch_usize("attention.head_count")?;
        // `attention.key_length` where the converter writes it, else hidden / heads; RoPE
        // turns `rope.dimension_count` of them (all, except GLM-4's half).
        let head_dim = md
            .arch_usize("attention.key_length")
            .unwrap_or(hidden / heads.max(1));
        let rotary = md.arch_usize("rope.dimension_count").unwrap_or(head_dim);
        let vocab = md.vocab_size()?;
        let mut cfg = Self {
            hidden_size: hidden,
            intermediate_size: md.arch_usize("feed_forward_length")?,
            num_hidden_layers: md.arch_usize("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: md.arch_usize("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: md.arch_f64("attention.layer_norm_rms_epsilon")?,
            rope_theta: md.arch_f64("rope.freq_base").unwrap_or(10_000.0),
            max_position_embeddings: md.arch_usize("context_length").unwrap_or(4096),
            vocab_size: vocab,
            attention_bias,
            tie_word_embeddings: !w.contains("lm_head.weight"),
            rope_style,
            rope_scaling: RopeScaling::None,
            partial_rotary_factor: rotary as f64 / head_dim.max(1) as f64,
            rope_freq_factors: None,
            gate_up: GateUpLayout::Separate,
            sandwich_norms: false,
        };
        // llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors.
        if w.contains("rope_freqs.weight") {
            let factors = w
                .get("rope_freqs.weight", cfg.rotary_dim() / 2)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            cfg.rope_freq_factors = Some(factors.into_iter().map(f64::from).collect());
        }
        Ok(cfg)
    }
}

impl FamilyConfig for LlamaConfig {
    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn load(self: Box<Self>, w: &Weights, max_positions: usize) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Llama::load(*self, w, max_positions)?))
    }
}

struct Attention {
    /// q, k, v.
    qkv: Projections,
    o_proj: Linear,
}

impl Attention {
    fn load(w: &Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let names = ["q_proj", "k_proj", "v_proj"];
        Ok(Self {
            qkv: Projections::load(w, &names, h, &[q, kv, kv], cfg.attention_bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), q, h, false)?,
        })
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
    /// Sandwich norms (GLM-4-0414) of the attention and MLP outputs.
    post_self_attn_layernorm: Option<RmsNorm>,
    post_mlp_layernorm: Option<RmsNorm>,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let sandwich = |name| {
            cfg.sandwich_norms
                .then(|| RmsNorm::load(&w.pp(name), h, eps))
                .transpose()
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, eps)?,
            mlp: GatedMlp::load(&w.pp("mlp"), h, cfg.intermediate_size, cfg.gate_up)?,
            post_self_attn_layernorm: sandwich("post_self_attn_layernorm")?,
            post_mlp_layernorm: sandwich("post_mlp_layernorm")?,
        })
    }
}

/// `x`, normed by `norm` when there is one.
fn maybe_norm(norm: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

pub struct Llama {
    cfg: LlamaConfig,
    layers: Vec<DecoderLayer>,
    trunk: Trunk,
}

impl Llama {
    /// `max_positions`: how many positions the RoPE tables cover (the serving context length).
    pub fn load(cfg: LlamaConfig, w: &Weights, max_positions: usize) -> Result<Self> {
        if cfg.num_key_value_heads == 0
            || !cfg
                .num_attention_heads
                .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(ModelError::Config(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        let mut inv_freq = cfg.rope_scaling.inv_freqs(cfg.rope_theta, cfg.rotary_dim());
        if let Some(factors) = &cfg.rope_freq_factors {
            if factors.len() != inv_freq.len() {
                return Err(ModelError::Config(format!(
                    "rope_freqs.weight has {} factors for {} frequencies",
                    factors.len(),
                    inv_freq.len()
                )));
            }
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        let rope = RotaryEmbedding::from_inv_freqs(
            &inv_freq,
            cfg.rope_scaling.attention_factor(),
            max_positions,
            cfg.rope_style,
        );
        let dims = TrunkDims {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            tie_word_embeddings: cfg.tie_word_embeddings,
            rms_norm_eps: cfg.rms_norm_eps,
        };
        let trunk = Trunk::load(w, dims, rope)?;
        let layers =
            Trunk::load_layers(w, cfg.num_hidden_layers, |_, w| DecoderLayer::load(w, &cfg))?;
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
                let a = self.attention(i, &l.self_attn, &h, kv, pass)?;
                let x = (x + maybe_norm(&l.post_self_attn_layernorm, a)?)?;
                let h = l.post_attention_layernorm.forward(&x)?;
                let m = maybe_norm(&l.post_mlp_layernorm, l.mlp.forward(&h)?)?;
                Ok((&x + m)?)
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
