//! The Qwen2 / Qwen2.5 family (`Qwen2ForCausalLM`, GGUF `qwen2`): the Llama decoder with
//! q/k/v biases. llama.cpp converts Qwen2 without permuting Q/K, so its GGUF keeps NeoX pairing.

use super::family::{self, Family};
use super::layers::RopeStyle;
use super::llama::{HfLlamaConfig, LlamaConfig};

pub const FAMILY: Family = Family {
    name: "qwen2",
    hf_architectures: &["Qwen2ForCausalLM"],
    from_hf: |v| {
        Ok(Box::new(
            family::parse::<HfLlamaConfig>(v)?.into_config(true)?,
        ))
    },
    gguf: Some((&["qwen2"], |md, w| {
        Ok(Box::new(LlamaConfig::from_gguf(
            md,
            w,
            true,
            RopeStyle::Neox,
        )?))
    })),
};
