//! Cross-cutting HTTP layers: request ids (`x-request-id`, echoed when the client sends one)
//! and the API key check on every route but the open ones.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, RequestId};

const REQUEST_ID: &str = "x-request-id";

/// A client's id is kept when it is a reasonable header token; otherwise one is generated.
fn usable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| usable(s))
        .map(String::from)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The most header bytes (names and values) a request may carry. hyper refuses far larger
/// heads itself (over ~400 KB, or more than [`crate::server::MAX_HEADERS`] fields) with a
/// body-less 431; below that, this limit answers in OpenAI's shape.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// The most header fields a request may carry (see [`MAX_HEADER_BYTES`]).
pub const MAX_HEADER_FIELDS: usize = 64;

/// Refuse requests whose headers are too many or too large with a 431 in OpenAI's shape.
pub async fn header_limits(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADER_FIELDS || bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!(
            "{} fields of {bytes} bytes (at most {MAX_HEADER_FIELDS} fields, {MAX_HEADER_BYTES} bytes)",
            headers.len()
        ))
        .into_response();
    }
    next.run(req).await
}

/// Routes that hold no data and stay open with `--api-key` (and the page's, [`super::ui::ROUTES`]).
pub const OPEN_ROUTES: &[&str] = &["/health", "/ready", "/version"];

fn open(path: &str) -> bool {
    OPEN_ROUTES.contains(&path) || super::ui::ROUTES.contains(&path)
}

/// With `--api-key`, every request except to [`OPEN_ROUTES`] must carry
/// `Authorization: Bearer <key>` (`/metrics`, `/stats` and the tokenizer routes included).
pub async fn api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = state.api_key.as_deref() {
        if !open(req.uri().path()) {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                return ApiError::Unauthorized.into_response();
            }
        }
    }
    next.run(req).await
}

/// Compare without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_key_comparison() {
        assert!(usable("abc-123"));
        assert!(!usable(""));
        assert!(!usable("has space"));
        assert!(!usable(&"x".repeat(200)));
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
