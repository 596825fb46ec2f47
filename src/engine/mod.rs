//! The engine: one thread per loaded model that owns its scheduler, KV blocks and model, and a
//! cloneable [`EngineHandle`] that the API uses to submit requests and receive a stream of
//! neutral [`EngineEvent`]s (tokens and finish reasons — no OpenAI shapes here).

mod core;
pub mod kv;
pub mod logits;
mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::mpsc::UnboundedReceiver;

pub use self::core::{spawn_engine, EngineConfig, EngineThread};
pub use sampler::{SamplingParams, TokenLogprobs};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the waiting queue is full ({max} requests); retry later")]
    QueueFull { max: usize },
    #[error("this request needs {needed} tokens of context but the engine holds at most {max}")]
    ContextTooLong { needed: usize, max: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("model error: {0}")]
    Model(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Why a sequence stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine sends back for one request, in order: zero or more `Token`s, then exactly
/// one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// One generated token and the text it completes (possibly empty: an unfinished character
    /// or a possible stop string is held back), with its log-probabilities when asked for.
    Token {
        token_id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// Generation ended; `text` is whatever was still held back.
    Finished {
        text: String,
        reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}

/// A tokenized, validated request.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// New tokens at most.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
}

/// Limits the API validates against before submitting.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub max_waiting_requests: usize,
}

/// Live counters the engine thread publishes after every step.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub num_running: AtomicUsize,
    pub num_waiting: AtomicUsize,
    pub num_free_blocks: AtomicUsize,
    pub num_total_blocks: AtomicUsize,
    pub num_kv_sequences: AtomicUsize,
    pub num_preemptions: AtomicU64,
    pub num_steps: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub num_cached_blocks: AtomicUsize,
}

/// A point-in-time copy of [`EngineStats`].
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq)]
pub struct StatsSnapshot {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub num_kv_sequences: usize,
    pub kv_cache_usage: f64,
    pub num_preemptions: u64,
    pub num_steps: u64,
    pub generation_tokens: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Blocks holding a cached prefix (free or in use).
    pub num_cached_blocks: usize,
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let total = self.num_total_blocks.load(Ordering::Relaxed);
        let free = self.num_free_blocks.load(Ordering::Relaxed);
        StatsSnapshot {
            num_running: self.num_running.load(Ordering::Relaxed),
            num_waiting: self.num_waiting.load(Ordering::Relaxed),
            num_free_blocks: free,
            num_total_blocks: total,
            num_kv_sequences: self.num_kv_sequences.load(Ordering::Relaxed),
            kv_cache_usage: if total == 0 {
                0.0
            } else {
                (total - free) as f64 / total as f64
            },
            num_preemptions: self.num_preemptions.load(Ordering::Relaxed),
            num_steps: self.num_steps.load(Ordering::Relaxed),
            generation_tokens: self.generation_tokens.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            prefix_cache_queries: self.prefix_cache_queries.load(Ordering::Relaxed),
            prefix_cache_hits: self.prefix_cache_hits.load(Ordering::Relaxed),
            num_cached_blocks: self.num_cached_blocks.load(Ordering::Relaxed),
        }
    }
}

pub(crate) enum EngineMsg {
    Submit {
        id: u64,
        request: Box<GenerationRequest>,
        events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
        arrival: std::time::Instant,
    },
}

/// The API's side of an engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<EngineMsg>,
    stats: Arc<EngineStats>,
    limits: EngineLimits,
    next_id: Arc<AtomicU64>,
    /// Requests submitted and not yet admitted to the running set (channel + waiting queue).
    pending: Arc<AtomicUsize>,
}

impl EngineHandle {
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Queue a request. Dropping the returned receiver aborts it and frees its blocks.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<EngineEvent>, EngineError> {
        let needed = request.prompt_ids.len() + request.max_tokens;
        if needed > self.limits.max_model_len {
            return Err(EngineError::ContextTooLong {
                needed,
                max: self.limits.max_model_len,
            });
        }
        let max = self.limits.max_waiting_requests;
        if self.pending.fetch_add(1, Ordering::SeqCst) >= max {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { max });
        }
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = EngineMsg::Submit {
            id,
            request: Box::new(request),
            events,
            arrival: std::time::Instant::now(),
        };
        if self.tx.send(msg).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }
}
