//! The engine: one thread per loaded model that owns its scheduler, KV blocks and model, and a
//! cloneable [`EngineHandle`] that the API uses to submit requests and receive a stream of
//! neutral [`EngineEvent`]s (tokens and finish reasons — no OpenAI shapes here).

mod core;
pub mod guide;
pub mod kv;
pub mod logits;
mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::mpsc::UnboundedReceiver;

pub use self::core::{spawn_engine, EngineConfig, EngineThread};
pub use crate::telemetry::EngineStats;
pub use sampler::{SamplingParams, TokenLogprobs};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error(
        "the engine is at capacity ({running} running and {waiting} waiting requests); retry later"
    )]
    QueueFull { running: usize, waiting: usize },
    #[error(transparent)]
    ContextTooLong(#[from] ContextExceeded),
    #[error("the engine has stopped")]
    Stopped,
    #[error("model error: {0}")]
    Model(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The output constraint from request `field` cannot be followed (see `guide`).
    #[error("{message}")]
    Grammar {
        field: &'static str,
        message: String,
    },
}

/// A request that does not fit the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContextExceeded {
    /// The prompt leaves no room for a single new token.
    #[error("the prompt is too long: this model's maximum context length is {max_model_len} tokens, and the prompt has {prompt_tokens} ({} over, leaving no room for the completion)", prompt_tokens + 1 - max_model_len)]
    Prompt {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    /// The prompt and `max_tokens` together are longer than the context.
    #[error("max_tokens is too large: this model's maximum context length is {max_model_len} tokens, but {} were requested ({prompt_tokens} in the prompt, {max_tokens} for the completion), {} over; max_tokens can be at most {}", prompt_tokens + max_tokens, prompt_tokens + max_tokens - max_model_len, max_model_len - prompt_tokens)]
    Completion {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
}

/// The context rule, the one place it is written: a prompt must leave room for at least one
/// new token, and the prompt and `max_tokens` must fit `max_model_len` together. Returns the
/// completion budget: `max_tokens`, or without it the rest of the context.
pub fn fit_context(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    max_model_len: usize,
) -> Result<usize, ContextExceeded> {
    if prompt_tokens >= max_model_len {
        return Err(ContextExceeded::Prompt {
            prompt_tokens,
            max_model_len,
        });
    }
    match max_tokens {
        Some(m) if prompt_tokens + m > max_model_len => Err(ContextExceeded::Completion {
            prompt_tokens,
            max_tokens: m,
            max_model_len,
        }),
        Some(m) => Ok(m),
        None => Ok(max_model_len - prompt_tokens),
    }
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
    /// The grammar the output must follow (`response_format`, tools, `structured_outputs`).
    pub guide: Option<guide::Guide>,
}

/// Limits the API validates against before submitting.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_model_len: usize,
    /// Sequences one step can run.
    pub max_num_seqs: usize,
    /// Requests that may wait beyond those that can run.
    pub max_waiting_requests: usize,
}

impl EngineLimits {
    /// Unfinished requests an engine accepts: as many as it can run plus the waiting bound.
    pub fn capacity(&self) -> usize {
        self.max_num_seqs + self.max_waiting_requests
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
    /// The snapshot the engine publishes after every step.
    stats: Arc<Mutex<EngineStats>>,
    limits: EngineLimits,
    next_id: Arc<AtomicU64>,
    /// Requests submitted and not finished (in the channel, waiting or running); the engine
    /// takes one off when it ends a request.
    outstanding: Arc<AtomicUsize>,
}

impl EngineHandle {
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// The engine's latest published state.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Queue a request. Dropping the returned receiver aborts it and frees its blocks.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<EngineEvent>, EngineError> {
        let max_len = self.limits.max_model_len;
        fit_context(request.prompt_ids.len(), Some(request.max_tokens), max_len)?;
        let capacity = self.limits.capacity();
        if self.outstanding.fetch_add(1, Ordering::SeqCst) >= capacity {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull {
                running: self.limits.max_num_seqs,
                waiting: self.limits.max_waiting_requests,
            });
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
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_rule() {
        assert_eq!(fit_context(10, Some(6), 16), Ok(6));
        assert_eq!(fit_context(10, None, 16), Ok(6), "the rest of the context");
        let over = fit_context(10, Some(7), 16).unwrap_err();
        assert!(over.to_string().contains("17 were requested"), "{over}");
        assert!(matches!(
            fit_context(16, None, 16),
            Err(ContextExceeded::Prompt {
                prompt_tokens: 16,
                ..
            })
        ));
    }
}
