//! Where weights come from: a GGUF file (quantized), a Hugging Face safetensors directory, or
//! seeded random values (`synthetic:<preset>`).
//!
//! [`Weights`] is a cheap, cloneable view at a name prefix (the candle-transformers
//! `VarBuilder` habit): a layer asks `w.pp("self_attn").pp("q_proj").matrix("weight", (out,
//! in))` for each tensor with the shape its config implies, so a checkpoint that disagrees with
//! its config fails at load naming the tensor and both shapes. Synthetic checkpoints generate
//! each tensor from that same requested shape, so there is no second table of shapes. Model
//! files use Hugging Face names; [`gguf_name`] is the one table that maps them to llama.cpp's,
//! and a family with a layout of its own (THUDM's GLM-4) supplies a [`Rename`].

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use indicatif::ProgressBar;

use super::{ModelError, Result};

/// Hugging Face name suffix → GGUF name suffix, for the llama-style families.
const GGUF_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// `model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`.
pub fn gguf_name(hf: &str) -> String {
    let (stem, leaf) = hf.rsplit_once('.').unwrap_or((hf, ""));
    let mapped = if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
        let m = GGUF_NAMES
            .iter()
            .find(|(h, _)| *h == module)
            .map_or(module, |(_, g)| g);
        format!("blk.{layer}.{m}")
    } else {
        GGUF_NAMES
            .iter()
            .find(|(h, _)| *h == stem)
            .map_or(stem.to_string(), |(_, g)| g.to_string())
    };
    format!("{mapped}.{leaf}")
}

/// Where a Hugging Face tensor lives in a checkpoint of another layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub name: String,
    /// The rows of that tensor that hold it, for fused tensors split at load (THUDM's
    /// `query_key_value`): `offset`, `len`, and the fused tensor's row count, which is checked.
    pub rows: Option<RowRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRange {
    pub offset: usize,
    pub len: usize,
    pub of: usize,
}

/// Maps a Hugging Face tensor name to where the checkpoint keeps it.
pub type Rename = Box<dyn Fn(&str) -> Renamed + Send + Sync>;

/// A weight matrix as the checkpoint stores it: dense (in the load dtype) or GGUF-quantized.
/// `Linear` decides which kernel runs it.
pub enum Matrix {
    Dense(Tensor),
    Quantized(QTensor),
}

enum Source {
    Gguf {
        content: gguf_file::Content,
        file: File,
        device: Device,
    },
    Safetensors(VarBuilder<'static>),
    /// Seeded random weights of the shapes the model asks for (benchmarks and tests of model
    /// shapes whose checkpoints are not at hand). Values are bf16-representable whatever
    /// `dtype` is, so a bf16 copy on a GPU and an f32 copy on the CPU hold the same numbers.
    Synthetic {
        seed: u64,
        dtype: DType,
        device: Device,
    },
}

struct Shared {
    source: Source,
    progress: ProgressBar,
}

/// A view of a checkpoint's tensors under a name prefix.
#[derive(Clone)]
pub struct Weights {
    shared: Arc<Shared>,
    prefix: String,
    /// Applied to full Hugging Face names before a safetensors lookup.
    rename: Option<Arc<Rename>>,
}

impl Weights {
    fn new(source: Source, progress: ProgressBar) -> Self {
        Self {
            shared: Arc::new(Shared { source, progress }),
            prefix: String::new(),
            rename: None,
        }
    }

    pub fn gguf(path: &Path, content: gguf_file::Content, device: &Device) -> Result<Self> {
        let progress = progress_bar(Some(content.tensor_infos.len() as u64), path);
        let file = File::open(path)?;
        let device = device.clone();
        Ok(Self::new(
            Source::Gguf {
                content,
                file,
                device,
            },
            progress,
        ))
    }

    pub fn safetensors(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        count: u64,
    ) -> Result<Self> {
        // SAFETY: the files are memory-mapped read-only; inferd never writes them, and a user
        // rewriting a checkpoint under a running daemon is outside what any loader can guard.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        let first = files.first().map_or(Path::new(""), |p| p.as_path());
        Ok(Self::new(
            Source::Safetensors(vb),
            progress_bar(Some(count), first),
        ))
    }

    pub fn synthetic(seed: u64, dtype: DType, device: &Device) -> Self {
        let source = Source::Synthetic {
            seed,
            dtype,
            device: device.clone(),
        };
        Self::new(source, progress_bar(None, Path::new("synthetic weights")))
    }

    /// This view with tensors read under the names `rename` gives (a safetensors checkpoint in
    /// a layout of its own).
    pub fn with_rename(&self, rename: Rename) -> Self {
        Self {
            rename: Some(Arc::new(rename)),
            ..self.clone()
        }
    }

    /// The view one level down: `w.pp("model").pp("norm")` reads `model.norm.*`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        Self {
            prefix: self.full_name(name.as_ref()),
            ..self.clone()
        }
    }

    /// The Hugging Face name of `name` under this view.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn device(&self) -> &Device {
        match &self.shared.source {
            Source::Gguf { device, .. } | Source::Synthetic { device, .. } => device,
            Source::Safetensors(vb) => vb.device(),
        }
    }

    /// The dtype dense tensors come in, which models use for activations and the KV cache
    /// (GGUF: f32, what candle's quantized kernels take).
    pub fn dtype(&self) -> DType {
        match &self.shared.source {
            Source::Gguf { .. } => DType::F32,
            Source::Safetensors(vb) => vb.dtype(),
            Source::Synthetic { dtype, .. } => *dtype,
        }
    }

    /// The GGUF file's metadata and tensor index, when the weights come from one.
    pub fn gguf_header(&self) -> Option<&gguf_file::Content> {
        match &self.shared.source {
            Source::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }

    /// Whether the checkpoint holds `name` under this view. A synthetic checkpoint holds every
    /// tensor a model asks for.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full_name(name);
        match &self.shared.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(&full)),
            Source::Safetensors(vb) => vb.contains_tensor(&self.renamed(&full).name),
            Source::Synthetic { .. } => true,
        }
    }

    fn renamed(&self, full: &str) -> Renamed {
        match &self.rename {
            Some(r) => r(full),
            None => Renamed {
                name: full.to_string(),
                rows: None,
            },
        }
    }

    /// The dense tensor `name` (norm weights, biases, small matrices), of `shape`; GGUF tensors
    /// are dequantized.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        match self.matrix_any(name, &shape.into())? {
            Matrix::Dense(t) => Ok(t),
            Matrix::Quantized(q) => Ok(q.dequantize(self.device())?),
        }
    }

    /// The matrix `name` of shape `(rows, cols)` (output features first), as stored: GGUF
    /// weights stay quantized.
    pub fn matrix(&self, name: &str, (rows, cols): (usize, usize)) -> Result<Matrix> {
        self.matrix_any(name, &Shape::from((rows, cols)))
    }

    fn matrix_any(&self, name: &str, shape: &Shape) -> Result<Matrix> {
        let full = self.full_name(name);
        let shared = &*self.shared;
        let m = match &shared.source {
            Source::Gguf {
                content,
                file,
                device,
            } => {
                let gname = gguf_name(&full);
                if !content.tensor_infos.contains_key(&gname) {
                    return Err(ModelError::MissingWeight(gname));
                }
                let mut reader = file;
                let q = content.tensor(&mut reader, &gname, device)?;
                check_shape(&gname, q.shape(), shape)?;
                Matrix::Quantized(q)
            }
            Source::Safetensors(vb) => {
                let Renamed { name, rows } = self.renamed(&full);
                if !vb.contains_tensor(&name) {
                    return Err(ModelError::MissingWeight(name));
                }
                let mut t = vb.get_unchecked(&name)?;
                if let Some(r) = rows {
                    let mut whole = shape.dims().to_vec();
                    if let Some(first) = whole.first_mut() {
                        *first = r.of;
                    }
                    check_shape(&name, t.shape(), &Shape::from(whole))?;
                    t = t.narrow(0, r.offset, r.len)?.contiguous()?;
                }
                check_shape(&name, t.shape(), shape)?;
                Matrix::Dense(t)
            }
            Source::Synthetic {
                seed,
                dtype,
                device,
            } => Matrix::Dense(
                super::synthetic::tensor(&full, shape.dims(), *seed)?
                    .to_dtype(*dtype)?
                    .to_device(device)?,
            ),
        };
        shared.progress.inc(1);
        Ok(m)
    }

    /// Close the progress bar.
    pub fn finish(&self) {
        self.shared.progress.finish_and_clear();
    }
}

/// A checkpoint tensor whose shape is not the one the config implies is a load error.
fn check_shape(name: &str, found: &Shape, expected: &Shape) -> Result<()> {
    if found.dims() == expected.dims() {
        Ok(())
    } else {
        Err(ModelError::WeightShape {
            name: name.to_string(),
            expected: expected.dims().to_vec(),
            found: found.dims().to_vec(),
        })
    }
}

fn progress_bar(len: Option<u64>, path: &Path) -> ProgressBar {
    let (pb, template) = match len {
        Some(n) => (
            ProgressBar::new(n),
            "{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})",
        ),
        None => (ProgressBar::no_length(), "{msg}: {pos} tensors ({elapsed})"),
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(format!(
        "loading {}",
        path.file_name()
            .map_or(Cow::Borrowed(""), |n| n.to_string_lossy())
    ));
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_read_full_names_with_the_declared_shape() {
        let w = Weights::synthetic(7, DType::F32, &Device::Cpu);
        let layer = w.pp("model.layers.1").pp("mlp");
        assert_eq!(
            layer.full_name("up_proj.weight"),
            "model.layers.1.mlp.up_proj.weight"
        );
        let t = layer.get("up_proj.weight", (6, 4)).unwrap();
        assert_eq!(t.dims(), &[6, 4]);
        // The same name and shape give the same numbers however the name was reached.
        let direct = w.get("model.layers.1.mlp.up_proj.weight", (6, 4)).unwrap();
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            direct.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn shape_mismatches_name_the_tensor_and_both_shapes() {
        let err = check_shape("a.weight", &Shape::from((160, 64)), &Shape::from((192, 64)))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "weight `a.weight` has shape [160, 64], but the config implies [192, 64]"
        );
    }

    #[test]
    fn maps_hf_names_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight"),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.bias"),
            "blk.0.ffn_down.bias"
        );
        assert_eq!(gguf_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
        assert_eq!(gguf_name("model.norm.weight"), "output_norm.weight");
    }
}
