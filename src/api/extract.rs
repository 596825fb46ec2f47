//! [`OpenAiJson`], the one way handlers read a JSON body. A body not declared as
//! `application/json` is a 415; a body over the size limit is a 413;
//! malformed JSON, a body that is not an object, a missing field or one of the wrong type are
//! 400s in OpenAI's shape naming the field (`temperature: invalid type: string "hot", expected
//! f64`, `param: "temperature"`). Unknown fields are ignored, as OpenAI does.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::structured::StructuredParams;
use super::types::CommonParams;
use super::MAX_BODY_BYTES;

/// A request body parsed into `T`.
pub struct OpenAiJson<T>(pub T);

/// What a JSON body can be parsed into.
pub trait FromJsonBody: Sized {
    fn from_json(v: &Value) -> Result<Self, ApiError>;
}

impl<T: DeserializeOwned> FromJsonBody for T {
    fn from_json(v: &Value) -> Result<Self, ApiError> {
        parse(v)
    }
}

/// An endpoint's own fields and the parameters chat and completions share, read from the same
/// object. (Two passes rather than `#[serde(flatten)]`: through a flattened struct serde
/// loses the path, and a wrong type would not name its field.)
pub struct WithParams<T> {
    pub request: T,
    pub params: CommonParams,
    /// `response_format`, `structured_outputs`, `guided_*`.
    pub structured: StructuredParams,
}

impl<T: DeserializeOwned> FromJsonBody for WithParams<T> {
    fn from_json(v: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            request: parse(v)?,
            params: parse(v)?,
            structured: parse(v)?,
        })
    }
}

impl<S: Send + Sync, T: FromJsonBody> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A browser may send a `text/plain` POST to localhost from any page without a CORS
        // preflight; requiring JSON's type keeps such "simple requests" from spending compute.
        let ctype = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        if !is_json(&ctype) {
            return Err(ApiError::UnsupportedMediaType(ctype));
        }
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("the body exceeds {MAX_BODY_BYTES} bytes"))
            } else {
                ApiError::MalformedJson(e.body_text())
            }
        })?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::MalformedJson(
                "the body must be a JSON object".into(),
            ));
        }
        T::from_json(&v).map(OpenAiJson)
    }
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Parse a JSON value, naming the field of a shape error.
fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.inner().to_string();
        // A missing field is reported at the parent's path; name the field itself.
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        let param = match (e.path().to_string(), missing) {
            (p, Some(f)) if p == "." => f.to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p,
        };
        ApiError::InvalidBody {
            message: format!("{param}: {inner}"),
            param,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn only_json_content_types_are_json() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("application/jsonx"));
    }
}
