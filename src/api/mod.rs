//! The OpenAI-compatible HTTP API: routes, wire types, validation, SSE and errors. The only
//! module that knows OpenAI's shapes; it talks to engines through [`EngineHandle`]s.

pub mod error;
pub mod extract;
pub mod handlers;
pub mod logprobs;
pub mod middleware;
pub mod sse;
pub mod tokenize;
pub mod types;
pub mod validate;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::engine::{EngineHandle, EngineThread};
use crate::tokenizer::Tokenizer;
pub use error::ApiError;

/// One model as the API serves it.
pub struct ServedModel {
    pub name: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub vocab_size: usize,
    pub created: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<Vec<Arc<ServedModel>>>,
    /// Required as `Authorization: Bearer <key>` on `/v1/*` when set.
    pub api_key: Option<Arc<str>>,
    /// Renders `/metrics` (`None` when another metrics recorder owns the process).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The models' engine threads, taken by `serve` to join them once the server has stopped.
    pub engines: Arc<std::sync::Mutex<Vec<EngineThread>>>,
}

/// The id of one HTTP request (`x-request-id`), set by [`middleware::request_id`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl AppState {
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// The named model, or the first one when no name is given.
    pub fn model_or_default(&self, name: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
        match name {
            Some(n) => self.model(n),
            None => self
                .models
                .first()
                .cloned()
                .ok_or_else(|| ApiError::ModelNotFound(String::new())),
        }
    }
}

/// Largest request body accepted (long prompts are welcome; unbounded bodies are not).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Every route, as `openapi.yaml` must describe it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/version"),
    ("get", "/stats"),
    ("get", "/metrics"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
    ("get", "/v1/models"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/version", get(tokenize::version))
        .route("/stats", get(handlers::stats))
        .route("/metrics", get(handlers::metrics))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::api_key,
        ))
        .layer(axum::middleware::from_fn(middleware::request_id))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::ROUTES;

    /// `openapi.yaml` lists exactly the routes the router serves, each under its method.
    #[test]
    fn openapi_spec_describes_every_route() {
        let spec =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
        let mut documented = Vec::new();
        let mut path = None;
        for line in spec.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if !line.starts_with("    ") {
                if !line.starts_with("  ") {
                    path = None;
                }
            } else if let (Some(p), Some(m)) = (
                &path,
                line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
            ) {
                if ["get", "post", "put", "delete"].contains(&m) {
                    documented.push((m.to_string(), p.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
