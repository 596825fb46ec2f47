//! HTTP handlers: parse and validate, render and tokenize off the async threads, submit one
//! engine request per choice, then answer as one JSON body or as an SSE stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, select_all, BoxStream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::error::ApiError;
use super::extract::{OpenAiJson, WithParams};
use super::sse::{
    aggregate_chat, aggregate_completion, ChunkBuilder, Kind, StreamChunk, StreamSpec, ToolStream,
};
use super::tools::ToolParams;
use super::types::*;
use super::validate::{self, Endpoint, Validated, MAX_CHOICES};
use super::{tokenizer_job, AppState, RequestId, ServedModel};
use crate::engine::guide::Guide;
use crate::engine::{EngineEvent, GenerationRequest};
use crate::tokenizer::ChatMessage;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Liveness: the process answers. 200 from the moment it listens until it exits.
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 while new requests are welcome; 503 from the shutdown signal on, so a
/// balancer's health check takes the replica out before it stops listening.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        not_ready("draining")
    } else {
        Json(Health { status: "ready" }).into_response()
    }
}

fn not_ready(status: &'static str) -> Response {
    let mut resp = (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Json(Health { status }),
    )
        .into_response();
    resp.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from_static("1"),
    );
    resp
}

/// `/health` while the models load: alive.
pub async fn health_loading() -> Json<Health> {
    Json(Health { status: "loading" })
}

/// `/ready` while the models load: not yet.
pub async fn ready_loading() -> Response {
    not_ready("loading")
}

/// Every other route while the models load.
pub async fn loading() -> ApiError {
    ApiError::Loading
}

pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .models
            .iter()
            .map(|m| ModelCard {
                id: m.name.clone(),
                object: "model",
                created: m.created,
                owned_by: "inferd",
                max_model_len: m.engine.limits().max_model_len,
            })
            .collect(),
    })
}

/// Engine counters per model (running/waiting sequences, free KV blocks, ...).
pub async fn stats(State(state): State<AppState>) -> Json<Stats> {
    let models = state
        .models
        .iter()
        .map(|m| ModelStats {
            model: m.name.clone(),
            engine: m.engine.stats(),
        })
        .collect();
    Json(Stats { models })
}

/// Prometheus exposition, vLLM's metric names.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return ApiError::RouteNotFound("/metrics (no metrics recorder)".into()).into_response();
    };
    for m in state.models.iter() {
        crate::telemetry::publish_engine(&m.name, &m.engine.stats());
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response()
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} {}", uri.path()))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    OpenAiJson(body): OpenAiJson<WithParams<ChatCompletionRequest>>,
) -> Result<Response, ApiError> {
    let req = body.request;
    let params = validate::common(&body.params, Endpoint::Chat)?;
    let model = state.model(&req.model)?;
    let tools = ToolParams {
        tools: req.tools,
        tool_choice: req.tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
    }
    .check(model.tool_format)?;
    let output = body.structured.constraint()?;
    if let (Some(_), Some(c)) = (&tools.plan, &output) {
        return Err(ApiError::param(
            c.field,
            format!(
                "{} cannot be combined with tool calls; send tool_choice `none` or drop it",
                c.field
            ),
        ));
    }
    let tool_stream = tools.plan.as_ref().map(|p| ToolStream {
        format: p.format,
        names: p.functions.iter().map(|f| f.name.clone()).collect(),
        finish_as_tool_calls: p.finish_as_tool_calls(),
    });
    let constraint = tools.plan.as_ref().map(|p| p.constraint()).or(output);
    let messages = chat_messages(req.messages)?;
    let m = model.clone();
    let (prompt, guide) = tokenizer_job(move || {
        let text = m.render_chat(messages, &tools, true)?;
        let prompt = m.encode(&text, false, "messages")?;
        let guide = constraint.map(|c| m.grammars.compile(&c)).transpose()?;
        Ok((prompt, guide))
    })
    .await?;
    let job = Job {
        kind: Kind::Chat,
        prompts: vec![prompt],
        echo: Vec::new(),
        prompt_field: "messages",
        params,
        request_id,
        stop: stopped(&state),
        guide,
        tools: tool_stream,
    };
    generate(&model, job).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    OpenAiJson(body): OpenAiJson<WithParams<CompletionRequest>>,
) -> Result<Response, ApiError> {
    let req = body.request;
    let params = validate::common(&body.params, Endpoint::Completion)?;
    let model = state.model(&req.model)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "suffix is not supported"));
    }
    let prompts = match req.prompt {
        PromptInput::Text(t) => Prompts::Texts(vec![t]),
        PromptInput::Texts(t) => Prompts::Texts(t),
        PromptInput::Tokens(t) => Prompts::Ids(vec![t]),
        PromptInput::TokenLists(t) => Prompts::Ids(t),
    };
    let count = match &prompts {
        Prompts::Texts(t) => t.len(),
        Prompts::Ids(t) => t.len(),
    };
    if count == 0 {
        return Err(ApiError::param("prompt", "prompt must not be empty"));
    }
    if count * params.n > MAX_CHOICES {
        return Err(ApiError::param(
            "prompt",
            format!(
                "at most {MAX_CHOICES} choices (prompts × n) per request, got {}",
                count * params.n
            ),
        ));
    }
    let constraint = body.structured.constraint()?;
    let m = model.clone();
    let echo = params.echo;
    let (prompts, echo, guide) = tokenizer_job(move || {
        let guide = constraint.map(|c| m.grammars.compile(&c)).transpose()?;
        let (prompts, echo) = match prompts {
            Prompts::Ids(ids) => {
                let texts = if echo {
                    let decode = |p: &Vec<u32>| m.tokenizer.decode(p, false);
                    ids.iter()
                        .map(|p| decode(p).map_err(|e| ApiError::Internal(e.to_string())))
                        .collect::<Result<_, _>>()?
                } else {
                    Vec::new()
                };
                (ids, texts)
            }
            Prompts::Texts(texts) => {
                let ids = texts
                    .iter()
                    .map(|t| m.encode(t, true, "prompt"))
                    .collect::<Result<Vec<_>, _>>()?;
                (ids, if echo { texts } else { Vec::new() })
            }
        };
        Ok((prompts, echo, guide))
    })
    .await?;
    let job = Job {
        kind: Kind::Completion,
        prompts,
        echo,
        prompt_field: "prompt",
        params,
        request_id,
        stop: stopped(&state),
        guide,
        tools: None,
    };
    generate(&model, job).await
}

enum Prompts {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

pub fn chat_messages(msgs: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect()
}

/// One message as templates see it: text parts joined, the `developer` role as `system`,
/// call arguments parsed from their JSON string (templates write them with `tojson`; a
/// string would be encoded twice).
fn chat_message(i: usize, m: ChatMessageIn) -> Result<ChatMessage, ApiError> {
    if !matches!(
        m.role.as_str(),
        "system" | "developer" | "user" | "assistant" | "tool"
    ) {
        return Err(ApiError::param(
            "messages",
            format!(
                "messages[{i}].role must be one of system, developer, user, assistant, tool; got `{}`",
                m.role
            ),
        ));
    }
    let content = match m.content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t,
        Some(MessageContent::Parts(parts)) => {
            let mut s = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => s.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::param(
                            "messages",
                            format!("messages[{i}].content: parts of type `{kind}` are not supported (only text)"),
                        ))
                    }
                }
            }
            s
        }
    };
    let tool_calls = match m.tool_calls {
        Some(calls) if m.role == "assistant" => Some(
            calls
                .into_iter()
                .enumerate()
                .map(|(j, c)| {
                    let arguments = match c.function.arguments {
                        serde_json::Value::String(s) if s.trim().is_empty() => serde_json::json!({}),
                        serde_json::Value::String(s) => serde_json::from_str(&s).map_err(|e| {
                            ApiError::param(
                                "messages",
                                format!("messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"),
                            )
                        })?,
                        serde_json::Value::Null => serde_json::json!({}),
                        v @ serde_json::Value::Object(_) => v,
                        _ => {
                            return Err(ApiError::param(
                                "messages",
                                format!("messages[{i}].tool_calls[{j}].function.arguments must be a JSON string or an object"),
                            ))
                        }
                    };
                    let mut call = serde_json::json!({
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": arguments},
                    });
                    if let Some(id) = c.id {
                        call["id"] = id.into();
                    }
                    Ok(call)
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
        ),
        Some(_) => {
            return Err(ApiError::param(
                "messages",
                format!("messages[{i}].tool_calls is only allowed on assistant messages"),
            ))
        }
        None => None,
    };
    // The OpenAI `developer` role is the system role for open models' templates.
    let role = if m.role == "developer" {
        "system".into()
    } else {
        m.role
    };
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: m.name,
        tools: None,
        metadata: None,
    })
}

type ChoiceStream = BoxStream<'static, (usize, EngineEvent)>;

/// One accepted request, ready to submit.
struct Job {
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    /// Completions with `echo`: each prompt's text.
    echo: Vec<String>,
    prompt_field: &'static str,
    params: Validated,
    request_id: RequestId,
    /// Resolves when the shutdown grace is over.
    stop: Stopped,
    /// The grammar every choice follows (each gets its own matcher).
    guide: Option<Guide>,
    /// Chat with tools: parse calls out of the text.
    tools: Option<ToolStream>,
}

type Stopped = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Resolves once the server's shutdown grace is over (never, if the server is dropped first).
fn stopped(state: &AppState) -> Stopped {
    let mut rx = state.stop.subscribe();
    Box::pin(async move {
        if rx.wait_for(|&s| s).await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

async fn generate(model: &Arc<ServedModel>, job: Job) -> Result<Response, ApiError> {
    let v = &job.params;
    let limits = model.engine.limits();
    let vocab = model.vocab_size;
    validate::check_token_ids(v, vocab)?;
    // Validate every choice before submitting any.
    let mut requests: Vec<GenerationRequest> = Vec::with_capacity(job.prompts.len() * v.n);
    for p in &job.prompts {
        let base = validate::generation_request(
            v,
            p.clone(),
            limits.max_model_len,
            job.prompt_field,
            vocab,
        )?;
        for k in 0..v.n {
            let mut r = base.clone();
            r.guide = job.guide.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(k as u64));
            requests.push(r);
        }
    }
    // Receivers dropped on an early return abort what was already submitted.
    let mut receivers: Vec<UnboundedReceiver<EngineEvent>> = Vec::with_capacity(requests.len());
    for r in requests {
        receivers.push(model.engine.submit(r)?);
    }
    let num_choices = receivers.len();
    let merged: ChoiceStream = select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        UnboundedReceiverStream::new(rx)
            .map(move |e| (i, e))
            .boxed()
    }))
    .boxed();
    let prefix = match job.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let tokenizer = model.tokenizer.clone();
    let mut builder = ChunkBuilder::new(StreamSpec {
        kind: job.kind,
        id: format!("{prefix}-{}", job.request_id.0),
        created: now_secs(),
        model: model.name.clone(),
        include_usage: v.include_usage,
        num_prompts: job.prompts.len(),
        n: v.n,
        echo: job.echo,
        token_bytes: Arc::new(move |id| tokenizer.token_bytes(id)),
        tools: job.tools,
    });
    let mut stop = job.stop;
    if v.stream {
        return Ok(sse_response(builder, merged, stop));
    }

    let mut chunks = builder.start();
    let mut merged = merged;
    loop {
        let next = tokio::select! {
            next = merged.next() => next,
            () = &mut stop => return Err(ApiError::ShuttingDown),
        };
        let Some((i, ev)) = next else {
            break;
        };
        if let EngineEvent::Error(e) = ev {
            return Err(e.into());
        }
        chunks.extend(builder.on_event(i, ev));
    }
    let spec = builder.spec();
    let (id, created, model) = (spec.id.clone(), spec.created, spec.model.clone());
    let usage = builder.usage();
    Ok(match job.kind {
        Kind::Chat => Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: aggregate_chat(num_choices, &chunks),
            usage,
        })
        .into_response(),
        Kind::Completion => Json(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices: aggregate_completion(num_choices, &chunks),
            usage: Some(usage),
        })
        .into_response(),
    })
}

/// A chunk as an SSE `data:` payload.
fn data(chunk: &StreamChunk) -> String {
    // Serialising these structs cannot fail (string keys, finite numbers); should it ever,
    // the client gets an error event rather than a panic.
    serde_json::to_string(chunk).unwrap_or_else(|e| {
        let err = ApiError::Internal(format!("serialising a chunk: {e}")).response();
        serde_json::to_string(&err).unwrap_or_default()
    })
}

struct SseState {
    builder: ChunkBuilder,
    events: ChoiceStream,
    queue: VecDeque<String>,
    ended: bool,
    stop: Stopped,
}

/// Drive the chunk state machine from the engine events. Dropping this stream (client gone)
/// drops the engine receivers, which aborts the sequences and frees their blocks.
/// When the shutdown grace is over, the stream ends with an error event and `[DONE]`.
fn sse_response(mut builder: ChunkBuilder, events: ChoiceStream, stop: Stopped) -> Response {
    let queue: VecDeque<String> = builder.start().iter().map(data).collect();
    let state = SseState {
        builder,
        events,
        queue,
        ended: false,
        stop,
    };
    let body = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), st));
            }
            if st.ended {
                return None;
            }
            let next = if st.builder.is_done() {
                None
            } else {
                tokio::select! {
                    next = st.events.next() => next,
                    () = &mut st.stop => {
                        let error = StreamChunk::Error(ApiError::ShuttingDown.response());
                        st.queue.push_back(data(&error));
                        st.queue.push_back("[DONE]".into());
                        st.ended = true;
                        continue;
                    }
                }
            };
            match next {
                Some((i, ev)) => st.queue.extend(st.builder.on_event(i, ev).iter().map(data)),
                None => {
                    st.queue.extend(st.builder.end().iter().map(data));
                    st.queue.push_back("[DONE]".into());
                    st.ended = true;
                }
            }
        }
    });
    let mut resp = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
