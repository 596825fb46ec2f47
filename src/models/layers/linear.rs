//! Weight-backed layers that hide whether their weights are dense or GGUF-quantized.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::models::Result;

/// `y = x W^T + b`, with W dense (`QMatMul::Tensor`) or quantized (`QMatMul::QTensor`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
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
            weight,
            bias,
            pad_single_row,
            k_pad,
        }
    }

    /// `x`: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.k_pad > 0 {
            x.pad_with_zeros(1, 0, self.k_pad)?
        } else {
            x.contiguous()?
        };
        let y = if self.pad_single_row && x.dim(0)? == 1 {
            let two = Tensor::cat(&[&x, &x], 0)?;
            self.weight.forward(&two)?.narrow(0, 0, 1)?
        } else {
            self.weight.forward(&x)?
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

/// Token embeddings; quantized tables are dequantized one row at a time.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// Rows may carry zero padding past `hidden` (when shared with a padded output head).
    Quantized {
        table: Arc<QTensor>,
        hidden: usize,
    },
}

impl Embedding {
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
        })
    }
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}
