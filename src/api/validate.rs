//! Request validation: OpenAI parameters → engine-neutral settings. Every rejection names the
//! field, the allowed range and the value received.

use super::error::ApiError;
use super::types::{CommonParams, StopSpec};
use crate::engine::{GenerationRequest, SamplingParams};

/// Most choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 64;

#[derive(Debug, Clone)]
pub struct Validated {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn common(p: &CommonParams) -> Result<Validated, ApiError> {
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::param(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k must be -1 or 0 (disabled) or at least 1, got {k}"),
            ))
        }
    };
    let (field, max_tokens) = match (p.max_completion_tokens, p.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 => Some(m as usize),
        Some(m) => {
            return Err(ApiError::param(
                field,
                format!("{field} must be at least 1, got {m}"),
            ))
        }
    };
    let n = p.n.unwrap_or(1);
    if !(1..=MAX_CHOICES as i64).contains(&n) {
        return Err(ApiError::param(
            "n",
            format!("n must be in [1, {MAX_CHOICES}], got {n}"),
        ));
    }
    let stream = p.stream.unwrap_or(false);
    if p.stream_options.is_some() && !stream {
        return Err(ApiError::param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    Ok(Validated {
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: p.seed.map(|s| s as u64),
        },
        max_tokens,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids: p.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: p.ignore_eos.unwrap_or(false),
        skip_special_tokens: p.skip_special_tokens.unwrap_or(true),
        n: n as usize,
        stream,
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Check the prompt against the context and build the engine request. Without `max_tokens`,
/// a request may use the rest of the context.
pub fn generation_request(
    v: &Validated,
    prompt_ids: Vec<u32>,
    max_model_len: usize,
    prompt_field: &'static str,
    vocab_size: usize,
) -> Result<GenerationRequest, ApiError> {
    let n_prompt = prompt_ids.len();
    if n_prompt == 0 {
        return Err(ApiError::param(
            prompt_field,
            format!("{prompt_field} must not be empty"),
        ));
    }
    if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(ApiError::param(
            prompt_field,
            format!("token id {bad} is out of range for a vocabulary of {vocab_size}"),
        ));
    }
    if n_prompt >= max_model_len {
        return Err(ApiError::ContextLength {
            param: prompt_field,
            message: format!(
                "this model's maximum context length is {max_model_len} tokens, and the {prompt_field} has {n_prompt} tokens"
            ),
        });
    }
    let max_tokens = match v.max_tokens {
        Some(m) if n_prompt + m > max_model_len => {
            return Err(ApiError::ContextLength {
                param: "max_tokens",
                message: format!(
                    "this model's maximum context length is {max_model_len} tokens, but {} were requested ({n_prompt} in the {prompt_field}, {m} for the completion)",
                    n_prompt + m
                ),
            })
        }
        Some(m) => m,
        None => max_model_len - n_prompt,
    };
    Ok(GenerationRequest {
        prompt_ids,
        sampling: v.sampling.clone(),
        max_tokens,
        stop: v.stop.clone(),
        stop_token_ids: v.stop_token_ids.clone(),
        ignore_eos: v.ignore_eos,
        skip_special_tokens: v.skip_special_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap()
    }

    fn err(json: &str) -> String {
        common(&params(json)).unwrap_err().to_string()
    }

    #[test]
    fn range_errors_name_field_bound_and_value() {
        assert_eq!(
            err(r#"{"temperature": 3.5}"#),
            "temperature must be in [0, 2], got 3.5"
        );
        assert_eq!(
            err(r#"{"temperature": -1}"#),
            "temperature must be in [0, 2], got -1"
        );
        assert_eq!(err(r#"{"top_p": 2}"#), "top_p must be in (0, 1], got 2");
        assert_eq!(err(r#"{"top_p": 0}"#), "top_p must be in (0, 1], got 0");
        assert_eq!(
            err(r#"{"max_tokens": 0}"#),
            "max_tokens must be at least 1, got 0"
        );
        assert_eq!(
            err(r#"{"top_k": -3}"#),
            "top_k must be -1 or 0 (disabled) or at least 1, got -3"
        );
        assert_eq!(err(r#"{"n": 0}"#), "n must be in [1, 64], got 0");
        assert_eq!(
            err(r#"{"stream_options": {"include_usage": true}}"#),
            "stream_options is only allowed when stream is true"
        );
    }

    #[test]
    fn defaults_and_conversions() {
        let v = common(&params(
            r#"{"stop": "x", "max_completion_tokens": 5, "max_tokens": 9, "top_k": -1}"#,
        ))
        .unwrap();
        assert_eq!(v.stop, vec!["x"]);
        assert_eq!(v.max_tokens, Some(5));
        assert_eq!(v.sampling.top_k, None);
        assert_eq!(v.sampling.temperature, 1.0);
        assert!(v.skip_special_tokens);
    }

    #[test]
    fn context_checks() {
        let v = common(&params(r#"{"max_tokens": 5}"#)).unwrap();
        assert!(generation_request(&v, vec![1; 10], 16, "prompt", 100).is_ok());
        let e = generation_request(&v, vec![1; 12], 16, "prompt", 100).unwrap_err();
        assert!(e.to_string().contains("17 were requested"), "{e}");
        let e = generation_request(&v, vec![1; 16], 16, "prompt", 100).unwrap_err();
        assert!(matches!(e, ApiError::ContextLength { .. }));
        let e = generation_request(&v, vec![100], 16, "prompt", 100).unwrap_err();
        assert!(e.to_string().contains("out of range"));
        let v = common(&params("{}")).unwrap();
        assert_eq!(
            generation_request(&v, vec![1; 10], 16, "prompt", 100)
                .unwrap()
                .max_tokens,
            6
        );
    }
}
