//! Loading a model from disk — a `.gguf` file or a Hugging Face directory — or a synthetic
//! preset: find the family in the table (`family.rs`) by its architecture, parse the config,
//! and let the family load itself from the [`Weights`].

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

use super::family::{self, FamilyConfig};
use super::quantize::LoadQuant;
use super::weights::Weights;
use super::{synthetic, CausalLm, ModelError, Result};

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

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Bounds position-indexed tables (the serving context length); `None` uses the model's
    /// own maximum.
    pub max_positions: Option<usize>,
    /// The dtype of dense weights (and so activations and the KV cache); `None`:
    /// [`dense_dtype`]. GGUF weights keep their types and f32 activations.
    pub dtype: Option<DType>,
    /// Quantize a Hugging Face checkpoint's matrices as they load (an error for GGUF files).
    pub quantize: Option<LoadQuant>,
}

/// Load the model at `path`. `max_positions` bounds position-indexed tables (the serving
/// context length); `None` uses the model's own maximum.
pub fn load_model(
    path: &Path,
    device: &Device,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    let opts = LoadOptions {
        max_positions,
        ..LoadOptions::default()
    };
    load_model_with(path, device, &opts)
}

/// [`load_model`] with dense weights (and so activations and the KV cache) in `dtype` — e.g.
/// bf16 on the CPU, to exercise the GPU's numerics where there is no GPU.
pub fn load_model_as(
    path: &Path,
    device: &Device,
    dtype: DType,
    max_positions: Option<usize>,
) -> Result<LoadedModel> {
    let opts = LoadOptions {
        max_positions,
        dtype: Some(dtype),
        quantize: None,
    };
    load_model_with(path, device, &opts)
}

/// Load the model at `path` as `opts` say.
pub fn load_model_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<LoadedModel> {
    let dtype = opts.dtype.unwrap_or_else(|| dense_dtype(device));
    if let Some(name) = synthetic::preset_name(path) {
        load_synthetic(name, device, dtype, opts)
    } else if path.is_dir() {
        load_hf_dir(path, device, dtype, opts)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        if let Some(q) = opts.quantize {
            return Err(ModelError::Config(format!(
                "--quantize {} applies to Hugging Face (safetensors) checkpoints; {} is a GGUF \
                 file, already quantized (its types are kept)",
                q.name(),
                path.display()
            )));
        }
        load_gguf(path, device, opts.max_positions)
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

/// Build the family's model over `w`, closing the progress bar when done.
fn build(
    cfg: Box<dyn FamilyConfig>,
    w: &Weights,
    max_positions: Option<usize>,
) -> Result<Box<dyn CausalLm>> {
    let positions = max_positions.unwrap_or(cfg.max_position_embeddings());
    let model = cfg.load(w, positions);
    w.finish();
    model
}

fn load_gguf(path: &Path, device: &Device, max_positions: Option<usize>) -> Result<LoadedModel> {
    let w = Weights::gguf(path, read_gguf_header(path)?, device)?;
    let header = w
        .gguf_header()
        .ok_or_else(|| ModelError::Config("not a GGUF source".into()))?;
    let md = GgufMeta::new(header)?;
    let cfg = family::by_gguf_architecture(&md.arch)?(&md, &w)?;
    let arch = md.arch;
    Ok(LoadedModel {
        model: build(cfg, &w, max_positions)?,
        architecture: arch,
    })
}

fn load_synthetic(
    name: &str,
    device: &Device,
    dtype: DType,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let preset = synthetic::preset(name)?;
    let cfg = (family::by_hf_architecture(preset.architecture)?.from_hf)(preset.config())?;
    let w = with_quantize(Weights::synthetic(synthetic::SEED, dtype, device), opts)?;
    Ok(LoadedModel {
        model: build(cfg, &w, opts.max_positions)?,
        architecture: format!("synthetic:{name}"),
    })
}

/// `w` quantized at load when `opts` ask for it.
fn with_quantize(w: Weights, opts: &LoadOptions) -> Result<Weights> {
    match opts.quantize {
        Some(q) => w.quantized(q),
        None => Ok(w),
    }
}

fn load_hf_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let cfg_text = std::fs::read_to_string(dir.join("config.json"))?;
    let raw: serde_json::Value =
        serde_json::from_str(&cfg_text).map_err(|e| ModelError::Config(e.to_string()))?;
    let arch = raw["architectures"][0]
        .as_str()
        .ok_or_else(|| ModelError::Config("config.json has no `architectures`".into()))?
        .to_string();
    let cfg = (family::by_hf_architecture(&arch)?.from_hf)(raw)?;
    let files = safetensors_files(dir)?;
    let w = with_quantize(Weights::safetensors(&files, dtype, device)?, opts)?;
    Ok(LoadedModel {
        model: build(cfg, &w, opts.max_positions)?,
        architecture: arch,
    })
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
pub struct GgufMeta<'a> {
    content: &'a gguf_file::Content,
    /// `general.architecture`, which prefixes the model's own keys.
    pub arch: String,
}

impl<'a> GgufMeta<'a> {
    pub fn new(content: &'a gguf_file::Content) -> Result<Self> {
        let mut md = Self {
            content,
            arch: String::new(),
        };
        md.arch = md.string("general.architecture")?;
        Ok(md)
    }

    /// `{arch}.{key}` as an integer.
    pub fn arch_usize(&self, key: &str) -> Result<usize> {
        self.usize(&format!("{}.{key}", self.arch))
    }

    /// `{arch}.{key}` as a float.
    pub fn arch_f64(&self, key: &str) -> Result<f64> {
        self.f64(&format!("{}.{key}", self.arch))
    }

    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
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

    /// `{arch}.vocab_size`, else the length of the token list.
    pub fn vocab_size(&self) -> Result<usize> {
        match self.arch_usize("vocab_size") {
            Ok(v) => Ok(v),
            Err(_) => self.array_len("tokenizer.ggml.tokens"),
        }
    }
}
