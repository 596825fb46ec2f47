//! Random-weight models of real shapes (`synthetic:<preset>` as the model path): benchmarks
//! on machines that have no checkpoint (the GPU machine has no network), and engine tests that
//! need a model of a given size. A preset is a family's architecture and config, loaded through
//! the family table like a checkpoint; its weights come from
//! [`super::weights::Weights::synthetic`] in the shapes the model asks for, seeded, so every load
//! of a preset holds the same numbers on every device.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{ModelError, Result};

/// A random-weight checkpoint: a family's architecture and the `config.json` it would have.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    /// `architectures[0]`: which family of the table loads it.
    pub architecture: &'static str,
    config: fn() -> Value,
}

impl Preset {
    pub fn config(&self) -> Value {
        (self.config)()
    }
}

/// The seed of every synthetic checkpoint.
pub const SEED: u64 = 0x5eed_1f3d;

/// The model path prefix that selects a preset.
pub const PREFIX: &str = "synthetic:";

/// Every preset.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        about: "Llama, 2 layers, hidden 64, vocab 9216, tied (tests)",
        architecture: "LlamaForCausalLM",
        config: || tiny_llama(),
    },
    Preset {
        name: "tiny-moe",
        about: "DeepSeek-V2, 3 layers, hidden 64, MLA with q_lora, 8 experts in 4 groups (tests)",
        architecture: "DeepseekV2ForCausalLM",
        config: || {
            json!({
                "vocab_size": 9216, "hidden_size": 64, "intermediate_size": 128,
                "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 3,
                "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                "routed_scaling_factor": 2.0, "first_k_dense_replace": 1, "q_lora_rank": 32,
                "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                "v_head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 2048,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 512, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
            })
        },
    },
    Preset {
        name: "llama-1b-shape",
        about: "Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, vocab 128256, tied",
        architecture: "LlamaForCausalLM",
        config: || {
            llama_shape(json!({
                "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                "rope_theta": 500000.0, "max_position_embeddings": 131072,
                "vocab_size": 128256, "rope_scaling": llama3_scaling(32.0)
            }))
        },
    },
    Preset {
        name: "llama-8b-shape",
        about: "Llama-3.1-8B: 32 layers, hidden 4096, GQA 32/8, vocab 128256",
        architecture: "LlamaForCausalLM",
        config: || {
            llama_shape(json!({
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "rope_theta": 500000.0, "max_position_embeddings": 131072,
                "vocab_size": 128256, "tie_word_embeddings": false,
                "rope_scaling": llama3_scaling(8.0)
            }))
        },
    },
    Preset {
        name: "qwen2.5-0.5b-shape",
        about: "Qwen2.5-0.5B: 24 layers, hidden 896, GQA 14/2, q/k/v bias, tied",
        architecture: "Qwen2ForCausalLM",
        config: || {
            llama_shape(json!({
                "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 32768, "vocab_size": 151936
            }))
        },
    },
    Preset {
        name: "deepseek-v2-lite-shape",
        about: "DeepSeek-V2-Lite: 27 layers, hidden 2048, MLA, 64 experts (6 routed, 2 shared)",
        architecture: "DeepseekV2ForCausalLM",
        config: || {
            json!({
                "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
                "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                "num_attention_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
                "num_experts_per_tok": 6, "topk_method": "greedy", "n_group": 1,
                "topk_group": 1, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
                "q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
                "rope_scaling": {"type": "yarn", "factor": 40.0,
                    "original_max_position_embeddings": 4096, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
            })
        },
    },
];

/// The tiny Llama every larger Llama-shaped preset starts from.
fn tiny_llama() -> Value {
    json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        // Above the id range `inferd bench` prompts use.
        "vocab_size": 9216, "tie_word_embeddings": true
    })
}

/// [`tiny_llama`] with `over`'s keys replaced.
fn llama_shape(over: Value) -> Value {
    let mut v = tiny_llama();
    if let (Some(base), Value::Object(over)) = (v.as_object_mut(), over) {
        base.extend(over);
    }
    v
}

fn llama3_scaling(factor: f64) -> Value {
    json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
}

/// The preset called `name`.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        ModelError::Unsupported(format!(
            "synthetic model `{name}` (presets: {})",
            names.join(", ")
        ))
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
                let mut z =
                    base.wrapping_add((((c << 16) + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *x = bf16::from_f32((2.0 * u - 1.0) * half_width);
            }
        });
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::family;

    #[test]
    fn every_preset_is_a_config_its_family_reads() {
        for p in PRESETS {
            let f = family::by_hf_architecture(p.architecture).unwrap();
            let cfg = (f.from_hf)(p.config()).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert!(cfg.max_position_embeddings() >= 2048, "{}", p.name);
        }
        assert!(preset("no-such").is_err());
    }

    #[test]
    fn the_tiny_presets_load_with_the_shapes_they_declare() {
        for name in ["tiny", "tiny-moe"] {
            let path = std::path::PathBuf::from(format!("{PREFIX}{name}"));
            let m = crate::models::load_model(&path, &Device::Cpu, Some(64)).unwrap();
            assert_eq!(m.model.vocab_size(), 9216);
        }
    }
}
