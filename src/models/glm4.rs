//! GLM-4 (glm-4-9b-chat) in both layouts users have: Hugging Face's `GlmForCausalLM`
//! (glm-4-9b-chat-hf) and THUDM's original `ChatGLMModel`. Both are the Llama decoder with q/k/v
//! biases, a fused `gate_up` MLP (gate first), and rotary embeddings on the first half of each
//! head's dimensions with interleaved pairs — so this file only reads the two config formats and
//! maps THUDM's tensor names (and its fused `query_key_value`) onto the Hugging Face ones.

use serde::Deserialize;

use super::layers::{RopeScaling, RopeStyle};
use super::llama::LlamaConfig;
use super::weights::Rename;
use super::{ModelError, Result};

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
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
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

fn glm_decoder(c: LlamaConfig) -> LlamaConfig {
    LlamaConfig {
        rope_style: RopeStyle::Interleaved,
        rope_scaling: RopeScaling::None,
        ..c
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| ModelError::Config(e.to_string()))
}

/// From `GlmForCausalLM`'s config: the hub's top-level `rope_theta` / `partial_rotary_factor`,
/// or transformers 5's `rope_parameters`.
pub fn hf_config(v: serde_json::Value) -> Result<LlamaConfig> {
    let c: HfGlmConfig = parse(v)?;
    let rp = |k: &str| {
        c.rope_parameters
            .as_ref()
            .and_then(|p| p.get(k))
            .and_then(|v| v.as_f64())
    };
    Ok(glm_decoder(LlamaConfig {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c
            .rope_theta
            .or_else(|| rp("rope_theta"))
            .unwrap_or(10_000.0),
        max_position_embeddings: c.max_position_embeddings.unwrap_or(131_072),
        vocab_size: c.vocab_size,
        attention_bias: c.attention_bias.unwrap_or(true),
        tie_word_embeddings: c.tie_word_embeddings,
        rope_style: RopeStyle::Interleaved,
        rope_scaling: RopeScaling::None,
        partial_rotary_factor: c
            .partial_rotary_factor
            .or_else(|| rp("partial_rotary_factor"))
            .unwrap_or(0.5),
    }))
}

/// From THUDM's config: `rope_ratio` scales the base 10000; the rotary half is `kv_channels / 2`.
pub fn thudm_config(v: serde_json::Value) -> Result<LlamaConfig> {
    let c: ThudmConfig = parse(v)?;
    let head_dim = c
        .kv_channels
        .unwrap_or(c.hidden_size / c.num_attention_heads);
    let kv_heads = if c.multi_query_attention {
        c.multi_query_group_num.unwrap_or(1)
    } else {
        c.num_attention_heads
    };
    Ok(glm_decoder(LlamaConfig {
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
    }))
}

/// Hugging Face name → THUDM name, and the rows of it that hold the tensor (q, k and v are
/// row ranges of `query_key_value`).
pub fn thudm_names(cfg: &LlamaConfig) -> Rename {
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    Box::new(move |hf: &str| {
        let whole = |s: String| (s, None);
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
        let qkv = |leaf: &str, rows| {
            (
                format!("{t}.self_attention.query_key_value.{leaf}"),
                Some(rows),
            )
        };
        match module {
            "self_attn.q_proj.weight" => qkv("weight", (0, q)),
            "self_attn.k_proj.weight" => qkv("weight", (q, kv)),
            "self_attn.v_proj.weight" => qkv("weight", (q + kv, kv)),
            "self_attn.q_proj.bias" => qkv("bias", (0, q)),
            "self_attn.k_proj.bias" => qkv("bias", (q, kv)),
            "self_attn.v_proj.bias" => qkv("bias", (q + kv, kv)),
            "self_attn.o_proj.weight" => whole(format!("{t}.self_attention.dense.weight")),
            "mlp.gate_up_proj.weight" => whole(format!("{t}.mlp.dense_h_to_4h.weight")),
            "mlp.down_proj.weight" => whole(format!("{t}.mlp.dense_4h_to_h.weight")),
            other => whole(format!("{t}.{other}")),
        }
    })
}
