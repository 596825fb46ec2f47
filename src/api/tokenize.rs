//! vLLM's `/tokenize` and `/detokenize`, and `/version`.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::extract::OpenAiJson;
use super::handlers::chat_messages;
use super::tools::{ToolParams, Tools};
use super::types::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, Version,
};
use super::{tokenizer_job, AppState};

pub async fn tokenize(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let model = state.model_or_default(req.model.as_deref())?;
    let m = model.clone();
    // With `tools`, the chat is laid out and rendered exactly as /v1/chat/completions would.
    let tools = match (&req.messages, req.tools, req.tool_choice) {
        (None, None, None) => Tools::default(),
        (None, ..) => {
            return Err(ApiError::param(
                "tools",
                "tools go with messages, not prompt",
            ))
        }
        (Some(_), tools, tool_choice) => ToolParams {
            tools,
            tool_choice,
            parallel_tool_calls: None,
        }
        .check(model.tool_format)?,
    };
    let tokens = tokenizer_job(move || match (req.prompt, req.messages) {
        (Some(p), None) => m.encode(&p, req.add_special_tokens.unwrap_or(true), "prompt"),
        (None, Some(msgs)) => {
            let text = m.render_chat(
                chat_messages(msgs)?,
                &tools,
                req.add_generation_prompt.unwrap_or(true),
            )?;
            m.encode(&text, req.add_special_tokens.unwrap_or(false), "messages")
        }
        _ => Err(ApiError::param(
            "prompt",
            "give exactly one of prompt or messages",
        )),
    })
    .await?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.engine.limits().max_model_len,
        tokens,
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let model = state.model_or_default(req.model.as_deref())?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= model.vocab_size) {
        return Err(ApiError::param(
            "tokens",
            format!(
                "token id {bad} is out of range for a vocabulary of {}",
                model.vocab_size
            ),
        ));
    }
    let text = model
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt: text }))
}

pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION"),
        cpu_kernels: crate::models::layers::simd::KernelPath::active().name(),
        cpu_flags: crate::models::layers::simd::cpu_flags(),
        cpu_threads: crate::models::layers::pool::threads(),
    })
}
