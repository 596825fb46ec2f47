//! OpenAI wire types: requests as clients send them (unknown fields ignored, as OpenAI does)
//! and the responses inferd returns.

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// `[{"type": "function", "function": {...}}]`, checked by `tools::ToolParams`.
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    pub suffix: Option<String>,
}

/// Parameters shared by chat and completions (read from the same body as the request).
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    pub min_tokens: Option<i64>,
    /// Chat: a boolean; completions: how many alternatives (an integer).
    pub logprobs: Option<LogprobsParam>,
    pub top_logprobs: Option<i64>,
    pub echo: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum LogprobsParam {
    Flag(bool),
    Count(i64),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A call in the history: `arguments` as OpenAI sends it (a JSON string) or as an object.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    #[serde(default)]
    pub arguments: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `prompt` of /v1/completions: text or token ids, one prompt or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
/// vLLM's `/tokenize`: a `prompt` or chat `messages`.
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_generation_prompt: Option<bool>,
    pub add_special_tokens: Option<bool>,
    /// With `messages`: the tools, rendered as a chat request's would be (vLLM takes them too).
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

// ---- Responses -------------------------------------------------------------------------

/// `finish_reason` as OpenAI spells it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinishReasonOut {
    Stop,
    Length,
    ToolCalls,
}

impl From<crate::engine::FinishReason> for FinishReasonOut {
    fn from(r: crate::engine::FinishReason) -> Self {
        match r {
            crate::engine::FinishReason::Stop => Self::Stop,
            crate::engine::FinishReason::Length => Self::Length,
        }
    }
}

/// `POST /v1/chat/completions` without `stream`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReasonOut>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssistantMessage {
    /// `assistant`
    pub role: &'static str,
    /// `null` when the reply is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call the model made; `arguments` is JSON text.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    /// `function`
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

/// A piece of a call in a stream: the first carries `id`, `type` and the whole name with
/// `arguments: ""`; later ones carry argument text only.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One `data:` object of a chat stream (`chat.completion.chunk`); the last one, when
/// `stream_options.include_usage` is set, has no choices and the usage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReasonOut>,
}

/// What a chat chunk adds: the role (first chunk only) and a piece of content; `{}` in the
/// chunk that carries only a `finish_reason`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// `POST /v1/completions` (`text_completion`), whole or as one stream chunk; a stream's usage
/// chunk has no choices.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Completion {
    pub id: String,
    /// `text_completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReasonOut>,
}

/// Chat `logprobs`: one entry per generated token.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// Legacy completions `logprobs`: parallel arrays, one entry per token.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f64>>,
    pub text_offset: Vec<usize>,
}

/// OpenAI's error object, and the `{"error": ...}` around it (a response body, or a stream
/// event).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Version {
    pub version: &'static str,
    /// The CPU kernel path in use (`avx512`, `avxvnni`, `avx2`, `portable`).
    pub cpu_kernels: &'static str,
    /// The CPU's SIMD features the kernels look for.
    pub cpu_flags: Vec<&'static str>,
    /// Threads of the compute pool (`--threads`).
    pub cpu_threads: usize,
}

/// `GET /stats`: each model's engine snapshot.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub models: Vec<ModelStats>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelStats {
    pub model: String,
    pub engine: crate::engine::EngineStats,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DetokenizeResponse {
    pub prompt: String,
}
