//! The paged KV cache tensors: per layer, K and V storage of `num_blocks * block_size` token
//! slots, each `num_kv_heads * head_dim` wide (layout `[num_blocks, block_size, num_kv_heads,
//! head_dim]`). Which block belongs to whom is decided by `engine::kv`; this only stores.
//!
//! Two storages: plain host vectors (f32, f16, or Q8_0: int8 values with an f16 scale per 32)
//! that the CPU attention kernel reads in place, and device tensors (`[slots, num_kv_heads *
//! head_dim]` in the model's dtype) that stay on the accelerator and are read by the tensor
//! attention path (`layers::paged_tensor`).

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::Result;

/// The `CacheSpec::dtype` that means Q8_0 host storage: int8 values, each 32 consecutive
/// values of a slot with one f16 scale (llama.cpp's `q8_0` KV type; 34 bytes per 32 values).
pub const KV_Q8_0: DType = DType::U8;

/// Values per Q8_0 scale.
pub const Q8_GROUP: usize = 32;

/// The shape of one token's cache entry, per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Element type of the cache (the model's activation dtype), or [`KV_Q8_0`].
    pub dtype: DType,
    /// MLA (DeepSeek-V2): no V is stored; the values are the first this-many dimensions of each
    /// K row (the compressed latent), so a token costs only its K row.
    pub values_in_keys: Option<usize>,
}

impl CacheSpec {
    /// Bytes one token position costs across all layers (K, and V unless it lives in K).
    pub fn bytes_per_token(&self) -> usize {
        let rows = if self.values_in_keys.is_some() { 1 } else { 2 };
        let values = rows * self.num_layers * self.slot_width();
        if self.dtype == KV_Q8_0 {
            values + values / Q8_GROUP * 2
        } else {
            values * self.dtype.size_in_bytes()
        }
    }

    /// Why this model's rows cannot be stored as Q8_0, if they cannot: each head's row must be
    /// whole groups of 32 (as for llama.cpp's quantized KV types).
    pub fn q8_0_unsupported(&self) -> Option<String> {
        let row = self.head_dim;
        (!row.is_multiple_of(Q8_GROUP)).then(|| {
            format!(
                "a q8_0 KV cache needs heads of a multiple of {Q8_GROUP} values; this model's are {row}"
            )
        })
    }

    /// Elements of one slot (one token, one layer, K or V).
    pub fn slot_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// An element type of host K/V storage.
pub trait KvElem: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// `n` zeros, from zeroed pages the OS maps on first write (not written here, so a pool
    /// costs resident memory only as it fills).
    fn zeros(n: usize) -> Vec<Self>;
    /// `dst[i] = src[i]` rounded to this type.
    fn store(dst: &mut [Self], src: &[f32]);
}

impl KvElem for f32 {
    fn zeros(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }

    fn store(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    fn zeros(n: usize) -> Vec<Self> {
        // `vec![f16::ZERO; n]` would write every element (only primitives get calloc); zeroed
        // u16s are the same bits.
        let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
        // SAFETY: f16 is `repr(transparent)` over u16 (same size and alignment), and the
        // allocation is handed over whole (pointer, length, capacity).
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f16, v.len(), v.capacity()) }
    }

    fn store(dst: &mut [Self], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

/// One layer's K and V slots on the host (`v` empty when values live in K).
#[derive(Debug)]
pub struct HostKv<E> {
    pub k: Vec<E>,
    pub v: Vec<E>,
}

impl<E: KvElem> HostKv<E> {
    fn zeros(n: usize, nv: usize) -> Self {
        Self {
            k: E::zeros(n),
            v: E::zeros(nv),
        }
    }

    fn write(&mut self, w: usize, k: &[f32], v: &[f32], slot_mapping: &[usize]) {
        let values = !self.v.is_empty();
        for (t, &slot) in slot_mapping.iter().enumerate() {
            E::store(
                &mut self.k[slot * w..(slot + 1) * w],
                &k[t * w..(t + 1) * w],
            );
            if values {
                E::store(
                    &mut self.v[slot * w..(slot + 1) * w],
                    &v[t * w..(t + 1) * w],
                );
            }
        }
    }
}

/// One layer's K and V slots in Q8_0 (`v`/`v_scales` empty when values live in K).
#[derive(Debug)]
pub struct HostQ8 {
    pub k: Vec<i8>,
    pub k_scales: Vec<f16>,
    pub v: Vec<i8>,
    pub v_scales: Vec<f16>,
}

impl HostQ8 {
    fn zeros(n: usize, nv: usize) -> Self {
        Self {
            k: vec![0; n],
            k_scales: f16::zeros(n / Q8_GROUP),
            v: vec![0; nv],
            v_scales: f16::zeros(nv / Q8_GROUP),
        }
    }

    fn write(&mut self, w: usize, k: &[f32], v: &[f32], slot_mapping: &[usize]) {
        let values = !self.v.is_empty();
        let g = w / Q8_GROUP;
        for (t, &slot) in slot_mapping.iter().enumerate() {
            quantize_q8(
                &mut self.k[slot * w..(slot + 1) * w],
                &mut self.k_scales[slot * g..(slot + 1) * g],
                &k[t * w..(t + 1) * w],
            );
            if values {
                quantize_q8(
                    &mut self.v[slot * w..(slot + 1) * w],
                    &mut self.v_scales[slot * g..(slot + 1) * g],
                    &v[t * w..(t + 1) * w],
                );
            }
        }
    }
}

/// `src` into int8 values and one f16 scale per 32 (the largest magnitude maps to ±127;
/// rounded to nearest, ties away from zero), as llama.cpp's Q8_0 quantizes.
pub fn quantize_q8(qs: &mut [i8], scales: &mut [f16], src: &[f32]) {
    for ((q, d), x) in qs
        .chunks_exact_mut(Q8_GROUP)
        .zip(scales.iter_mut())
        .zip(src.chunks_exact(Q8_GROUP))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (qv, &xv) in q.iter_mut().zip(x) {
            *qv = (xv * inv).round() as i8;
        }
        *d = f16::from_f32(scale);
    }
}

/// One layer's host K/V: f32, f16 (half the bytes read per attended key) or Q8_0 (about a
/// quarter of f32's).
#[derive(Debug)]
pub enum LayerKv {
    F32(HostKv<f32>),
    F16(HostKv<f16>),
    Q8(HostQ8),
}

impl LayerKv {
    /// Whether V has storage of its own (not with MLA, whose values are in K).
    pub fn has_values(&self) -> bool {
        match self {
            Self::F32(l) => !l.v.is_empty(),
            Self::F16(l) => !l.v.is_empty(),
            Self::Q8(l) => !l.v.is_empty(),
        }
    }
}

/// One layer's K and V slots as device tensors, `[slots, slot_width]` each.
#[derive(Debug)]
pub struct TensorLayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

#[derive(Debug)]
enum Storage {
    Host(Vec<LayerKv>),
    Tensor(Vec<TensorLayerKv>),
}

#[derive(Debug)]
pub struct KvCache {
    spec: CacheSpec,
    num_blocks: usize,
    block_size: usize,
    storage: Storage,
}

impl KvCache {
    /// Zeroed host storage: f16 when `spec.dtype` is F16, Q8_0 when it is [`KV_Q8_0`] (and
    /// the rows allow it), f32 otherwise; pages are only touched (and so only resident) once
    /// written.
    pub fn new(spec: CacheSpec, num_blocks: usize, block_size: usize) -> Self {
        let n = num_blocks * block_size * spec.slot_width();
        let nv = if spec.values_in_keys.is_some() { 0 } else { n };
        let dtype = match spec.dtype {
            DType::F16 => DType::F16,
            KV_Q8_0 if spec.q8_0_unsupported().is_none() => KV_Q8_0,
            _ => DType::F32,
        };
        let layers = (0..spec.num_layers)
            .map(|_| match dtype {
                DType::F16 => LayerKv::F16(HostKv::zeros(n, nv)),
                KV_Q8_0 => LayerKv::Q8(HostQ8::zeros(n, nv)),
                _ => LayerKv::F32(HostKv::zeros(n, nv)),
            })
            .collect();
        Self {
            spec: CacheSpec { dtype, ..spec },
            num_blocks,
            block_size,
            storage: Storage::Host(layers),
        }
    }

    /// Zeroed tensors of `spec.dtype` on `device` (any device; the CPU too, for tests).
    pub fn tensors(
        spec: CacheSpec,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if spec.dtype == KV_Q8_0 {
            return Err(super::ModelError::Device(
                "has no q8_0 KV cache: it is CPU-only (host storage)".into(),
            ));
        }
        let shape = (num_blocks * block_size, spec.slot_width());
        let layers = (0..spec.num_layers)
            .map(|_| {
                let k = Tensor::zeros(shape, spec.dtype, device)?;
                // With values in K, `v` shares K's storage (no memory of its own).
                let v = match spec.values_in_keys {
                    Some(_) => k.clone(),
                    None => Tensor::zeros(shape, spec.dtype, device)?,
                };
                Ok(TensorLayerKv { k, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            spec,
            num_blocks,
            block_size,
            storage: Storage::Tensor(layers),
        })
    }

    /// The storage a model on `device` runs fastest with: host vectors on the CPU (read in
    /// place by the CPU kernel), tensors on an accelerator.
    pub fn for_device(
        spec: CacheSpec,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if device.is_cpu() && matches!(spec.dtype, DType::F32 | DType::F16 | KV_Q8_0) {
            Ok(Self::new(spec, num_blocks, block_size))
        } else {
            Self::tensors(spec, num_blocks, block_size, device)
        }
    }

    pub fn spec(&self) -> CacheSpec {
        self.spec
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Layer `i` in host storage, `None` when the cache holds tensors.
    pub fn host_layer(&self, i: usize) -> Option<&LayerKv> {
        match &self.storage {
            Storage::Host(l) => l.get(i),
            Storage::Tensor(_) => None,
        }
    }

    /// Layer `i` in tensor storage, `None` when the cache is on the host.
    pub fn tensor_layer(&self, i: usize) -> Option<&TensorLayerKv> {
        match &self.storage {
            Storage::Tensor(l) => l.get(i),
            Storage::Host(_) => None,
        }
    }

    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host(_))
    }

    /// Write the K/V rows of a batch (`[tokens, slot_width]` each) into their host slots (`v`
    /// is ignored when values live in K). Does nothing on tensor storage (that path writes
    /// with `paged_tensor`).
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], slot_mapping: &[usize]) {
        let w = self.spec.slot_width();
        let Storage::Host(layers) = &mut self.storage else {
            return;
        };
        match &mut layers[layer] {
            LayerKv::F32(l) => l.write(w, k, v, slot_mapping),
            LayerKv::F16(l) => l.write(w, k, v, slot_mapping),
            LayerKv::Q8(l) => l.write(w, k, v, slot_mapping),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_needs_whole_groups_and_costs_34_bytes_per_32_values() {
        let spec = |head_dim| CacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim,
            dtype: KV_Q8_0,
            values_in_keys: None,
        };
        assert_eq!(spec(64).q8_0_unsupported(), None);
        let why = spec(16).q8_0_unsupported().unwrap();
        assert!(
            why.contains("multiple of 32") && why.contains("16"),
            "{why}"
        );
        // K and V, 2 layers, 128 values each: 512 values, 16 scales of 2 bytes
        assert_eq!(spec(64).bytes_per_token(), 512 + 32);
        // a model whose rows do not allow it gets an f32 host cache instead of a broken one
        let kv = KvCache::new(spec(16), 2, 4);
        assert_eq!(kv.spec().dtype, DType::F32);
        assert!(KvCache::tensors(spec(64), 2, 4, &Device::Cpu).is_err());
    }

    #[test]
    fn q8_0_rounds_each_group_to_its_largest_magnitude() {
        let src: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.5).collect();
        let mut qs = vec![0i8; 64];
        let mut scales = vec![f16::ZERO; 2];
        quantize_q8(&mut qs, &mut scales, &src);
        // group 0: -10.0 .. 5.5 -> amax 10; group 1: 6.0 .. 21.5 -> amax 21.5
        assert_eq!((qs[0], qs[32 + 31]), (-127, 127));
        for (i, (&q, &x)) in qs.iter().zip(&src).enumerate() {
            let back = f32::from(q) * scales[i / 32].to_f32();
            let step = scales[i / 32].to_f32();
            assert!((back - x).abs() <= 0.5 * step + 1e-3, "{x} -> {back}");
        }
    }
}
