//! Where weights come from: a GGUF file (quantized), a Hugging Face safetensors directory, or
//! seeded random values (`synthetic:<preset>`).
//!
//! [`Weights`] is a cheap, cloneable view at a name prefix (the candle-transformers
//! `VarBuilder` habit): a layer asks `w.pp("self_attn").pp("q_proj").matrix("weight", (out,
//! in))` for each tensor with the shape its config implies, so a checkpoint that disagrees with
//! its config fails at load naming the tensor and both shapes. Synthetic checkpoints generate
//! each tensor from that same requested shape, so there is no second table of shapes. Model
//! files use Hugging Face names; `gguf_names` maps them to llama.cpp's, and a family with a
//! layout of its own (THUDM's GLM-4) supplies a [`Rename`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use indicatif::ProgressBar;

pub use super::gguf_names::gguf_name;
use super::gguf_names::{gguf_locate, read_gguf_rows};
use super::quantize::{quantize_rows, LoadQuant, Role};
use super::safetensors::Checkpoint;
use super::{ModelError, Result};

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

/// A weight matrix as the checkpoint stores it: dense (in the load dtype), bf16 under f32
/// activations, or quantized. `Linear` decides which kernel runs it.
pub enum Matrix {
    Dense(Tensor),
    /// A bf16 checkpoint's matrix kept in bf16 for a model computing in f32 on the CPU (half
    /// the memory of an f32 copy; `layers::bf16` multiplies it).
    Bf16(Tensor),
    Quantized(QTensor),
}

enum Source {
    Gguf {
        content: gguf_file::Content,
        file: File,
        device: Device,
    },
    Safetensors {
        checkpoint: Checkpoint,
        dtype: DType,
        device: Device,
    },
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
    /// Quantize dense matrices as they load (`--quantize`).
    quantize: Option<LoadQuant>,
    /// How many matrices went to each type under `quantize` ("dense" for those kept so).
    quantized: Mutex<BTreeMap<String, usize>>,
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
            shared: Arc::new(Shared {
                source,
                progress,
                quantize: None,
                quantized: Mutex::default(),
            }),
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

    pub fn safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(files)?;
        let first = files.first().map_or(Path::new(""), |p| p.as_path());
        let progress = progress_bar(Some(checkpoint.len() as u64), first);
        let source = Source::Safetensors {
            checkpoint,
            dtype,
            device: device.clone(),
        };
        Ok(Self::new(source, progress))
    }

    /// These weights with their dense matrices quantized to `q` as they load (GGUF tensors
    /// keep their types). Call before any view is taken.
    pub fn quantized(mut self, q: LoadQuant) -> Result<Self> {
        let shared = Arc::get_mut(&mut self.shared).ok_or_else(|| {
            ModelError::Config("quantization must be set before the weights are shared".into())
        })?;
        shared.quantize = Some(q);
        Ok(self)
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
            Source::Gguf { device, .. }
            | Source::Synthetic { device, .. }
            | Source::Safetensors { device, .. } => device,
        }
    }

    /// The dtype dense tensors come in, which models use for activations and the KV cache
    /// (GGUF: f32, what candle's quantized kernels take).
    pub fn dtype(&self) -> DType {
        match &self.shared.source {
            Source::Gguf { .. } => DType::F32,
            Source::Safetensors { dtype, .. } | Source::Synthetic { dtype, .. } => *dtype,
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
            Source::Gguf { content, .. } => {
                let name = gguf_locate(&content.tensor_infos, &full, &Shape::from(0)).name;
                content.tensor_infos.contains_key(&name)
            }
            Source::Safetensors { checkpoint, .. } => {
                checkpoint.contains(&self.renamed(&full).name)
            }
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
        match self.matrix_any(name, &shape.into(), false)? {
            Matrix::Dense(t) => Ok(t),
            Matrix::Bf16(t) => Ok(t.to_dtype(self.dtype())?),
            Matrix::Quantized(q) => Ok(q.dequantize(self.device())?),
        }
    }

    /// The matrix `name` of shape `(rows, cols)` (output features first), as stored: GGUF
    /// weights stay quantized.
    pub fn matrix(&self, name: &str, (rows, cols): (usize, usize)) -> Result<Matrix> {
        self.matrix_any(name, &Shape::from((rows, cols)), true)
    }

    /// The type `--quantize` gives the matrix `full` of `shape`, if any.
    fn quantize_type(
        &self,
        full: &str,
        shape: &Shape,
    ) -> Option<candle_core::quantized::GgmlDType> {
        let q = self.shared.quantize?;
        let &[_, cols] = shape.dims() else {
            return None;
        };
        let root = Self {
            prefix: String::new(),
            ..self.clone()
        };
        let output = full == "lm_head.weight"
            || (full.ends_with("embed_tokens.weight") && !root.contains("lm_head.weight"));
        let role = if output { Role::Output } else { Role::Other };
        let t = q.type_for(role, cols);
        let kind = t.map_or("dense".to_string(), |t| format!("{t:?}").to_lowercase());
        if let Ok(mut counts) = self.shared.quantized.lock() {
            *counts.entry(kind).or_default() += 1;
        }
        t
    }

    fn matrix_any(&self, name: &str, shape: &Shape, quantizable: bool) -> Result<Matrix> {
        let full = self.full_name(name);
        let shared = &*self.shared;
        let quantize = quantizable
            .then(|| self.quantize_type(&full, shape))
            .flatten();
        let m = match &shared.source {
            Source::Gguf {
                content,
                file,
                device,
            } => {
                let Renamed { name: gname, rows } =
                    gguf_locate(&content.tensor_infos, &full, shape);
                if !content.tensor_infos.contains_key(&gname) {
                    return Err(ModelError::MissingWeight(gname));
                }
                let q = match rows {
                    Some(r) => read_gguf_rows(content, file, &gname, r, device)?,
                    None => content.tensor(&mut &*file, &gname, device)?,
                };
                check_shape(&gname, q.shape(), shape)?;
                Matrix::Quantized(q)
            }
            Source::Safetensors {
                checkpoint,
                dtype,
                device,
            } => {
                let Renamed { name, rows } = self.renamed(&full);
                if !checkpoint.contains(&name) {
                    return Err(ModelError::MissingWeight(name));
                }
                // The stored tensor's shape: the fused tensor when only some rows are wanted.
                let mut stored = shape.dims().to_vec();
                if let (Some(r), Some(first)) = (rows, stored.first_mut()) {
                    *first = r.of;
                }
                let stored = Shape::from(stored);
                let (offset, len) = rows.map_or((0, shape.dims()[0]), |r| (r.offset, r.len));
                if let Some(qt) = quantize {
                    let (values, found) = checkpoint.read_f32(&name)?;
                    check_shape(&name, &Shape::from(found), &stored)?;
                    let cols = shape.dims()[1];
                    let part = &values[offset * cols..(offset + len) * cols];
                    Matrix::Quantized(quantize_rows(part, (len, cols), qt, device)?)
                } else {
                    // A bf16 matrix stays bf16 under f32 activations on the CPU.
                    let keep_bf16 = quantizable
                        && device.is_cpu()
                        && *dtype == DType::F32
                        && checkpoint.stored_dtype(&name) == Some(DType::BF16);
                    let load = if keep_bf16 { DType::BF16 } else { *dtype };
                    let mut t = checkpoint.read(&name, load, device)?;
                    check_shape(&name, t.shape(), &stored)?;
                    if rows.is_some() {
                        t = t.narrow(0, offset, len)?.contiguous()?;
                    }
                    if keep_bf16 {
                        Matrix::Bf16(t)
                    } else {
                        Matrix::Dense(t)
                    }
                }
            }
            Source::Synthetic {
                seed,
                dtype,
                device,
            } => {
                let t = super::synthetic::tensor(&full, shape.dims(), *seed)?;
                match quantize {
                    Some(qt) => {
                        let values = t.flatten_all()?.to_vec1::<f32>()?;
                        let (rows, cols) = shape.dims2()?;
                        Matrix::Quantized(quantize_rows(&values, (rows, cols), qt, device)?)
                    }
                    None => Matrix::Dense(t.to_dtype(*dtype)?.to_device(device)?),
                }
            }
        };
        shared.progress.inc(1);
        Ok(m)
    }

    /// Close the progress bar (and say what `--quantize` made of the matrices).
    pub fn finish(&self) {
        self.shared.progress.finish_and_clear();
        if let (Some(q), Ok(counts)) = (self.shared.quantize, self.shared.quantized.lock()) {
            let made: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
            tracing::info!(quantize = q.name(), matrices = %made.join(", "), "quantized at load");
        }
    }

    /// How many matrices `--quantize` turned into each type (`q4k`, `q8_0`, ..., or `dense`).
    pub fn quantized_counts(&self) -> BTreeMap<String, usize> {
        self.shared
            .quantized
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
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
