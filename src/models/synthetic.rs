//! Random-weight models of real shapes (`synthetic:<preset>` as the model path): benchmarks
//! on machines that have no checkpoint (the GPU machine has no network), and engine tests that
//! need a model of a given size. Weights come from [`super::weights::Weights::synthetic`],
//! seeded, so every load of a preset holds the same numbers on every device.

use super::layers::{RopeScaling, RopeStyle};
use super::llama::LlamaConfig;
use super::{ModelError, Result};

/// The seed of every synthetic checkpoint.
pub const SEED: u64 = 0x5eed_1f3d;

/// Preset names and what they are shaped like.
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", "2 layers, hidden 64, vocab 9216 (tests)"),
    (
        "llama-1b-shape",
        "Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, vocab 128256, tied",
    ),
    (
        "llama-8b-shape",
        "Llama-3.1-8B: 32 layers, hidden 4096, GQA 32/8, vocab 128256",
    ),
    (
        "qwen2.5-0.5b-shape",
        "Qwen2.5-0.5B: 24 layers, hidden 896, GQA 14/2, q/k/v bias, tied",
    ),
];

/// The model path prefix that selects a preset.
pub const PREFIX: &str = "synthetic:";

pub fn preset(name: &str) -> Result<LlamaConfig> {
    let llama3 = |factor| RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let base = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 2048,
        // Above the id range `inferd bench` prompts use.
        vocab_size: 9216,
        attention_bias: false,
        tie_word_embeddings: true,
        rope_style: RopeStyle::Neox,
        rope_scaling: RopeScaling::None,
        partial_rotary_factor: 1.0,
    };
    Ok(match name {
        "tiny" => base,
        "llama-1b-shape" => LlamaConfig {
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 64,
            rope_theta: 500_000.0,
            max_position_embeddings: 131_072,
            vocab_size: 128_256,
            rope_scaling: llama3(32.0),
            ..base
        },
        "llama-8b-shape" => LlamaConfig {
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            max_position_embeddings: 131_072,
            vocab_size: 128_256,
            tie_word_embeddings: false,
            rope_scaling: llama3(8.0),
            ..base
        },
        "qwen2.5-0.5b-shape" => LlamaConfig {
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            vocab_size: 151_936,
            attention_bias: true,
            ..base
        },
        other => {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err(ModelError::Unsupported(format!(
                "synthetic model `{other}` (presets: {})",
                names.join(", ")
            )));
        }
    })
}

/// The preset named by a model path `synthetic:<preset>`, if it is one.
pub fn preset_name(path: &std::path::Path) -> Option<&str> {
    path.to_str().and_then(|s| s.strip_prefix(PREFIX))
}
