//! What every decoder family shares around its layers: token embedding, the per-pass cache
//! path and RoPE rows, the final norm of only the rows that sample, and the output head.

use candle_core::{DType, Device, Tensor};

use super::{CachePath, Embedding, Linear, RmsNorm, RopeRows, RopeTables, RotaryEmbedding};
use crate::models::weights::Weights;
use crate::models::{ForwardBatch, KvCache, Result};

pub struct Trunk {
    pub embed_tokens: Embedding,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: RopeTables,
    pub device: Device,
    /// Activation and KV cache dtype.
    pub dtype: DType,
}

/// What the layers of one forward pass share.
pub struct Pass<'a> {
    pub batch: &'a ForwardBatch,
    pub path: CachePath,
    pub rows: RopeRows,
}

/// The sizes the trunk's weights are checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrunkDims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub tie_word_embeddings: bool,
    pub rms_norm_eps: f64,
}

impl Trunk {
    /// `model.embed_tokens`, `model.norm` and `lm_head` (the embedding table when tied, or when
    /// the checkpoint has no `lm_head`), with the RoPE tables put on the device.
    pub fn load(w: &Weights, d: TrunkDims, rope: RotaryEmbedding) -> Result<Self> {
        let (vocab, hidden) = (d.vocab_size, d.hidden_size);
        let tied = d.tie_word_embeddings || !w.contains("lm_head.weight");
        let (embed_tokens, tied_head) =
            Embedding::load(&w.pp("model.embed_tokens"), vocab, hidden, tied)?;
        let norm = RmsNorm::load(&w.pp("model.norm"), hidden, d.rms_norm_eps)?;
        let lm_head = match tied_head {
            Some(h) => h,
            None => Linear::load(&w.pp("lm_head"), hidden, vocab, false)?,
        };
        let dtype = w.dtype();
        Ok(Self {
            embed_tokens,
            norm,
            lm_head,
            rope: rope.tables(w.device(), dtype)?,
            device: w.device().clone(),
            dtype,
        })
    }

    /// The decoder layers `model.layers.{i}` for `i < n`, each loaded by `layer`.
    pub fn load_layers<L>(
        w: &Weights,
        n: usize,
        mut layer: impl FnMut(usize, &Weights) -> Result<L>,
    ) -> Result<Vec<L>> {
        (0..n)
            .map(|i| layer(i, &w.pp(format!("model.layers.{i}"))))
            .collect()
    }

    /// Embed the batch, run `layer(i, x, kv, pass)` for layers `0..num_layers` (each returns
    /// the new residual stream), and return the logits of `batch.logits_indices`.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        num_layers: usize,
        mut layer: impl FnMut(usize, Tensor, &mut KvCache, &Pass) -> Result<Tensor>,
    ) -> Result<Tensor> {
        batch.validate(kv.num_slots())?;
        let ids = Tensor::new(batch.input_ids.as_slice(), &self.device)?;
        let mut x = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?;
        let pass = Pass {
            batch,
            path: CachePath::new(batch, kv, &self.device)?,
            rows: self.rope.rows(&batch.positions)?,
        };
        for i in 0..num_layers {
            x = layer(i, x, kv, &pass)?;
        }
        let idx: Vec<u32> = batch.logits_indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&idx, 0)?)?;
        self.lm_head.forward(&x)
    }
}
