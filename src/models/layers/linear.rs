//! Weight-backed layers that hide whether their weights are dense or GGUF-quantized, each with
//! its `load` from a [`Weights`] view (shape-checked against the config).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Module, Tensor};

use super::bf16::Bf16Matrix;
use super::qtiles::TiledMatrix;
use crate::models::gguf_cpu::{gguf_linear, pad_q8_0_rows, repack_for_cpu, tiled};
use crate::models::weights::{Matrix, Weights};
use crate::models::{ModelError, Result};

/// Which kernel computes `x W^T`.
#[derive(Debug, Clone)]
enum Weight {
    /// candle's: dense, or quantized.
    Candle(QMatMul),
    /// inferd's CPU kernel for 32-element block types (`qtiles`).
    Tiled(Arc<TiledMatrix>),
    /// bf16 weights on the CPU, f32 activations (`bf16`).
    Bf16(Arc<Bf16Matrix>),
}

/// `y = x W^T + b`, with W dense (`QMatMul::Tensor`), quantized (`QMatMul::QTensor`), or in
/// inferd's CPU tiles ([`TiledMatrix`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// Run single-row inputs as two rows. candle computes a one-row Q6_K product with a
    /// different kernel (compact weights) than a multi-row one (repacked tiles), and the two
    /// round differently; going through the multi-row kernel always keeps a sequence's logits
    /// independent of how many other sequences share its batch.
    pad_single_row: bool,
    /// Zero columns appended to the weight (see `weights::pad_q8_0_rows`); inputs get as many
    /// zeros.
    k_pad: usize,
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self::with_k_pad(weight, bias, 0)
    }

    pub fn with_k_pad(weight: QMatMul, bias: Option<Tensor>, k_pad: usize) -> Self {
        let pad_single_row = matches!(&weight, QMatMul::QTensor(q) if q.dtype() == GgmlDType::Q6K);
        Self {
            weight: Weight::Candle(weight),
            bias,
            pad_single_row,
            k_pad,
        }
    }

    pub fn tiled(weight: Arc<TiledMatrix>, bias: Option<Tensor>) -> Self {
        Self::with_weight(Weight::Tiled(weight), bias)
    }

    pub fn bf16(weight: Arc<Bf16Matrix>, bias: Option<Tensor>) -> Self {
        Self::with_weight(Weight::Bf16(weight), bias)
    }

    fn with_weight(weight: Weight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            pad_single_row: false,
            k_pad: 0,
        }
    }

    /// `weight` (`[out_dim, in_dim]`) and, when `bias`, `bias` (`[out_dim]`) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let m = w.matrix("weight", (out_dim, in_dim))?;
        let b = bias.then(|| w.get("bias", out_dim)).transpose()?;
        Self::from_matrix(m, b)
    }

    /// The kernel for a stored matrix: candle's dense matmul, inferd's bf16 kernel, or for
    /// GGUF the CPU kernel `gguf_cpu` picks.
    pub fn from_matrix(m: Matrix, bias: Option<Tensor>) -> Result<Self> {
        match m {
            Matrix::Bf16(t) => Ok(Self::bf16(Arc::new(Bf16Matrix::from_tensor(&t)?), bias)),
            Matrix::Dense(t) => Ok(Self::new(QMatMul::Tensor(t), bias)),
            Matrix::Quantized(q) => gguf_linear(q, bias),
        }
    }

    /// `x`: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.k_pad > 0 {
            x.pad_with_zeros(1, 0, self.k_pad)?
        } else {
            x.contiguous()?
        };
        let y = match &self.weight {
            Weight::Tiled(w) => x.apply_op1_no_bwd(w.as_ref())?,
            Weight::Bf16(w) => w.forward(&x)?,
            Weight::Candle(q) if self.pad_single_row && x.dim(0)? == 1 => {
                let two = Tensor::cat(&[&x, &x], 0)?;
                q.forward(&two)?.narrow(0, 0, 1)?
            }
            Weight::Candle(q) => q.forward(&x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Several projections of the same input: one matmul over row-concatenated weights (`widths`
/// output columns each), or one matmul each when their types differ.
#[derive(Debug, Clone)]
pub enum Projections {
    Fused { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// The projections `names` (each `[out_dims[i], in_dim]`, with a bias when `bias`) of one
    /// input under `w`: one matmul over their rows concatenated when their weights share a type
    /// (one kernel dispatch and one quantization of the input instead of several), else one by
    /// one.
    pub fn load(
        w: &Weights,
        names: &[&str],
        in_dim: usize,
        out_dims: &[usize],
        bias: bool,
    ) -> Result<Self> {
        let parts = names.iter().zip(out_dims).map(|(n, &out)| {
            let w = w.pp(n);
            let m = w.matrix("weight", (out, in_dim))?;
            let b = bias.then(|| w.get("bias", out)).transpose()?;
            Ok((m, b))
        });
        let (mats, biases): (Vec<Matrix>, Vec<Option<Tensor>>) =
            parts.collect::<Result<Vec<_>>>()?.into_iter().unzip();
        match concat_rows(&mats)? {
            Some(m) => {
                let bias = if bias {
                    let b: Vec<Tensor> = biases.into_iter().flatten().collect();
                    Some(Tensor::cat(&b, 0)?)
                } else {
                    None
                };
                Ok(Self::Fused {
                    linear: Linear::from_matrix(m, bias)?,
                    widths: out_dims.to_vec(),
                })
            }
            None => Ok(Self::Separate(
                mats.into_iter()
                    .zip(biases)
                    .map(|(m, b)| Linear::from_matrix(m, b))
                    .collect::<Result<Vec<_>>>()?,
            )),
        }
    }

    /// Each projection of `x` (`[tokens, in]`), in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { linear, widths } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w)?;
                        start += w;
                        Ok(part)
                    })
                    .collect()
            }
            Self::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

/// Matrices of one input width stacked by rows, when they are all dense, all bf16 or all
/// quantized in one type; `None` otherwise.
fn concat_rows(mats: &[Matrix]) -> Result<Option<Matrix>> {
    /// Each matrix's `pick`, when every one has it.
    fn every<'a, T>(
        mats: &'a [Matrix],
        pick: fn(&'a Matrix) -> Option<&'a T>,
    ) -> Option<Vec<&'a T>> {
        mats.iter().map(pick).collect()
    }
    if let Some(ts) = every(mats, |m| match m {
        Matrix::Dense(t) => Some(t),
        _ => None,
    }) {
        return Ok(Some(Matrix::Dense(Tensor::cat(&ts, 0)?)));
    }
    if let Some(ts) = every(mats, |m| match m {
        Matrix::Bf16(t) => Some(t),
        _ => None,
    }) {
        return Ok(Some(Matrix::Bf16(Tensor::cat(&ts, 0)?)));
    }
    let quantized = every(mats, |m| match m {
        Matrix::Quantized(q) => Some(q),
        _ => None,
    });
    let Some(qs) = quantized else {
        return Ok(None);
    };
    let Some(first) = qs.first() else {
        return Ok(None);
    };
    let k = first.shape().dims().get(1).copied();
    let same = qs.iter().all(|q| {
        q.dtype() == first.dtype()
            && q.shape().dims().len() == 2
            && q.shape().dims().get(1).copied() == k
    });
    let Some(k) = k.filter(|_| same) else {
        return Ok(None);
    };
    let mut data = Vec::new();
    let mut rows = 0;
    for q in &qs {
        data.extend_from_slice(&q.data()?);
        rows += q.shape().dims()[0];
    }
    let storage = QStorage::from_data(Cow::Owned(data), &first.device(), first.dtype())?;
    Ok(Some(Matrix::Quantized(QTensor::new(storage, (rows, k))?)))
}

/// Token embeddings; quantized tables are dequantized one row at a time.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// Rows may carry zero padding past `hidden` (when shared with a padded output head).
    Quantized {
        table: Arc<QTensor>,
        hidden: usize,
    },
    /// A table in inferd's CPU tiles (shared with a tied output head).
    Tiled(Arc<TiledMatrix>),
    /// A bf16 table on the CPU (shared with a tied output head); rows come out f32.
    Bf16(Arc<Bf16Matrix>),
}

impl Embedding {
    /// The table `weight` (`[vocab, hidden]`) under `w`, and the same weights as the output
    /// projection when `tied`.
    pub fn load(
        w: &Weights,
        vocab: usize,
        hidden: usize,
        tied: bool,
    ) -> Result<(Self, Option<Linear>)> {
        match w.matrix("weight", (vocab, hidden))? {
            Matrix::Quantized(q) => {
                if let Some(table) = tiled(&q)? {
                    let table = Arc::new(table);
                    let head = tied.then(|| Linear::tiled(table.clone(), None));
                    return Ok((Self::Tiled(table), head));
                }
                let (q, k_pad) = pad_q8_0_rows(repack_for_cpu(q)?)?;
                let q = Arc::new(q);
                let head = tied
                    .then(|| {
                        QMatMul::from_arc(q.clone()).map(|m| Linear::with_k_pad(m, None, k_pad))
                    })
                    .transpose()?;
                let emb = match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Self::Dense(q.dequantize(&q.device())?)
                    }
                    _ => Self::Quantized { table: q, hidden },
                };
                Ok((emb, head))
            }
            Matrix::Bf16(t) => {
                let table = Arc::new(Bf16Matrix::from_tensor(&t)?);
                let head = tied.then(|| Linear::bf16(table.clone(), None));
                Ok((Self::Bf16(table), head))
            }
            Matrix::Dense(t) => {
                let head = tied.then(|| Linear::new(QMatMul::Tensor(t.clone()), None));
                Ok((Self::Dense(t), head))
            }
        }
    }

    /// `ids`: `[tokens]` u32 → `[tokens, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(w) => w.index_select(ids, 0)?,
            Self::Quantized { table, hidden } => {
                let rows = table.embedding(ids)?;
                if rows.dim(1)? == *hidden {
                    rows
                } else {
                    rows.narrow(1, 0, *hidden)?.contiguous()?
                }
            }
            Self::Tiled(table) => gather_rows(ids, table.rows(), table.cols(), |id, row| {
                table.dequantize_row(id, row)
            })?,
            Self::Bf16(table) => gather_rows(ids, table.rows(), table.cols(), |id, row| {
                table.widen_row(id, row)
            })?,
        })
    }
}

/// The rows `ids` (`[tokens]` u32) of a `rows × cols` table, each written by `row_of`, as a
/// `[tokens, cols]` f32 tensor; an id past the table is an error.
fn gather_rows(
    ids: &Tensor,
    rows: usize,
    cols: usize,
    row_of: impl Fn(usize, &mut [f32]),
) -> Result<Tensor> {
    let device = ids.device().clone();
    let ids = ids.to_vec1::<u32>()?;
    let mut out = vec![0f32; ids.len() * cols];
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
        let id = id as usize;
        if id >= rows {
            return Err(ModelError::Batch(format!(
                "token id {id} outside the vocabulary of {rows}"
            )));
        }
        row_of(id, row);
    }
    Ok(Tensor::from_vec(out, (ids.len(), cols), &device)?)
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f32) -> Self {
        Self { weight, eps }
    }

    /// `weight` (`[size]`) under `w`.
    pub fn load(w: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(w.get("weight", size)?, eps as f32))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    /// A tied table in tiles: lookups are the dequantized rows, the head is the tiled matmul,
    /// and an id past the vocabulary is an error, not a panic.
    #[test]
    fn tiled_embedding_and_tied_head_share_one_table() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..40 * 64)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        let w = Tensor::from_vec(w, (40, 64), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq = q.dequantize(&dev).unwrap();
        let table = Arc::new(TiledMatrix::from_qtensor(&q).unwrap().unwrap());
        let emb = Embedding::Tiled(table.clone());
        let ids = Tensor::new(&[3u32, 39, 0], &dev).unwrap();
        let rows = emb.forward(&ids).unwrap();
        let want = deq.index_select(&ids, 0).unwrap();
        assert_eq!(
            rows.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let head = Linear::tiled(table, None);
        let logits = head.forward(&rows).unwrap();
        let dense = rows.matmul(&deq.t().unwrap()).unwrap();
        for (got, want) in logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        {
            // the activations are quantized to 8 bits; the weights are exact
            assert!(
                (got - want).abs() < 0.02 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
        let bad = Tensor::new(&[40u32], &dev).unwrap();
        let err = emb.forward(&bad).unwrap_err().to_string();
        assert!(
            err.contains("token id 40 outside the vocabulary of 40"),
            "{err}"
        );
    }
}
