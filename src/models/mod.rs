//! Model families and the interface the engine drives them through.
//!
//! A model takes one flat batch ([`ForwardBatch`]) — every scheduled token of every sequence,
//! with positions, block tables and slot mapping — and the paged [`KvCache`], and returns the
//! logits of only the rows that sample. Models know nothing of sequences, requests or HTTP.

pub mod deepseek2;
pub mod device;
pub mod family;
pub mod gguf_cpu;
pub mod gguf_names;
pub mod glm4;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod loader;
pub mod quantize;
pub mod qwen2;
pub mod safetensors;
pub mod synthetic;
pub mod weights;

use candle_core::{Device, Tensor};

pub use kv_cache::{CacheSpec, KvCache};
pub use loader::{load_model, load_model_with, LoadOptions, LoadedModel};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {found:?}, but the config implies {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("device {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// One engine step's worth of tokens, flattened across sequences.
///
/// Sequence `s` owns tokens `cu_seqlens_q[s]..cu_seqlens_q[s + 1]`; after this step its context
/// (tokens with K/V in the cache, including the new ones) is `seq_lens[s]` long and lives in the
/// blocks `block_tables[s]`. Token `t` is written to cache slot `slot_mapping[t]`
/// (`block * block_size + offset`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub cu_seqlens_q: Vec<usize>,
    pub seq_lens: Vec<usize>,
    pub block_tables: Vec<Vec<u32>>,
    pub slot_mapping: Vec<usize>,
    /// Rows of the flat batch whose logits are wanted, in output order.
    pub logits_indices: Vec<usize>,
    pub block_size: usize,
}

impl ForwardBatch {
    /// An empty batch over blocks of `block_size` positions.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            cu_seqlens_q: vec![0],
            ..Default::default()
        }
    }

    /// Add a sequence whose tokens `new` sit at positions `start..` of the context stored in
    /// the blocks `table`; its last token's logits are wanted.
    pub fn push_sequence(&mut self, new: &[u32], start: usize, table: &[u32]) {
        let bs = self.block_size;
        for (i, &t) in new.iter().enumerate() {
            let pos = start + i;
            self.input_ids.push(t);
            self.positions.push(pos as u32);
            let slot = table
                .get(pos / bs)
                .map_or(usize::MAX, |&b| b as usize * bs + pos % bs);
            self.slot_mapping.push(slot);
        }
        self.cu_seqlens_q.push(self.input_ids.len());
        self.seq_lens.push(start + new.len());
        self.block_tables.push(table.to_vec());
        if !new.is_empty() {
            self.logits_indices.push(self.input_ids.len() - 1);
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    /// Check the invariants the kernels rely on, so a bad batch is an error, not a panic.
    pub fn validate(&self, num_cache_slots: usize) -> Result<()> {
        let t = self.input_ids.len();
        let s = self.seq_lens.len();
        let bad = |m: &str| Err(ModelError::Batch(m.to_string()));
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return bad("positions and slot_mapping must have one entry per token");
        }
        if self.cu_seqlens_q.len() != s + 1 || self.block_tables.len() != s {
            return bad("cu_seqlens_q / block_tables do not match seq_lens");
        }
        if self.cu_seqlens_q.first() != Some(&0) || self.cu_seqlens_q.last() != Some(&t) {
            return bad("cu_seqlens_q must start at 0 and end at the token count");
        }
        if self.block_size == 0 {
            return bad("block_size must be positive");
        }
        for i in 0..s {
            let (lo, hi) = (self.cu_seqlens_q[i], self.cu_seqlens_q[i + 1]);
            if lo > hi || hi - lo > self.seq_lens[i] {
                return bad("a sequence has more new tokens than context");
            }
            if self.block_tables[i].len() * self.block_size < self.seq_lens[i] {
                return bad("a block table is too short for its sequence");
            }
        }
        if self.slot_mapping.iter().any(|&x| x >= num_cache_slots) {
            return bad("slot out of range");
        }
        if self.logits_indices.iter().any(|&i| i >= t) {
            return bad("logits index out of range");
        }
        Ok(())
    }
}

/// A causal language model on the paged, batched forward pass.
pub trait CausalLm: Send {
    /// Run the batch, writing its K/V into `kv`; returns logits `[logits_indices.len(), vocab]`.
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<Tensor>;
    /// What one token costs in the KV cache.
    fn cache_spec(&self) -> CacheSpec;
    fn device(&self) -> &Device;
    fn vocab_size(&self) -> usize;
    /// The longest context the model was trained for.
    fn max_position_embeddings(&self) -> usize;
}
