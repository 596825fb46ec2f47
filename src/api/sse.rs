//! The streaming chunk state machine, apart from transport: engine events of each choice in,
//! OpenAI chunk objects out (chat: role chunk first, content deltas, a last chunk per choice
//! with `finish_reason`; completions: text deltas; both: an optional usage chunk). The handler
//! writes each object as an SSE `data:` line and ends with `data: [DONE]`.

use serde::Serialize;

use super::error::ApiError;
use super::logprobs::{self, TokenBytes};
use super::tools::{ToolCallParser, ToolDelta, ToolFormat};
use super::types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, ErrorResponse, FinishReasonOut,
    FunctionCallOut, FunctionDelta, ToolCallDelta, ToolCallOut, UsageOut,
};
use crate::engine::EngineEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// One `data:` object of a stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StreamChunk {
    Chat(ChatCompletionChunk),
    Completion(Completion),
    /// A choice failed after the stream started.
    Error(ErrorResponse),
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

/// What a stream is made of, fixed when the request is accepted.
pub struct StreamSpec {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub num_prompts: usize,
    /// Choices per prompt; choice `i` belongs to prompt `i / n`.
    pub n: usize,
    /// Completions with `echo`: each prompt's text, sent first in each of its choices.
    pub echo: Vec<String>,
    pub token_bytes: TokenBytes,
    /// Chat with tools: the text is parsed into content and tool calls.
    pub tools: Option<ToolStream>,
}

/// How a chat stream with tools reports its calls.
#[derive(Debug, Clone)]
pub struct ToolStream {
    pub format: ToolFormat,
    /// The names of the functions a call may name.
    pub names: Vec<String>,
    /// A reply with calls finishes as `tool_calls` (not when the function was named).
    pub finish_as_tool_calls: bool,
}

pub struct ChunkBuilder {
    spec: StreamSpec,
    num_choices: usize,
    /// Per choice, with tools (none without).
    parsers: Vec<ToolCallParser>,
    finished: Vec<bool>,
    /// Characters sent per choice (completions' `text_offset`).
    chars: Vec<usize>,
    usage: UsageTally,
}

impl ChunkBuilder {
    pub fn new(spec: StreamSpec) -> Self {
        let num_choices = spec.num_prompts * spec.n;
        Self {
            usage: UsageTally::new(spec.num_prompts, spec.n),
            parsers: spec.tools.as_ref().map_or_else(Vec::new, |t| {
                (0..num_choices)
                    .map(|_| ToolCallParser::new(t.format, &t.names))
                    .collect()
            }),
            finished: vec![false; num_choices],
            chars: vec![0; num_choices],
            num_choices,
            spec,
        }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageOut>) -> StreamChunk {
        StreamChunk::Chat(ChatCompletionChunk {
            id: self.spec.id.clone(),
            object: "chat.completion.chunk",
            created: self.spec.created,
            model: self.spec.model.clone(),
            choices,
            usage,
        })
    }

    fn completion_chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<UsageOut>,
    ) -> StreamChunk {
        StreamChunk::Completion(Completion {
            id: self.spec.id.clone(),
            object: "text_completion",
            created: self.spec.created,
            model: self.spec.model.clone(),
            choices,
            usage,
        })
    }

    /// A chunk of choice `index` carrying `text` (counted for `text_offset`), its logprobs,
    /// and the finish reason when it is the last.
    fn choice(
        &mut self,
        index: usize,
        text: Option<String>,
        logprobs: Option<PieceLogprobs>,
        finish: Option<FinishReasonOut>,
    ) -> StreamChunk {
        self.chars[index] += text.as_deref().map_or(0, |t| t.chars().count());
        match self.spec.kind {
            Kind::Chat => {
                let logprobs = match logprobs {
                    Some(PieceLogprobs::Chat(l)) => Some(l),
                    _ => None,
                };
                let delta = ChatDelta {
                    role: None,
                    content: text,
                    tool_calls: None,
                };
                let c = ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason: finish,
                };
                self.chat_chunk(vec![c], None)
            }
            Kind::Completion => {
                let logprobs = match logprobs {
                    Some(PieceLogprobs::Completion(l)) => Some(l),
                    _ => None,
                };
                let c = CompletionChoice {
                    index,
                    text: text.unwrap_or_default(),
                    logprobs,
                    finish_reason: finish,
                };
                self.completion_chunk(vec![c], None)
            }
        }
    }

    /// Chunks sent before any token: the assistant role of each chat choice, or each
    /// completion choice's echoed prompt.
    pub fn start(&mut self) -> Vec<StreamChunk> {
        match self.spec.kind {
            Kind::Chat => (0..self.num_choices)
                .map(|index| {
                    let delta = ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    };
                    let c = ChatChunkChoice {
                        index,
                        delta,
                        logprobs: None,
                        finish_reason: None,
                    };
                    self.chat_chunk(vec![c], None)
                })
                .collect(),
            Kind::Completion if !self.spec.echo.is_empty() => (0..self.num_choices)
                .map(|i| {
                    let prompt = self.spec.echo[i / self.spec.n].clone();
                    self.choice(i, Some(prompt), None, None)
                })
                .collect(),
            Kind::Completion => Vec::new(),
        }
    }

    pub fn on_event(&mut self, index: usize, ev: EngineEvent) -> Vec<StreamChunk> {
        if index >= self.num_choices || self.finished[index] {
            return Vec::new();
        }
        match ev {
            EngineEvent::Token {
                token_id,
                text,
                logprobs,
            } => {
                let tb = &self.spec.token_bytes;
                let lp = logprobs.map(|lp| match self.spec.kind {
                    Kind::Chat => PieceLogprobs::Chat(ChatLogprobs {
                        content: vec![logprobs::chat_entry(token_id, &lp, tb)],
                    }),
                    Kind::Completion => PieceLogprobs::Completion(logprobs::completion_piece(
                        token_id,
                        &lp,
                        self.chars[index],
                        tb,
                    )),
                });
                if self.spec.tools.is_some() {
                    let deltas = self.parsers[index].push(&text);
                    return self.tool_chunks(index, deltas, lp);
                }
                // With logprobs every token is reported, even one whose text is held back.
                if text.is_empty() && lp.is_none() {
                    return Vec::new();
                }
                vec![self.choice(index, Some(text), lp, None)]
            }
            EngineEvent::Finished {
                text,
                reason,
                usage,
            } => {
                self.finished[index] = true;
                self.usage.add(index, usage);
                let mut out = Vec::new();
                let mut reason: FinishReasonOut = reason.into();
                if let Some(t) = &self.spec.tools {
                    let finish_as_tool_calls = t.finish_as_tool_calls;
                    let mut deltas = self.parsers[index].push(&text);
                    deltas.extend(self.parsers[index].finish());
                    out = self.tool_chunks(index, deltas, None);
                    let called = self.parsers[index].num_calls() > 0;
                    if called && finish_as_tool_calls && reason == FinishReasonOut::Stop {
                        reason = FinishReasonOut::ToolCalls;
                    }
                } else if !text.is_empty() {
                    out.push(self.choice(index, Some(text), None, None));
                }
                out.push(self.choice(index, None, None, Some(reason)));
                out
            }
            EngineEvent::Error(e) => {
                self.finished[index] = true;
                vec![StreamChunk::Error(ApiError::from(e).response())]
            }
        }
    }

    /// Chat chunks for what the tool parser recognised; a token's logprobs ride on the first
    /// (or on an empty delta when its text is held back).
    fn tool_chunks(
        &mut self,
        index: usize,
        deltas: Vec<ToolDelta>,
        lp: Option<PieceLogprobs>,
    ) -> Vec<StreamChunk> {
        let mut lp = match lp {
            Some(PieceLogprobs::Chat(l)) => Some(l),
            _ => None,
        };
        let mut out = Vec::new();
        let mut chunk = |b: &Self, delta: ChatDelta, lp: Option<ChatLogprobs>| {
            let c = ChatChunkChoice {
                index,
                delta,
                logprobs: lp,
                finish_reason: None,
            };
            out.push(b.chat_chunk(vec![c], None));
        };
        for d in deltas {
            let delta = match d {
                ToolDelta::Content(text) => ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                },
                ToolDelta::Start { index: i, name } => call_delta(ToolCallDelta {
                    index: i,
                    id: Some(new_call_id()),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: String::new(),
                    },
                }),
                ToolDelta::Args { index: i, fragment } => call_delta(ToolCallDelta {
                    index: i,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: fragment,
                    },
                }),
            };
            chunk(self, delta, lp.take());
        }
        if let Some(lp) = lp {
            chunk(self, ChatDelta::default(), Some(lp));
        }
        out
    }

    pub fn is_done(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    pub fn usage(&self) -> UsageOut {
        self.usage.total()
    }

    /// Chunks after every choice finished: the usage chunk when asked for.
    pub fn end(&self) -> Vec<StreamChunk> {
        if !self.spec.include_usage {
            return Vec::new();
        }
        let usage = Some(self.usage.total());
        vec![match self.spec.kind {
            Kind::Chat => self.chat_chunk(Vec::new(), usage),
            Kind::Completion => self.completion_chunk(Vec::new(), usage),
        }]
    }

    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }
}

fn call_delta(d: ToolCallDelta) -> ChatDelta {
    ChatDelta {
        tool_calls: Some(vec![d]),
        ..ChatDelta::default()
    }
}

/// `call_` and 24 random letters and digits, as OpenAI's ids look.
fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// A token's logprobs in its endpoint's shape.
enum PieceLogprobs {
    Chat(ChatLogprobs),
    Completion(CompletionLogprobs),
}

/// Fold a chat stream's chunks into the `choices` of the equivalent non-streaming response,
/// so the two can never disagree.
pub fn aggregate_chat(num_choices: usize, chunks: &[StreamChunk]) -> Vec<ChatChoice> {
    let mut out: Vec<ChatChoice> = (0..num_choices)
        .map(|index| ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: Some(String::new()),
                tool_calls: Vec::new(),
            },
            logprobs: None,
            finish_reason: None,
        })
        .collect();
    let choices = chunks.iter().flat_map(|c| match c {
        StreamChunk::Chat(c) => c.choices.as_slice(),
        _ => &[],
    });
    for c in choices {
        if let Some(o) = out.get_mut(c.index) {
            let text = c.delta.content.as_deref().unwrap_or("");
            if let Some(content) = &mut o.message.content {
                content.push_str(text);
            }
            for d in c.delta.tool_calls.iter().flatten() {
                let calls = &mut o.message.tool_calls;
                if let Some(id) = &d.id {
                    calls.push(ToolCallOut {
                        id: id.clone(),
                        kind: "function",
                        function: FunctionCallOut {
                            name: d.function.name.clone().unwrap_or_default(),
                            arguments: String::new(),
                        },
                    });
                }
                if let Some(call) = calls.get_mut(d.index) {
                    call.function.arguments.push_str(&d.function.arguments);
                }
            }
            merge(&mut o.logprobs, &c.logprobs, ChatLogprobs::extend);
            o.finish_reason = c.finish_reason.or(o.finish_reason);
        }
    }
    // A reply that is only calls has no content (`null`), as OpenAI's.
    for o in &mut out {
        if !o.message.tool_calls.is_empty() && o.message.content.as_deref() == Some("") {
            o.message.content = None;
        }
    }
    out
}

/// [`aggregate_chat`] for completions.
pub fn aggregate_completion(num_choices: usize, chunks: &[StreamChunk]) -> Vec<CompletionChoice> {
    let mut out: Vec<CompletionChoice> = (0..num_choices)
        .map(|index| CompletionChoice {
            index,
            text: String::new(),
            logprobs: None,
            finish_reason: None,
        })
        .collect();
    let choices = chunks.iter().flat_map(|c| match c {
        StreamChunk::Completion(c) => c.choices.as_slice(),
        _ => &[],
    });
    for c in choices {
        if let Some(o) = out.get_mut(c.index) {
            o.text.push_str(&c.text);
            merge(&mut o.logprobs, &c.logprobs, CompletionLogprobs::extend);
            o.finish_reason = c.finish_reason.or(o.finish_reason);
        }
    }
    out
}

/// Append a chunk's logprobs (if any) to its choice's.
fn merge<L: Clone + Default>(into: &mut Option<L>, more: &Option<L>, extend: fn(&mut L, L)) {
    if let Some(lp) = more {
        extend(into.get_or_insert_with(L::default), lp.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineError, FinishReason, Usage};
    use serde_json::{json, Value};

    /// Chunks as the client sees them.
    fn v(chunks: Vec<StreamChunk>) -> Vec<Value> {
        chunks
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect()
    }

    fn tok(text: &str) -> EngineEvent {
        EngineEvent::Token {
            token_id: 1,
            text: text.into(),
            logprobs: None,
        }
    }

    fn spec(kind: Kind, include_usage: bool, n: usize) -> StreamSpec {
        StreamSpec {
            kind,
            id: "id-1".into(),
            created: 5,
            model: "m".into(),
            include_usage,
            num_prompts: 1,
            n,
            echo: Vec::new(),
            token_bytes: std::sync::Arc::new(|id| format!("<{id}>").into_bytes()),
            tools: None,
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
        let mut b = ChunkBuilder::new(spec(Kind::Chat, true, 1));
        let start = v(b.start());
        assert_eq!(start.len(), 1);
        assert_eq!(start[0]["object"], "chat.completion.chunk");
        assert_eq!(start[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(b.on_event(0, tok("Hel")).len(), 1);
        assert!(
            b.on_event(0, tok("")).is_empty(),
            "empty deltas are not sent"
        );
        let out = v(b.on_event(0, fin("lo", FinishReason::Length, 2)));
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
        let end = v(b.end());
        assert_eq!(end[0]["choices"], json!([]));
        assert_eq!(
            end[0]["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
        );
    }

    #[test]
    fn completion_stream_with_two_choices_counts_the_prompt_once() {
        let mut b = ChunkBuilder::new(spec(Kind::Completion, true, 2));
        assert!(b.start().is_empty());
        let c = v(b.on_event(1, tok("x")));
        assert_eq!(c[0]["object"], "text_completion");
        assert_eq!(c[0]["choices"][0]["index"], 1);
        assert_eq!(c[0]["choices"][0]["text"], "x");
        b.on_event(0, fin("", FinishReason::Stop, 3));
        assert!(!b.is_done());
        b.on_event(1, fin("", FinishReason::Stop, 4));
        assert!(b.is_done());
        assert_eq!(v(b.end())[0]["usage"]["prompt_tokens"], 7);
        assert_eq!(v(b.end())[0]["usage"]["completion_tokens"], 7);
    }

    #[test]
    fn errors_become_openai_error_events() {
        let mut b = ChunkBuilder::new(spec(Kind::Chat, false, 1));
        let out = v(b.on_event(0, EngineEvent::Error(EngineError::Model("boom".into()))));
        assert_eq!(out[0]["error"]["type"], "server_error");
        assert!(b.is_done());
        assert!(b.end().is_empty());
    }

    #[test]
    fn logprobs_are_sent_per_token_and_aggregate_like_the_stream() {
        let lp = |l: f32| {
            Some(crate::engine::TokenLogprobs {
                logprob: l,
                top: vec![(4, -0.1)],
            })
        };
        let mut s = spec(Kind::Completion, false, 1);
        s.echo = vec!["Q:".into()];
        let mut b = ChunkBuilder::new(s);
        let mut chunks = b.start();
        chunks.extend(b.on_event(
            0,
            EngineEvent::Token {
                token_id: 7,
                text: "ab".into(),
                logprobs: lp(-1.0),
            },
        ));
        // Text held back (empty) still reports the token's logprobs.
        chunks.extend(b.on_event(
            0,
            EngineEvent::Token {
                token_id: 8,
                text: "".into(),
                logprobs: lp(-2.0),
            },
        ));
        chunks.extend(b.on_event(0, fin("c", FinishReason::Stop, 2)));
        assert_eq!(chunks.len(), 5);
        let choices = serde_json::to_value(aggregate_completion(1, &chunks)).unwrap();
        assert_eq!(choices[0]["text"], "Q:abc");
        assert_eq!(choices[0]["finish_reason"], "stop");
        assert_eq!(
            choices[0]["logprobs"],
            json!({"tokens": ["<7>", "<8>"], "token_logprobs": [-1.0, -2.0],
                   "top_logprobs": [{"<4>": -0.1}, {"<4>": -0.1}], "text_offset": [2, 4]})
        );

        let mut b = ChunkBuilder::new(spec(Kind::Chat, false, 1));
        let mut chunks = b.start();
        chunks.extend(b.on_event(
            0,
            EngineEvent::Token {
                token_id: 7,
                text: "hi".into(),
                logprobs: lp(-0.5),
            },
        ));
        chunks.extend(b.on_event(0, fin("", FinishReason::Length, 1)));
        let choices = serde_json::to_value(aggregate_chat(1, &chunks)).unwrap();
        assert_eq!(
            choices[0]["message"],
            json!({"role": "assistant", "content": "hi"})
        );
        assert_eq!(choices[0]["logprobs"]["content"][0]["token"], "<7>");
        assert_eq!(
            choices[0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"],
            -0.1
        );
        assert_eq!(choices[0]["finish_reason"], "length");
    }
}
