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

impl Trunk {
    /// The embedding table (also the output head when tied, or when the checkpoint has no
    /// `lm_head`); call before loading the layers, then [`Trunk::finish`].
    pub fn embedding(
        w: &mut Weights,
        tie_word_embeddings: bool,
    ) -> Result<(Embedding, Option<Linear>)> {
        let tied = tie_word_embeddings || !w.contains("lm_head.weight");
        w.embedding("model.embed_tokens", tied)
    }

    /// Load the final norm and the output head, and put the RoPE tables on the device.
    pub fn finish(
        w: &mut Weights,
        (embed_tokens, tied_head): (Embedding, Option<Linear>),
        rms_norm_eps: f64,
        rope: RotaryEmbedding,
    ) -> Result<Self> {
        let norm = w.rms_norm("model.norm", rms_norm_eps)?;
        let lm_head = match tied_head {
            Some(h) => h,
            None => w.linear("lm_head", false)?,
        };
        w.finish();
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
