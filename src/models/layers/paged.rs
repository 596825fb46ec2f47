//! One entry point for paged attention, whichever storage the KV cache has: host blocks read
//! in place by the CPU kernel ([`super::paged_attention`]), or device tensors through a
//! [`TensorAttnPlan`] built once per forward pass and shared by every layer.

use candle_core::{DType, Device, Tensor};

use super::{paged_attention, AttnDims, TensorAttnPlan};
use crate::models::{ForwardBatch, KvCache, ModelError, Result};

/// How one forward pass reaches the KV cache.
pub enum CachePath {
    Host,
    Tensor(TensorAttnPlan),
}

impl CachePath {
    pub fn new(batch: &ForwardBatch, kv: &KvCache, device: &Device) -> Result<Self> {
        Ok(if kv.is_host() {
            Self::Host
        } else {
            Self::Tensor(TensorAttnPlan::new(batch, kv.spec().slot_width(), device)?)
        })
    }
}

/// Write this batch's K/V into layer `layer`'s slots and attend. `q`: `[tokens, heads *
/// head_dim]`, `k`: `[tokens, kv_heads * head_dim]` (RoPE applied), `v`: `[tokens, kv_heads *
/// v_head_dim]`, or `None` when the values live in the keys (MLA). Returns `[tokens, heads *
/// v_head_dim]` in `q`'s dtype.
#[allow(clippy::too_many_arguments)]
pub fn paged_attend(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: Option<&Tensor>,
    batch: &ForwardBatch,
    kv: &mut KvCache,
    path: &CachePath,
    d: AttnDims,
) -> Result<Tensor> {
    let missing = || ModelError::Batch(format!("KV cache has no layer {layer}"));
    match path {
        CachePath::Host => {
            let host = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (qh, kh) = (host(q)?, host(k)?);
            let vh = match v {
                Some(v) => host(v)?,
                None => Vec::new(),
            };
            kv.write(layer, &kh, &vh, &batch.slot_mapping);
            let cache = kv.host_layer(layer).ok_or_else(missing)?;
            let o = paged_attention(&qh, cache, batch, d);
            let shape = (batch.num_tokens(), d.num_heads * d.v_head_dim);
            Ok(Tensor::from_vec(o, shape, q.device())?.to_dtype(q.dtype())?)
        }
        CachePath::Tensor(plan) => {
            let cache = kv.tensor_layer(layer).ok_or_else(missing)?;
            plan.write(cache, k, v)?;
            Ok(plan.attend(q, cache, d)?.to_dtype(q.dtype())?)
        }
    }
}
