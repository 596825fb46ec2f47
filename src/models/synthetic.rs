//! Random-weight models of real shapes (`synthetic:<preset>` as the model path): benchmarks
//! on machines that have no checkpoint (the GPU machine has no network), and engine tests that
//! need a model of a given size. Weights come from [`super::weights::Weights::synthetic`],
//! seeded, so every load of a preset holds the same numbers on every device.

use candle_core::{DType, Device, Tensor};

use super::deepseek2::DeepseekV2Config;
use super::layers::{RopeScaling, RopeStyle};
use super::llama::LlamaConfig;
use super::{ModelError, Result};

/// A preset's decoder and its configuration.
pub enum Preset {
    Llama(LlamaConfig),
    DeepseekV2(Box<DeepseekV2Config>),
}

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

pub fn preset(name: &str) -> Result<Preset> {
    match name {
        "tiny-moe" => deepseek(serde_json::json!({
            "vocab_size": 9216, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 3,
            "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.0, "first_k_dense_replace": 1, "q_lora_rank": 32,
            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                             "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
        })),
        "deepseek-v2-lite-shape" => deepseek(serde_json::json!({
            "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
            "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
            "first_k_dense_replace": 1, "q_lora_rank": null, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
        })),
        _ => llama_preset(name).map(Preset::Llama),
    }
}

fn deepseek(v: serde_json::Value) -> Result<Preset> {
    DeepseekV2Config::from_json(v).map(|c| Preset::DeepseekV2(Box::new(c)))
}

fn llama_preset(name: &str) -> Result<LlamaConfig> {
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

/// Seeded values for the weight `name`: norm weights are ones; matrices are uniform with the
/// standard deviation of their usual initialisation (0.02 for embeddings, 1/sqrt(fan_in) for
/// projections), rounded to bf16. Counter-based, so generation is parallel and reproducible.
pub fn tensor(name: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    use half::bf16;
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return Ok(Tensor::ones(shape, DType::BF16, &Device::Cpu)?);
    }
    let std = if name.contains("embed") || shape.len() == 1 {
        0.02
    } else {
        1.0 / (shape[shape.len() - 1] as f64).sqrt()
    };
    let half_width = (std * 3f64.sqrt()) as f32;
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let base = seed ^ name_hash;
    let mut data = vec![bf16::ZERO; n];
    data.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, x) in chunk.iter_mut().enumerate() {
                let mut z = base.wrapping_add(((c << 16) + i) as u64 * 0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *x = bf16::from_f32((2.0 * u - 1.0) * half_width);
            }
        });
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}
