//! The OpenAI-compatible HTTP API: routes, wire types, validation, SSE and errors. The only
//! module that knows OpenAI's shapes; it talks to engines through [`EngineHandle`]s.

pub mod error;
pub mod extract;
pub mod handlers;
pub mod logprobs;
pub mod middleware;
pub mod sse;
pub mod structured;
pub mod tokenize;
pub mod tools;
pub mod types;
pub mod ui;
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
    /// How its chat template writes tool calls, if it does.
    pub tool_format: Option<tools::ToolFormat>,
    /// Its grammar compiler (structured output, tool calls).
    pub grammars: structured::Grammars,
}

impl ServedModel {
    pub fn new(
        name: String,
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
    ) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tool_format = tokenizer.chat_template().and_then(|t| {
            tools::ToolFormat::of_template(
                |s| t.source().contains(s),
                |s| tokenizer.special_token_id(s),
            )
        });
        Self {
            grammars: structured::Grammars::new(tokenizer.clone(), vocab_size),
            name,
            engine,
            tokenizer,
            vocab_size,
            created,
            tool_format,
        }
    }

    /// Tokenize `text` (the request's `field`), refusing first, without tokenizing, a text too
    /// long to fit the context whatever its tokens: tokenizing tens of megabytes costs a minute
    /// of CPU to reach the same 400.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        field: &'static str,
    ) -> Result<Vec<u32>, ApiError> {
        let max_model_len = self.engine.limits().max_model_len;
        if let Some(max) = self.tokenizer.max_text_bytes(max_model_len) {
            if text.len() > max {
                return Err(ApiError::ContextLength {
                    param: field,
                    message: format!(
                        "the {field} is too long: {} bytes of text cannot fit this model's context of {max_model_len} tokens (at most {max} bytes)",
                        text.len()
                    ),
                });
            }
        }
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// A chat's prompt text: `messages` laid out for the model's tool format with the checked
    /// `tools`, rendered through its chat template. Blocking (run it in a [`tokenizer_job`]).
    pub fn render_chat(
        &self,
        messages: Vec<crate::tokenizer::ChatMessage>,
        tools: &tools::Tools,
        add_generation_prompt: bool,
    ) -> Result<String, ApiError> {
        let template = self.tokenizer.chat_template().ok_or_else(|| {
            ApiError::param(
                "messages",
                "this model has no chat template; send a prompt to /v1/completions",
            )
        })?;
        let messages = tools::prepare_messages(self.tool_format, tools, messages);
        template
            .render_with_tools(
                &messages,
                tools.for_template.as_deref(),
                add_generation_prompt,
            )
            .map_err(|e| ApiError::param("messages", e.to_string()))
    }
}

/// Run template rendering and tokenization off the async threads, at most one job per core at
/// a time: a flood of huge prompts queues here instead of starving generation and the other
/// requests. The permit travels with the job, so a client that leaves mid-job still holds its
/// slot until the job ends.
pub async fn tokenizer_job<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    static PERMITS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(tokio::sync::Semaphore::new(cores))
    });
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let out = job();
        drop(permit);
        out
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
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
    /// Set when the shutdown grace is over: in-flight requests end at once (streams with an
    /// error event and `[DONE]`, the others with a 503).
    pub stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Browser origins answered CORS preflights (`*`: any); empty: none.
    pub allowed_origins: Arc<[String]>,
    /// Set from the shutdown signal on: `/ready` answers 503 so balancers and Kubernetes stop
    /// sending new requests, while those that still arrive are served as usual.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
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
    ("get", "/"),
    ("get", "/ui/app.js"),
    ("get", "/ui/app.css"),
    ("get", "/health"),
    ("get", "/ready"),
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
    let cors = cors(&state.allowed_origins);
    let router = Router::new()
        .route("/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
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
        .layer(axum::middleware::from_fn(middleware::header_limits))
        .layer(axum::middleware::from_fn(middleware::request_id))
        // Failures are logged where they are made (ApiError), once and at their level.
        .layer(TraceLayer::new_for_http().on_failure(()));
    // Outermost, so a preflight (which carries no API key) is answered before the key check.
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// The routes served while the models load: `/health` answers 200 (the process is alive, so
/// a liveness probe must not restart it), `/ready` and every other route 503 (`model_loading`,
/// with `Retry-After`), `/version` as usual.
pub fn loading_router() -> Router {
    Router::new()
        .route("/health", get(handlers::health_loading))
        .route("/ready", get(handlers::ready_loading))
        .route("/version", get(tokenize::version))
        .fallback(handlers::loading)
        .layer(axum::middleware::from_fn(middleware::request_id))
        .layer(TraceLayer::new_for_http().on_failure(()))
}

/// A CORS layer for `origins`, or none: then no preflight is answered and browsers refuse
/// cross-origin calls.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
            ])
            .expose_headers([axum::http::HeaderName::from_static("x-request-id")]),
    )
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
