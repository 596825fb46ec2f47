//! GLM-4 (glm-4-9b-chat) in both layouts users have: Hugging Face's `GlmForCausalLM`
//! (glm-4-9b-chat-hf) and THUDM's original `ChatGLMModel`; and GLM-4-0414 (`Glm4ForCausalLM`).
//! All are the Llama decoder with q/k/v biases, a fused `gate_up` MLP (gate first), and rotary
//! embeddings on the first half of each head's dimensions with interleaved pairs (0414 adds
//! sandwich norms) — so this file only reads the config formats and maps THUDM's tensor names
//! (and its fused `query_key_value`) onto the Hugging Face ones.

use serde::Deserialize;

use super::family::{self, Family, FamilyConfig};
use super::layers::{GateUpLayout, HfRope, RopeScaling, RopeStyle};
use super::llama::LlamaConfig;
use super::weights::{Rename, Renamed, RowRange, Weights};
use super::{CausalLm, ModelError, Result};

/// `config.json` of `GlmForCausalLM`.
#[derive(Debug, Deserialize)]
struct HfGlmConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(flatten)]
    rope: HfRope,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    attention_bias: Option<bool>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

/// `config.json` of THUDM's `ChatGLMModel`.
#[derive(Debug, Deserialize)]
struct ThudmConfig {
    hidden_size: usize,
    ffn_hidden_size: usize,
    num_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    multi_query_attention: bool,
    multi_query_group_num: Option<usize>,
    kv_channels: Option<usize>,
    padded_vocab_size: usize,
    layernorm_epsilon: f64,
    rope_ratio: Option<f64>,
    seq_length: Option<usize>,
    #[serde(default = "yes")]
    add_qkv_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn yes() -> bool {
    true
}

/// GLM-4 in Hugging Face's layout (glm-4-9b-chat-hf).
pub const FAMILY: Family = Family {
    name: "glm4",
    hf_architectures: &["GlmForCausalLM"],
    from_hf: |v| Ok(Box::new(hf_config(v)?)),
    gguf: None,
};

/// GLM-4-0414 (GLM-4-9B-0414, GLM-4-32B-0414): `Glm4ForCausalLM` and GGUF `glm4` — GLM-4's
/// decoder with the attention and MLP outputs normed again before each residual add; in GGUF
/// the Llama names plus `post_attention_norm` / `post_ffw_norm` for those norms and `ffn_up`
/// for the fused gate/up.
pub const GLM4_0414_FAMILY: Family = Family {
    name: "glm4-0414",
    hf_architectures: &["Glm4ForCausalLM"],
    from_hf: |v| {
        Ok(Box::new(LlamaConfig {
            sandwich_norms: true,
            ..hf_config(v)?
        }))
    },
    gguf: Some((&["glm4"], |md, w| Ok(Box::new(glm_gguf(md, w, true)?)))),
};

/// GLM-4 in THUDM's original layout (glm-4-9b-chat), and GGUF `chatglm` — what llama.cpp's
/// converter makes of either layout: the Llama tensor names plus `ffn_up` for the fused
/// gate/up and, from THUDM's layout, a fused `attn_qkv` (both located by
/// `weights::gguf_locate`); RoPE on `rope.dimension_count` (half of each head), interleaved.
pub const THUDM_FAMILY: Family = Family {
    name: "chatglm",
    hf_architectures: &["ChatGLMModel", "ChatGLMForConditionalGeneration"],
    from_hf: |v| Ok(Box::new(Thudm(thudm_config(v)?))),
    gguf: Some((&["chatglm"], |md, w| Ok(Box::new(glm_gguf(md, w, false)?)))),
};

/// A GLM-4 GGUF's config: the Llama metadata with q/k/v biases, interleaved RoPE pairs and the
/// fused gate/up; `sandwich_norms` for GLM-4-0414.
fn glm_gguf(
    md: &crate::models::loader::GgufMeta,
    w: &Weights,
    sandwich_norms: bool,
) -> Result<LlamaConfig> {
    Ok(LlamaConfig {
        gate_up: GateUpLayout::Fused,
        sandwich_norms,
        ..LlamaConfig::from_gguf(md, w, true, RopeStyle::Interleaved)?
    })
}

/// A GLM-4 config whose tensors are in THUDM's layout.
struct Thudm(LlamaConfig);

impl FamilyConfig for Thudm {
    fn max_position_embeddings(&self) -> usize {
        self.0.max_position_embeddings
    }

    fn load(self: Box<Self>, w: &Weights, max_positions: usize) -> Result<Box<dyn CausalLm>> {
        let w = w.with_rename(thudm_names(&self.0));
        Box::new(self.0).load(&w, max_positions)
    }
}

/// From `GlmForCausalLM`'s config: the hub's top-level `rope_theta` / `partial_rotary_factor`,
/// or transformers 5's `rope_parameters`.
fn hf_config(v: serde_json::Value) -> Result<LlamaConfig> {
    let c: HfGlmConfig = family::parse(v)?;
    Ok(LlamaConfig {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope.theta(10_000.0),
        max_position_embeddings: c.max_position_embeddings.unwrap_or(131_072),
        vocab_size: c.vocab_size,
        attention_bias: c.attention_bias.unwrap_or(true),
        tie_word_embeddings: c.tie_word_embeddings,
        rope_style: RopeStyle::Interleaved,
        rope_scaling: c.rope.scaling().map_err(ModelError::Config)?,
        partial_rotary_factor: c.rope.partial_rotary_factor(0.5),
        rope_freq_factors: None,
        gate_up: GateUpLayout::Fused,
        sandwich_norms: false,
    })
}

/// From THUDM's config: `rope_ratio` scales the base 10000; the rotary half is `kv_channels / 2`.
fn thudm_config(v: serde_json::Value) -> Result<LlamaConfig> {
    let c: ThudmConfig = family::parse(v)?;
    let head_dim = c
        .kv_channels
        .unwrap_or(c.hidden_size / c.num_attention_heads);
    let kv_heads = if c.multi_query_attention {
        c.multi_query_group_num.unwrap_or(1)
    } else {
        c.num_attention_heads
    };
    Ok(LlamaConfig {
        hidden_size: c.hidden_size,
        intermediate_size: c.ffn_hidden_size,
        num_hidden_layers: c.num_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: c.layernorm_epsilon,
        rope_theta: 10_000.0 * c.rope_ratio.unwrap_or(1.0),
        max_position_embeddings: c.seq_length.unwrap_or(131_072),
        vocab_size: c.padded_vocab_size,
        attention_bias: c.add_qkv_bias,
        tie_word_embeddings: c.tie_word_embeddings,
        rope_style: RopeStyle::Interleaved,
        rope_scaling: RopeScaling::None,
        partial_rotary_factor: 0.5,
        rope_freq_factors: None,
        gate_up: GateUpLayout::Fused,
        sandwich_norms: false,
    })
}

/// Hugging Face name → THUDM name, and the rows of it that hold the tensor (q, k and v are
/// row ranges of `query_key_value`).
fn thudm_names(cfg: &LlamaConfig) -> Rename {
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let of = q + 2 * kv;
    Box::new(move |hf: &str| {
        let whole = |name: String| Renamed { name, rows: None };
        match hf {
            "model.embed_tokens.weight" => {
                return whole("transformer.embedding.word_embeddings.weight".into())
            }
            "model.norm.weight" => {
                return whole("transformer.encoder.final_layernorm.weight".into())
            }
            "lm_head.weight" => return whole("transformer.output_layer.weight".into()),
            _ => {}
        }
        let Some(rest) = hf.strip_prefix("model.layers.") else {
            return whole(hf.to_string());
        };
        let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
        let t = format!("transformer.encoder.layers.{layer}");
        let qkv = |leaf: &str, offset, len| Renamed {
            name: format!("{t}.self_attention.query_key_value.{leaf}"),
            rows: Some(RowRange { offset, len, of }),
        };
        match module {
            "self_attn.q_proj.weight" => qkv("weight", 0, q),
            "self_attn.k_proj.weight" => qkv("weight", q, kv),
            "self_attn.v_proj.weight" => qkv("weight", q + kv, kv),
            "self_attn.q_proj.bias" => qkv("bias", 0, q),
            "self_attn.k_proj.bias" => qkv("bias", q, kv),
            "self_attn.v_proj.bias" => qkv("bias", q + kv, kv),
            "self_attn.o_proj.weight" => whole(format!("{t}.self_attention.dense.weight")),
            "mlp.gate_up_proj.weight" => whole(format!("{t}.mlp.dense_h_to_4h.weight")),
            "mlp.down_proj.weight" => whole(format!("{t}.mlp.dense_4h_to_h.weight")),
            other => whole(format!("{t}.{other}")),
        }
    })
}
