//! Loading a model from disk: a `.gguf` file or a Hugging Face directory. The one `match` on the
//! architecture name lives here.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

use super::deepseek2::{DeepseekV2, DeepseekV2Config};
use super::layers::{RopeScaling, RopeStyle};
use super::llama::{HfLlamaConfig, Llama, LlamaConfig};
use super::weights::Weights;
use super::{glm4, synthetic};
use super::{CausalLm, ModelError, Result};

/// The dtype dense weights are loaded in on `device`: f32 on the CPU (its kernels and the
/// batch-invariance guarantee are f32), bf16 on accelerators.
pub fn dense_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    /// `general.architecture` (GGUF) or `architectures[0]` (config.json).
    pub architecture: String,
}

/// Load the model at `path`. `max_positions` bounds position-indexed tables (the serving
/// context length); `None` uses the model's own maximum.
pub fn load_model(
    path: &Path,
    device: &Device,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    load_model_as(path, device, dense_dtype(device), max_positions)
}

/// [`load_model`] with dense weights (and so activations and the KV cache) in `dtype` — e.g.
/// bf16 on the CPU, to exercise the GPU's numerics where there is no GPU. GGUF weights keep
/// their quantized types and f32 activations.
pub fn load_model_as(
    path: &Path,
    device: &Device,
    dtype: DType,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    if let Some(name) = synthetic::preset_name(path) {
        load_synthetic(name, device, dtype, max_positions)
    } else if path.is_dir() {
        load_hf_dir(path, device, dtype, max_positions)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        load_gguf(path, device, max_positions)
    } else if !path.exists() {
        Err(ModelError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )))
    } else {
        Err(ModelError::Unsupported(format!(
            "{}: expected a .gguf file or a Hugging Face model directory",
            path.display()
        )))
    }
}

/// Read a GGUF file's header (metadata and tensor index, not the tensor data).
pub fn read_gguf_header(path: &Path) -> Result<gguf_file::Content> {
    let mut f = File::open(path)?;
    Ok(gguf_file::Content::read(&mut f).map_err(|e| e.with_path(path))?)
}

fn load_gguf(path: &Path, device: &Device, max_positions: Option<usize>) -> Result<LoadedModel> {
    let content = read_gguf_header(path)?;
    let md = GgufMeta(&content);
    let arch = md.string("general.architecture")?;
    let cfg = match arch.as_str() {
        "llama" | "qwen2" => llama_config_from_gguf(&md, &arch)?,
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture `{other}` (supported: llama, qwen2)"
            )))
        }
    };
    let positions = max_positions.unwrap_or(cfg.max_position_embeddings);
    let mut w = Weights::gguf(path, content, device)?;
    let model = Llama::load(cfg, &mut w, positions)?;
    Ok(LoadedModel {
        model: Box::new(model),
        architecture: arch,
    })
}

fn load_synthetic(
    name: &str,
    device: &Device,
    dtype: DType,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    let model: Box<dyn CausalLm> = match synthetic::preset(name)? {
        synthetic::Preset::Llama(cfg) => {
            let positions = max_positions.unwrap_or(cfg.max_position_embeddings);
            let mut w = Weights::synthetic(cfg.weight_shapes(), synthetic::SEED, dtype, device);
            Box::new(Llama::load(cfg, &mut w, positions)?)
        }
        synthetic::Preset::DeepseekV2(cfg) => {
            let positions = max_positions.unwrap_or(cfg.max_positions());
            let mut w = Weights::synthetic(cfg.weight_shapes(), synthetic::SEED, dtype, device);
            Box::new(DeepseekV2::load(*cfg, &mut w, positions)?)
        }
    };
    Ok(LoadedModel {
        model,
        architecture: format!("synthetic:{name}"),
    })
}

fn llama_config_from_gguf(md: &GgufMeta, arch: &str) -> Result<LlamaConfig> {
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = md.usize(&k("embedding_length"))?;
    let heads = md.usize(&k("attention.head_count"))?;
    let head_dim = md
        .usize(&k("rope.dimension_count"))
        .unwrap_or(hidden / heads);
    let vocab = match md.usize(&k("vocab_size")) {
        Ok(v) => v,
        Err(_) => md.array_len("tokenizer.ggml.tokens")?,
    };
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: md.usize(&k("feed_forward_length"))?,
        num_hidden_layers: md.usize(&k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: md.usize(&k("attention.head_count_kv")).unwrap_or(heads),
        head_dim,
        rms_norm_eps: md.f64(&k("attention.layer_norm_rms_epsilon"))?,
        rope_theta: md.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: md.usize(&k("context_length")).unwrap_or(4096),
        vocab_size: vocab,
        attention_bias: arch == "qwen2",
        tie_word_embeddings: false, // decided by whether `output.weight` exists
        // llama.cpp permutes Llama's Q/K rows so that its RoPE pairs adjacent dimensions;
        // Qwen2 is converted unpermuted and uses NeoX pairing.
        rope_style: if arch == "llama" {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Neox
        },
        rope_scaling: RopeScaling::None,
        partial_rotary_factor: 1.0,
    })
}

/// The decoder a Hugging Face architecture runs on, with what it needs to load.
enum Family {
    /// Llama, Qwen2, GLM-4 (with THUDM's tensor names mapped when it is that layout).
    Llama(LlamaConfig, Option<super::weights::Rename>),
    DeepseekV2(DeepseekV2Config),
}

fn load_hf_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    let cfg_text = std::fs::read_to_string(dir.join("config.json"))?;
    let raw: serde_json::Value =
        serde_json::from_str(&cfg_text).map_err(|e| ModelError::Config(e.to_string()))?;
    let arch = raw["architectures"][0]
        .as_str()
        .ok_or_else(|| ModelError::Config("config.json has no `architectures`".into()))?
        .to_string();
    let files = safetensors_files(dir)?;
    let parse = |v: serde_json::Value| -> Result<HfLlamaConfig> {
        serde_json::from_value(v).map_err(|e| ModelError::Config(e.to_string()))
    };
    // The one match on the architecture: which config format, tensor layout and decoder.
    let family = match arch.as_str() {
        "LlamaForCausalLM" | "Qwen2ForCausalLM" => {
            Family::Llama(parse(raw)?.into_config(arch == "Qwen2ForCausalLM")?, None)
        }
        "GlmForCausalLM" => Family::Llama(glm4::hf_config(raw)?, None),
        "ChatGLMModel" | "ChatGLMForConditionalGeneration" => {
            let cfg = glm4::thudm_config(raw)?;
            let rename = glm4::thudm_names(&cfg);
            Family::Llama(cfg, Some(rename))
        }
        "DeepseekV2ForCausalLM" => Family::DeepseekV2(DeepseekV2Config::from_json(raw)?),
        other => {
            return Err(ModelError::Unsupported(format!(
                "architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, \
                 GlmForCausalLM, ChatGLMModel, DeepseekV2ForCausalLM)"
            )))
        }
    };
    let mut w = Weights::safetensors(&files, dtype, device, tensor_count(&files)?)?;
    let model: Box<dyn CausalLm> = match family {
        Family::Llama(cfg, rename) => {
            if let Some(r) = rename {
                w = w.with_rename(r);
            }
            let positions = max_positions.unwrap_or(cfg.max_position_embeddings);
            Box::new(Llama::load(cfg, &mut w, positions)?)
        }
        Family::DeepseekV2(cfg) => {
            let positions = max_positions.unwrap_or(cfg.max_positions());
            Box::new(DeepseekV2::load(cfg, &mut w, positions)?)
        }
    };
    Ok(LoadedModel {
        model,
        architecture: arch,
    })
}

/// How many tensors the safetensors files hold (read from their headers), for the progress bar.
fn tensor_count(files: &[PathBuf]) -> Result<u64> {
    use std::io::Read;
    let mut n = 0;
    for f in files {
        let mut file = File::open(f)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)?;
        let mut header = vec![0u8; u64::from_le_bytes(len).min(100 << 20) as usize];
        file.read_exact(&mut header)?;
        let v: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| ModelError::Config(format!("{}: {e}", f.display())))?;
        n += v
            .as_object()
            .map_or(0, |o| o.keys().filter(|k| *k != "__metadata__").count()) as u64;
    }
    Ok(n)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Config(format!(
            "no .safetensors files in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// Typed access to GGUF metadata.
pub struct GgufMeta<'a>(pub &'a gguf_file::Content);

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Config(format!("GGUF metadata `{key}` is missing")))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self.get(key)?.to_string()?.clone())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        use gguf_file::Value as V;
        let v = match self.get(key)? {
            V::U8(v) => *v as i128,
            V::I8(v) => *v as i128,
            V::U16(v) => *v as i128,
            V::I16(v) => *v as i128,
            V::U32(v) => *v as i128,
            V::I32(v) => *v as i128,
            V::U64(v) => *v as i128,
            V::I64(v) => *v as i128,
            other => {
                return Err(ModelError::Config(format!(
                    "GGUF metadata `{key}` is not an integer: {other:?}"
                )))
            }
        };
        usize::try_from(v).map_err(|_| ModelError::Config(format!("GGUF metadata `{key}` = {v}")))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        use gguf_file::Value as V;
        match self.get(key)? {
            V::F32(v) => Ok(*v as f64),
            V::F64(v) => Ok(*v),
            _ => Ok(self.usize(key)? as f64),
        }
    }

    pub fn array_len(&self, key: &str) -> Result<usize> {
        Ok(self.get(key)?.to_vec()?.len())
    }
}
