//! `ApiError`: every failure the HTTP layer reports, mapped to a status with one exhaustive
//! `match` and always rendered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::{ErrorBody, ErrorResponse};
use crate::engine::{ContextExceeded, EngineError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// JSON of the wrong shape (missing field, wrong type); `param` is the field's path.
    #[error("{message}")]
    InvalidBody { param: String, message: String },
    /// A parameter out of range or inconsistent; `param` names the field.
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    /// The request does not fit the context; `message` says which part overflows, by how much.
    #[error("{message}")]
    ContextLength {
        param: &'static str,
        message: String,
    },
    #[error("Incorrect or missing API key: send `Authorization: Bearer <key>`.")]
    Unauthorized,
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("Unknown route {0}")]
    RouteNotFound(String),
    #[error("Method not allowed: {0}")]
    MethodNotAllowed(String),
    #[error("The server is overloaded: {0}")]
    Overloaded(String),
    #[error("Internal error: {0}")]
    Internal(String),
    /// The server holds its limit of open connections (answered by the accept loop).
    #[error("The server is at its limit of {0} open connections; retry later.")]
    TooManyConnections(usize),
    /// The request's headers are too many or too long.
    #[error("Request header fields too large: {0}")]
    HeadersTooLarge(String),
    /// The server is up but its models are still loading (`/ready` answers 503 meanwhile).
    #[error("The model is still loading; retry shortly.")]
    Loading,
    /// The server is stopping and the grace for in-flight requests is over.
    #[error("The server is shutting down; retry on another replica or later.")]
    ShuttingDown,
    /// A request head did not arrive within the header-read deadline (the connection closes).
    #[error("The request headers did not arrive within {0} s; the connection is closed.")]
    HeaderTimeout(u64),
    /// The bytes were not an HTTP/1.1 request (answered for hyper, which parses them).
    #[error("The request is not valid HTTP/1.1: {0}")]
    BadHttp(String),
    /// A JSON route got a body declared as something else.
    #[error("Content-Type must be application/json, got `{0}`")]
    UnsupportedMediaType(String),
}

impl ApiError {
    pub fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParam {
            param,
            message: message.into(),
        }
    }

    /// A request over the context, its `param` the prompt's field (`prompt` or `messages`)
    /// when the prompt alone is too long, else `max_tokens`.
    pub fn context(e: ContextExceeded, prompt_field: &'static str) -> Self {
        let param = match e {
            ContextExceeded::Prompt { .. } => prompt_field,
            ContextExceeded::Completion { .. } => "max_tokens",
        };
        Self::ContextLength {
            param,
            message: e.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::BadHttp(_)
            | Self::InvalidBody { .. }
            | Self::InvalidParam { .. }
            | Self::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::HeaderTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded(_)
            | Self::Loading
            | Self::ShuttingDown
            | Self::TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object (without the outer `{"error": ...}`).
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::MalformedJson(_) | Self::PayloadTooLarge(_) | Self::BadHttp(_) => {
                ("invalid_request_error", None, None)
            }
            Self::UnsupportedMediaType(_) => (
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            Self::HeaderTimeout(_) => ("invalid_request_error", None, Some("request_timeout")),
            Self::HeadersTooLarge(_) => (
                "invalid_request_error",
                None,
                Some("request_header_fields_too_large"),
            ),
            Self::InvalidBody { param, .. } => {
                ("invalid_request_error", Some(param.as_str()), None)
            }
            Self::InvalidParam { param, .. } => ("invalid_request_error", Some(*param), None),
            Self::ContextLength { param, .. } => (
                "invalid_request_error",
                Some(*param),
                Some("context_length_exceeded"),
            ),
            Self::Unauthorized => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::RouteNotFound(_) => ("invalid_request_error", None, Some("unknown_url")),
            Self::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            Self::Overloaded(_) => ("server_error", None, Some("overloaded")),
            Self::Loading => ("server_error", None, Some("model_loading")),
            Self::ShuttingDown => ("server_error", None, Some("shutting_down")),
            Self::TooManyConnections(_) => ("server_error", None, Some("too_many_connections")),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody {
            message: self.to_string(),
            kind,
            param: param.map(str::to_string),
            code,
        }
    }

    /// The whole error document, `{"error": {...}}`.
    pub fn response(&self) -> ErrorResponse {
        ErrorResponse { error: self.body() }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull { .. } => Self::Overloaded(e.to_string()),
            EngineError::ContextTooLong(c) => Self::context(c, "prompt"),
            EngineError::Stopped => Self::Overloaded(e.to_string()),
            EngineError::Grammar { field, message } => Self::param(field, message),
            EngineError::Model(_) | EngineError::Tokenizer(_) => Self::Internal(e.to_string()),
        }
    }
}

/// Log a request turned away for overload: at most one WARN line a second, with how many were
/// turned away since the last one (a burst must not flood the log), and count it.
fn log_rejection(error: &ApiError) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    crate::telemetry::request_rejected("overloaded");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_SECOND.load(Relaxed);
    if now > last
        && LAST_SECOND
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    {
        let rejected = SINCE.swap(0, Relaxed) + 1;
        tracing::warn!(rejected, "{error}");
    } else {
        SINCE.fetch_add(1, Relaxed);
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Overloaded(_) => log_rejection(&self),
            Self::Internal(_) => {
                tracing::error!(status = status.as_u16(), error = %self, "request failed")
            }
            _ => tracing::debug!(status = status.as_u16(), error = %self, "request rejected"),
        }
        let mut resp = (status, Json(self.response())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_openai_shape_and_status() {
        let cases = [
            (ApiError::MalformedJson("x".into()), 400),
            (
                ApiError::InvalidBody {
                    param: "n".into(),
                    message: "x".into(),
                },
                400,
            ),
            (ApiError::param("temperature", "bad"), 400),
            (ApiError::ModelNotFound("m".into()), 404),
            (ApiError::Unauthorized, 401),
            (
                EngineError::QueueFull {
                    running: 2,
                    waiting: 3,
                }
                .into(),
                503,
            ),
            (
                EngineError::ContextTooLong(crate::engine::ContextExceeded::Completion {
                    prompt_tokens: 4,
                    max_tokens: 5,
                    max_model_len: 8,
                })
                .into(),
                400,
            ),
            (ApiError::Internal("x".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            let b = serde_json::to_value(e.response()).unwrap()["error"].clone();
            for k in ["message", "type", "param", "code"] {
                assert!(b.get(k).is_some(), "{k} missing in {b}");
            }
        }
        assert_eq!(
            ApiError::param("top_p", "x").body().param.as_deref(),
            Some("top_p")
        );
    }
}
