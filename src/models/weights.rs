//! Where weights come from: a GGUF file (quantized) or a Hugging Face safetensors directory.
//!
//! Model files ask for tensors by their Hugging Face names; [`gguf_name`] is the one table that
//! maps them to llama.cpp's names. Which CPU kernel runs a GGUF matrix is `gguf_cpu`'s choice.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use indicatif::ProgressBar;

use super::gguf_cpu::{gguf_linear, pad_q8_0_rows, repack_for_cpu, tiled};
use super::layers::{Embedding, GatedMlp, Linear, Projections, RmsNorm};
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

/// Maps a Hugging Face tensor name to the checkpoint's own name, and the rows of that tensor
/// that hold it (`(offset, len)`; for fused tensors split at load, like THUDM's
/// `query_key_value`).
pub type Rename = Box<dyn Fn(&str) -> (String, Option<(usize, usize)>) + Send>;

pub enum Weights {
    Gguf {
        content: gguf_file::Content,
        file: File,
        device: Device,
        progress: ProgressBar,
    },
    Safetensors {
        vb: VarBuilder<'static>,
        progress: ProgressBar,
        rename: Option<Rename>,
    },
    /// Seeded random weights of given shapes (benchmarks and tests of model shapes whose
    /// checkpoints are not at hand). Values are bf16-representable whatever `dtype` is, so a
    /// bf16 copy on a GPU and an f32 copy on the CPU hold the same numbers.
    Synthetic {
        shapes: std::collections::HashMap<String, Vec<usize>>,
        seed: u64,
        dtype: DType,
        device: Device,
        progress: ProgressBar,
    },
}

impl Weights {
    pub fn gguf(path: &Path, content: gguf_file::Content, device: &Device) -> Result<Self> {
        let progress = progress_bar(content.tensor_infos.len() as u64, path);
        Ok(Self::Gguf {
            content,
            file: File::open(path)?,
            device: device.clone(),
            progress,
        })
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
        let progress = progress_bar(count, files.first().map_or(Path::new(""), |p| p.as_path()));
        Ok(Self::Safetensors {
            vb,
            progress,
            rename: None,
        })
    }

    /// Read tensors under the names `rename` gives (checkpoints in a layout of their own).
    pub fn with_rename(mut self, r: Rename) -> Self {
        if let Self::Safetensors { rename, .. } = &mut self {
            *rename = Some(r);
        }
        self
    }

    pub fn synthetic(
        shapes: Vec<(String, Vec<usize>)>,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let progress = progress_bar(shapes.len() as u64, Path::new("synthetic weights"));
        Self::Synthetic {
            shapes: shapes.into_iter().collect(),
            seed,
            dtype,
            device: device.clone(),
            progress,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Gguf { device, .. } | Self::Synthetic { device, .. } => device,
            Self::Safetensors { vb, .. } => vb.device(),
        }
    }

    /// The dtype dense tensors come in, which models use for activations and the KV cache
    /// (GGUF: f32, what candle's quantized kernels take).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Gguf { .. } => DType::F32,
            Self::Safetensors { vb, .. } => vb.dtype(),
            Self::Synthetic { dtype, .. } => *dtype,
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(hf_name)),
            Self::Safetensors { vb, rename, .. } => match rename {
                Some(r) => vb.contains_tensor(&r(hf_name).0),
                None => vb.contains_tensor(hf_name),
            },
            Self::Synthetic { shapes, .. } => shapes.contains_key(hf_name),
        }
    }

    fn qtensor(&mut self, hf_name: &str) -> Result<QTensor> {
        let Self::Gguf {
            content,
            file,
            device,
            progress,
        } = self
        else {
            unreachable!("qtensor is only called on GGUF weights")
        };
        let name = gguf_name(hf_name);
        if !content.tensor_infos.contains_key(&name) {
            return Err(ModelError::MissingWeight(name));
        }
        let t = content.tensor(file, &name, device)?;
        progress.inc(1);
        Ok(t)
    }

    /// A dense f32 tensor (norm weights, biases).
    pub fn tensor(&mut self, hf_name: &str) -> Result<Tensor> {
        match self {
            Self::Gguf { .. } => {
                let dev = self.device().clone();
                Ok(self.qtensor(hf_name)?.dequantize(&dev)?)
            }
            Self::Safetensors {
                vb,
                progress,
                rename,
            } => {
                let (name, rows) = match rename {
                    Some(r) => r(hf_name),
                    None => (hf_name.to_string(), None),
                };
                if !vb.contains_tensor(&name) {
                    return Err(ModelError::MissingWeight(name));
                }
                let mut t = vb.get_unchecked(&name)?;
                if let Some((offset, len)) = rows {
                    t = t.narrow(0, offset, len)?.contiguous()?;
                }
                progress.inc(1);
                Ok(t)
            }
            Self::Synthetic {
                shapes,
                seed,
                dtype,
                device,
                progress,
            } => {
                let shape = shapes
                    .get(hf_name)
                    .ok_or_else(|| ModelError::MissingWeight(hf_name.to_string()))?;
                let t = super::synthetic::tensor(hf_name, shape, *seed)?
                    .to_dtype(*dtype)?
                    .to_device(device)?;
                progress.inc(1);
                Ok(t)
            }
        }
    }

    /// `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        let w = format!("{prefix}.weight");
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        match self {
            Self::Gguf { .. } => gguf_linear(self.qtensor(&w)?, bias),
            Self::Safetensors { .. } | Self::Synthetic { .. } => {
                Ok(Linear::new(QMatMul::Tensor(self.tensor(&w)?), bias))
            }
        }
    }

    /// Projections of one input (`{prefix}.weight` each, and `.bias` when `bias`), as one matmul
    /// over their rows concatenated when their weights share a type (one kernel dispatch and one
    /// quantization of the input instead of several), else one by one.
    pub fn projections(&mut self, prefixes: &[String], bias: bool) -> Result<Projections> {
        let biases = |w: &mut Self| -> Result<Option<Vec<Tensor>>> {
            bias.then(|| {
                prefixes
                    .iter()
                    .map(|p| w.tensor(&format!("{p}.bias")))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()
        };
        let cat_bias = |b: Option<Vec<Tensor>>| -> Result<Option<Tensor>> {
            Ok(match b {
                Some(b) => Some(Tensor::cat(&b, 0)?),
                None => None,
            })
        };
        match self {
            Self::Gguf { .. } => {
                let qs = prefixes
                    .iter()
                    .map(|p| self.qtensor(&format!("{p}.weight")))
                    .collect::<Result<Vec<_>>>()?;
                let b = biases(self)?;
                let first = &qs[0];
                let same = qs.iter().all(|q| {
                    q.dtype() == first.dtype()
                        && q.shape().dims().len() == 2
                        && q.shape().dims()[1] == first.shape().dims()[1]
                });
                if !same {
                    let parts = qs
                        .into_iter()
                        .zip(0..)
                        .map(|(q, i)| gguf_linear(q, b.as_ref().map(|b| b[i].clone())))
                        .collect::<Result<Vec<_>>>()?;
                    return Ok(Projections::Separate(parts));
                }
                let widths: Vec<usize> = qs.iter().map(|q| q.shape().dims()[0]).collect();
                let k = first.shape().dims()[1];
                let dtype = first.dtype();
                let mut data = Vec::new();
                for q in &qs {
                    data.extend_from_slice(&q.data()?);
                }
                let storage = QStorage::from_data(Cow::Owned(data), &first.device(), dtype)?;
                let q = QTensor::new(storage, (widths.iter().sum::<usize>(), k))?;
                let linear = gguf_linear(q, cat_bias(b)?)?;
                Ok(Projections::Fused { linear, widths })
            }
            Self::Safetensors { .. } | Self::Synthetic { .. } => {
                let ws = prefixes
                    .iter()
                    .map(|p| self.tensor(&format!("{p}.weight")))
                    .collect::<Result<Vec<_>>>()?;
                let widths = ws
                    .iter()
                    .map(|w| w.dim(0))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let weight = QMatMul::Tensor(Tensor::cat(&ws, 0)?);
                let linear = Linear::new(weight, cat_bias(biases(self)?)?);
                Ok(Projections::Fused { linear, widths })
            }
        }
    }

    /// An embedding table, and the same weights as an output projection when `tied`.
    pub fn embedding(&mut self, prefix: &str, tied: bool) -> Result<(Embedding, Option<Linear>)> {
        let w = format!("{prefix}.weight");
        match self {
            Self::Gguf { .. } => {
                let q = self.qtensor(&w)?;
                if let Some(table) = tiled(&q)? {
                    let table = Arc::new(table);
                    let head = tied.then(|| Linear::tiled(table.clone(), None));
                    return Ok((Embedding::Tiled(table), head));
                }
                let (q, k_pad) = pad_q8_0_rows(repack_for_cpu(q)?)?;
                let q = Arc::new(q);
                let hidden = q.shape().dims2()?.1 - k_pad;
                let head = tied
                    .then(|| {
                        QMatMul::from_arc(q.clone()).map(|m| Linear::with_k_pad(m, None, k_pad))
                    })
                    .transpose()?;
                let emb = match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Embedding::Dense(q.dequantize(&q.device())?)
                    }
                    _ => Embedding::Quantized { table: q, hidden },
                };
                Ok((emb, head))
            }
            Self::Safetensors { .. } | Self::Synthetic { .. } => {
                let t = self.tensor(&w)?;
                let head = tied.then(|| Linear::new(QMatMul::Tensor(t.clone()), None));
                Ok((Embedding::Dense(t), head))
            }
        }
    }

    /// `{prefix}.gate_up_proj` (fused, gate first) if present, else `{prefix}.gate_proj` and
    /// `{prefix}.up_proj`; then `{prefix}.down_proj`.
    pub fn gated_mlp(&mut self, prefix: &str) -> Result<GatedMlp> {
        let down = |w: &mut Self| w.linear(&format!("{prefix}.down_proj"), false);
        if self.contains(&format!("{prefix}.gate_up_proj.weight")) {
            let gate_up = self.linear(&format!("{prefix}.gate_up_proj"), false)?;
            Ok(GatedMlp::fused(gate_up, down(self)?))
        } else {
            let names = [format!("{prefix}.gate_proj"), format!("{prefix}.up_proj")];
            match self.projections(&names, false)? {
                Projections::Fused { linear, .. } => Ok(GatedMlp::fused(linear, down(self)?)),
                Projections::Separate(mut p) => {
                    let up = p.pop();
                    let gate = p.pop();
                    match (gate, up) {
                        (Some(gate), Some(up)) => Ok(GatedMlp::new(gate, up, down(self)?)),
                        _ => Err(ModelError::MissingWeight(names[0].clone())),
                    }
                }
            }
        }
    }

    pub fn rms_norm(&mut self, prefix: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(
            self.tensor(&format!("{prefix}.weight"))?,
            eps as f32,
        ))
    }

    pub fn finish(&self) {
        match self {
            Self::Gguf { progress, .. }
            | Self::Safetensors { progress, .. }
            | Self::Synthetic { progress, .. } => progress.finish_and_clear(),
        }
    }
}

fn progress_bar(len: u64, path: &Path) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
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
