//! The paged KV cache tensors: per layer, K and V storage of `num_blocks * block_size` token
//! slots, each `num_kv_heads * head_dim` wide (layout `[num_blocks, block_size, num_kv_heads,
//! head_dim]`). Which block belongs to whom is decided by `engine::kv`; this only stores.

/// The shape of one token's cache entry, per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl CacheSpec {
    /// Bytes one token position costs across all layers (K and V, f32).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Elements of one slot (one token, one layer, K or V).
    pub fn slot_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// One layer's K and V slots.
#[derive(Debug)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

#[derive(Debug)]
pub struct KvCache {
    spec: CacheSpec,
    num_blocks: usize,
    block_size: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// Zeroed storage; pages are only touched (and so only resident) once written.
    pub fn new(spec: CacheSpec, num_blocks: usize, block_size: usize) -> Self {
        let n = num_blocks * block_size * spec.slot_width();
        let layers = (0..spec.num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        Self {
            spec,
            num_blocks,
            block_size,
            layers,
        }
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub fn layer(&self, i: usize) -> &LayerKv {
        &self.layers[i]
    }

    /// Write the K/V rows of a batch (`[tokens, slot_width]` each) into their slots.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], slot_mapping: &[usize]) {
        let w = self.spec.slot_width();
        let l = &mut self.layers[layer];
        for (t, &slot) in slot_mapping.iter().enumerate() {
            l.k[slot * w..(slot + 1) * w].copy_from_slice(&k[t * w..(t + 1) * w]);
            l.v[slot * w..(slot + 1) * w].copy_from_slice(&v[t * w..(t + 1) * w]);
        }
    }
}
