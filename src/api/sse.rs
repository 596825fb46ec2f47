//! The streaming chunk state machine, apart from transport: engine events of each choice in,
//! OpenAI chunk objects out (chat: role chunk first, content deltas, a last chunk per choice
//! with `finish_reason`; completions: text deltas; both: an optional usage chunk). The handler
//! writes each object as an SSE `data:` line and ends with `data: [DONE]`.

use serde_json::{json, Value};

use super::error::ApiError;
use super::types::UsageOut;
use crate::engine::{EngineEvent, FinishReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

pub fn finish_reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Usage over the choices of one request: each prompt counted once, every completion counted.
#[derive(Debug, Clone)]
pub struct UsageTally {
    n: usize,
    prompt_tokens: Vec<Option<usize>>,
    completion_tokens: usize,
}

impl UsageTally {
    /// `num_prompts` prompts with `n` choices each; choice `i` belongs to prompt `i / n`.
    pub fn new(num_prompts: usize, n: usize) -> Self {
        Self {
            n,
            prompt_tokens: vec![None; num_prompts],
            completion_tokens: 0,
        }
    }

    pub fn add(&mut self, choice: usize, usage: crate::engine::Usage) {
        if let Some(p) = self.prompt_tokens.get_mut(choice / self.n) {
            *p = Some(usage.prompt_tokens);
        }
        self.completion_tokens += usage.completion_tokens;
    }

    pub fn total(&self) -> UsageOut {
        let prompt_tokens = self.prompt_tokens.iter().flatten().sum();
        UsageOut {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
        }
    }
}

pub struct ChunkBuilder {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    num_choices: usize,
    finished: Vec<bool>,
    usage: UsageTally,
}

impl ChunkBuilder {
    pub fn new(
        kind: Kind,
        id: String,
        created: u64,
        model: String,
        include_usage: bool,
        num_prompts: usize,
        n: usize,
    ) -> Self {
        let num_choices = num_prompts * n;
        Self {
            kind,
            id,
            created,
            model,
            include_usage,
            num_choices,
            finished: vec![false; num_choices],
            usage: UsageTally::new(num_prompts, n),
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }

    fn choice(&self, index: usize, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        }
    }

    /// Chunks sent before any token: the assistant role for each chat choice.
    pub fn start(&self) -> Vec<Value> {
        match self.kind {
            Kind::Chat => (0..self.num_choices)
                .map(|i| {
                    self.chunk(
                        json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": null, "finish_reason": null}]),
                    )
                })
                .collect(),
            Kind::Completion => Vec::new(),
        }
    }

    pub fn on_event(&mut self, index: usize, ev: EngineEvent) -> Vec<Value> {
        if index >= self.num_choices || self.finished[index] {
            return Vec::new();
        }
        match ev {
            EngineEvent::Token { text, .. } if text.is_empty() => Vec::new(),
            EngineEvent::Token { text, .. } => {
                vec![self.chunk(json!([self.choice(index, Some(&text), None)]))]
            }
            EngineEvent::Finished {
                text,
                reason,
                usage,
            } => {
                self.finished[index] = true;
                self.usage.add(index, usage);
                let mut out = Vec::new();
                if !text.is_empty() {
                    out.push(self.chunk(json!([self.choice(index, Some(&text), None)])));
                }
                let last = self.choice(index, None, Some(finish_reason_str(reason)));
                out.push(self.chunk(json!([last])));
                out
            }
            EngineEvent::Error(e) => {
                self.finished[index] = true;
                vec![json!({"error": ApiError::from(e).body()})]
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    /// Chunks after every choice finished: the usage chunk when asked for.
    pub fn end(&self) -> Vec<Value> {
        if !self.include_usage {
            return Vec::new();
        }
        let mut c = self.chunk(json!([]));
        c["usage"] = json!(self.usage.total());
        vec![c]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineError, Usage};

    fn tok(text: &str) -> EngineEvent {
        EngineEvent::Token {
            token_id: 1,
            text: text.into(),
        }
    }

    fn fin(text: &str, reason: FinishReason, completion_tokens: usize) -> EngineEvent {
        EngineEvent::Finished {
            text: text.into(),
            reason,
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens,
            },
        }
    }

    #[test]
    fn chat_stream_role_deltas_finish_and_usage() {
        let mut b = ChunkBuilder::new(Kind::Chat, "chatcmpl-1".into(), 5, "m".into(), true, 1, 1);
        let start = b.start();
        assert_eq!(start.len(), 1);
        assert_eq!(start[0]["object"], "chat.completion.chunk");
        assert_eq!(start[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(b.on_event(0, tok("Hel")).len(), 1);
        assert!(
            b.on_event(0, tok("")).is_empty(),
            "empty deltas are not sent"
        );
        let out = b.on_event(0, fin("lo", FinishReason::Length, 2));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(out[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(out[1]["choices"][0]["delta"], json!({}));
        assert_eq!(out[1]["choices"][0]["finish_reason"], "length");
        assert!(b.is_done());
        assert!(
            b.on_event(0, tok("late")).is_empty(),
            "nothing after a choice finished"
        );
        let end = b.end();
        assert_eq!(end[0]["choices"], json!([]));
        assert_eq!(
            end[0]["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
        );
    }

    #[test]
    fn completion_stream_with_two_choices_counts_the_prompt_once() {
        let mut b = ChunkBuilder::new(Kind::Completion, "cmpl-1".into(), 5, "m".into(), true, 1, 2);
        assert!(b.start().is_empty());
        let c = b.on_event(1, tok("x"));
        assert_eq!(c[0]["object"], "text_completion");
        assert_eq!(c[0]["choices"][0]["index"], 1);
        assert_eq!(c[0]["choices"][0]["text"], "x");
        b.on_event(0, fin("", FinishReason::Stop, 3));
        assert!(!b.is_done());
        b.on_event(1, fin("", FinishReason::Stop, 4));
        assert!(b.is_done());
        assert_eq!(b.end()[0]["usage"]["prompt_tokens"], 7);
        assert_eq!(b.end()[0]["usage"]["completion_tokens"], 7);
    }

    #[test]
    fn errors_become_openai_error_events() {
        let mut b = ChunkBuilder::new(Kind::Chat, "x".into(), 0, "m".into(), false, 1, 1);
        let out = b.on_event(0, EngineEvent::Error(EngineError::Model("boom".into())));
        assert_eq!(out[0]["error"]["type"], "server_error");
        assert!(b.is_done());
        assert!(b.end().is_empty());
    }
}
