//! The table of model families: which checkpoints each one reads and how it loads them.
//!
//! Adding a decoder is one family file (its config parsing and model) plus one entry in
//! [`FAMILIES`]; the loader walks the table and its "supported" errors list what the table
//! holds. A family's config is typed (no architecture strings past parsing) and loads itself.

use super::loader::GgufMeta;
use super::weights::Weights;
use super::{deepseek2, glm4, llama, qwen2, CausalLm, ModelError, Result};

/// A family's parsed configuration, ready to load its weights.
pub trait FamilyConfig: Send {
    /// The longest context the model was trained for.
    fn max_position_embeddings(&self) -> usize;
    /// The model over the weights `w`, with position tables covering `max_positions`.
    fn load(self: Box<Self>, w: &Weights, max_positions: usize) -> Result<Box<dyn CausalLm>>;
}

/// Parses a Hugging Face `config.json`.
pub type FromHf = fn(serde_json::Value) -> Result<Box<dyn FamilyConfig>>;
/// Reads a GGUF file's metadata (and tensors that llama.cpp uses to store configuration, such
/// as `rope_freqs.weight`).
pub type FromGguf = fn(&GgufMeta, &Weights) -> Result<Box<dyn FamilyConfig>>;

/// One entry of the table.
pub struct Family {
    pub name: &'static str,
    /// `architectures[0]` values of `config.json` this family reads.
    pub hf_architectures: &'static [&'static str],
    pub from_hf: FromHf,
    /// `general.architecture` values of GGUF files this family reads, with its reader.
    pub gguf: Option<(&'static [&'static str], FromGguf)>,
}

/// Every family inferd serves.
pub const FAMILIES: &[Family] = &[
    llama::FAMILY,
    qwen2::FAMILY,
    glm4::FAMILY,
    glm4::THUDM_FAMILY,
    glm4::GLM4_0414_FAMILY,
    deepseek2::FAMILY,
];

/// The family that reads `config.json`s with `architectures[0] == arch`.
pub fn by_hf_architecture(arch: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.hf_architectures.contains(&arch))
        .ok_or_else(|| {
            let all: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.hf_architectures.iter().copied())
                .collect();
            ModelError::Unsupported(format!(
                "architecture `{arch}` (supported: {})",
                all.join(", ")
            ))
        })
}

/// The GGUF reader for `general.architecture == arch`.
pub fn by_gguf_architecture(arch: &str) -> Result<FromGguf> {
    let readers = || FAMILIES.iter().filter_map(|f| f.gguf);
    readers()
        .find(|(archs, _)| archs.contains(&arch))
        .map(|(_, read)| read)
        .ok_or_else(|| {
            let all: Vec<&str> = readers().flat_map(|(a, _)| a.iter().copied()).collect();
            ModelError::Unsupported(format!(
                "GGUF architecture `{arch}` (supported: {})",
                all.join(", ")
            ))
        })
}

/// Parse a `config.json` value into `T` (a family's serde config), as a config error.
pub fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| ModelError::Config(format!("config.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_claimed_by_one_family_each() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            for a in f.hf_architectures {
                assert!(seen.insert(format!("hf:{a}")), "{a} twice");
            }
            for a in f.gguf.map_or(&[][..], |g| g.0) {
                assert!(seen.insert(format!("gguf:{a}")), "{a} twice");
            }
        }
    }

    #[test]
    fn unknown_architectures_list_the_table() {
        let err = by_hf_architectures_err("MambaForCausalLM");
        for f in FAMILIES {
            for a in f.hf_architectures {
                assert!(err.contains(a), "{err} lacks {a}");
            }
        }
        let Err(e) = by_gguf_architecture("mamba") else {
            panic!("mamba is not a family")
        };
        let e = e.to_string();
        assert!(e.contains("`mamba`") && e.contains("llama, qwen2"), "{e}");
    }

    fn by_hf_architectures_err(arch: &str) -> String {
        match by_hf_architecture(arch) {
            Ok(f) => panic!("{arch} read by {}", f.name),
            Err(e) => e.to_string(),
        }
    }
}
