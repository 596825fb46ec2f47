//! Request validation: OpenAI parameters → engine-neutral settings. Every rejection names the
//! field, the allowed range and the value received.

use super::error::ApiError;
use super::types::{CommonParams, LogprobsParam, StopSpec};
use crate::engine::{fit_context, GenerationRequest, SamplingParams};

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
    pub echo: bool,
}

/// Which endpoint a request came through (some parameters differ in type between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Most alternatives per token that `logprobs` / `top_logprobs` may ask for.
pub const MAX_LOGPROBS: i64 = 20;

fn in_range(
    field: &'static str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    default: f64,
) -> Result<f64, ApiError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::param(
            field,
            format!("{field} must be in [{lo}, {hi}], got {v}"),
        ));
    }
    Ok(v)
}

/// Validate the parameters chat and completions share, one concern at a time.
pub fn common(p: &CommonParams, endpoint: Endpoint) -> Result<Validated, ApiError> {
    let (max_tokens, min_tokens) = lengths(p)?;
    let (n, stream, include_usage) = choices_and_streaming(p)?;
    let (logprobs, echo) = logprobs_and_echo(p, endpoint)?;
    let mut sampling = sampling(p)?;
    sampling.min_tokens = min_tokens;
    sampling.logprobs = logprobs;
    Ok(Validated {
        sampling,
        max_tokens,
        stop: stop_strings(p),
        stop_token_ids: p.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: p.ignore_eos.unwrap_or(false),
        skip_special_tokens: p.skip_special_tokens.unwrap_or(true),
        n,
        stream,
        include_usage,
        echo,
    })
}

/// How the next token is drawn: temperature, nucleus / top-k / min-p, penalties, logit bias.
fn sampling(p: &CommonParams) -> Result<SamplingParams, ApiError> {
    let temperature = in_range("temperature", p.temperature, 0.0, 2.0, 1.0)?;
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
    let min_p = in_range("min_p", p.min_p, 0.0, 1.0, 0.0)?;
    let presence_penalty = in_range("presence_penalty", p.presence_penalty, -2.0, 2.0, 0.0)?;
    let frequency_penalty = in_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::param(
            "repetition_penalty",
            format!("repetition_penalty must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        min_p: min_p as f32,
        seed: p.seed.map(|s| s as u64),
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        repetition_penalty: repetition_penalty as f32,
        logit_bias: logit_bias(p)?,
        ..SamplingParams::default()
    })
}

/// `logit_bias`: token id keys, values in [-100, 100], sorted by id.
fn logit_bias(p: &CommonParams) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut logit_bias = Vec::new();
    for (k, &v) in p.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::param(
                "logit_bias",
                format!("logit_bias keys must be token ids, got `{k}`"),
            )
        })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::param(
                "logit_bias",
                format!("logit_bias values must be in [-100, 100], got {v} for token {id}"),
            ));
        }
        logit_bias.push((id, v as f32));
    }
    logit_bias.sort_by_key(|x| x.0);
    Ok(logit_bias)
}

/// `max_completion_tokens` (else `max_tokens`), at least 1; `min_tokens` within it.
fn lengths(p: &CommonParams) -> Result<(Option<usize>, usize), ApiError> {
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
    let min_tokens = match p.min_tokens.unwrap_or(0) {
        m if m < 0 => {
            return Err(ApiError::param(
                "min_tokens",
                format!("min_tokens must be at least 0, got {m}"),
            ))
        }
        m if max_tokens.is_some_and(|x| m as usize > x) => {
            return Err(ApiError::param(
                "min_tokens",
                format!(
                    "min_tokens must be at most {field} ({}), got {m}",
                    max_tokens.unwrap_or(0)
                ),
            ))
        }
        m => m as usize,
    };
    Ok((max_tokens, min_tokens))
}

/// `n` in [1, 64]; `stream`, and `stream_options` only with it.
fn choices_and_streaming(p: &CommonParams) -> Result<(usize, bool, bool), ApiError> {
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
    let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok((n as usize, stream, include_usage))
}

/// `logprobs` in each endpoint's shape, and `echo` (completions only, not with logprobs).
fn logprobs_and_echo(
    p: &CommonParams,
    endpoint: Endpoint,
) -> Result<(Option<usize>, bool), ApiError> {
    let logprobs = logprobs(p, endpoint)?;
    let echo = p.echo.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(ApiError::param(
            "echo",
            "echo is only supported by /v1/completions",
        ));
    }
    if echo && logprobs.is_some() {
        return Err(ApiError::param(
            "echo",
            "echo together with logprobs is not supported",
        ));
    }
    Ok((logprobs, echo))
}

/// `stop` as a list, without empty strings.
fn stop_strings(p: &CommonParams) -> Vec<String> {
    let stop = match &p.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    stop.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Chat: `logprobs: bool` + `top_logprobs: 0..=20`; completions: `logprobs: 0..=20`.
fn logprobs(p: &CommonParams, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let range = |field: &'static str, k: i64| {
        if (0..=MAX_LOGPROBS).contains(&k) {
            Ok(k as usize)
        } else {
            Err(ApiError::param(
                field,
                format!("{field} must be in [0, {MAX_LOGPROBS}], got {k}"),
            ))
        }
    };
    match endpoint {
        Endpoint::Chat => {
            let on = match p.logprobs {
                None | Some(LogprobsParam::Flag(false)) => false,
                Some(LogprobsParam::Flag(true)) => true,
                Some(LogprobsParam::Count(_)) => {
                    return Err(ApiError::param(
                        "logprobs",
                        "logprobs must be a boolean for chat completions",
                    ))
                }
            };
            let top = p
                .top_logprobs
                .map(|k| range("top_logprobs", k))
                .transpose()?;
            match (on, top) {
                (false, Some(k)) if k > 0 => Err(ApiError::param(
                    "top_logprobs",
                    "top_logprobs requires logprobs to be true",
                )),
                (false, _) => Ok(None),
                (true, k) => Ok(Some(k.unwrap_or(0))),
            }
        }
        Endpoint::Completion => match p.logprobs {
            None => Ok(None),
            Some(LogprobsParam::Count(k)) => Ok(Some(range("logprobs", k)?)),
            Some(LogprobsParam::Flag(_)) => Err(ApiError::param(
                "logprobs",
                "logprobs must be an integer for completions",
            )),
        },
    }
}

/// Token ids a request names (`logit_bias`, `stop_token_ids`) must exist in the vocabulary.
pub fn check_token_ids(v: &Validated, vocab_size: usize) -> Result<(), ApiError> {
    if let Some(&(id, _)) = v
        .sampling
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= vocab_size)
    {
        return Err(ApiError::param(
            "logit_bias",
            format!("token id {id} is out of range for a vocabulary of {vocab_size}"),
        ));
    }
    if let Some(id) = v
        .stop_token_ids
        .iter()
        .find(|&&id| id as usize >= vocab_size)
    {
        return Err(ApiError::param(
            "stop_token_ids",
            format!("token id {id} is out of range for a vocabulary of {vocab_size}"),
        ));
    }
    Ok(())
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
    let max_tokens = fit_context(n_prompt, v.max_tokens, max_model_len)
        .map_err(|e| ApiError::context(e, prompt_field))?;
    Ok(GenerationRequest {
        prompt_ids,
        sampling: v.sampling.clone(),
        max_tokens,
        stop: v.stop.clone(),
        stop_token_ids: v.stop_token_ids.clone(),
        ignore_eos: v.ignore_eos,
        skip_special_tokens: v.skip_special_tokens,
        guide: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap()
    }

    fn err(json: &str) -> String {
        common(&params(json), Endpoint::Chat)
            .unwrap_err()
            .to_string()
    }

    fn err_completion(json: &str) -> String {
        common(&params(json), Endpoint::Completion)
            .unwrap_err()
            .to_string()
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
    fn sampling_extras_are_checked() {
        assert_eq!(
            err(r#"{"presence_penalty": 2.5}"#),
            "presence_penalty must be in [-2, 2], got 2.5"
        );
        assert_eq!(
            err(r#"{"frequency_penalty": -3}"#),
            "frequency_penalty must be in [-2, 2], got -3"
        );
        assert_eq!(
            err(r#"{"repetition_penalty": 0}"#),
            "repetition_penalty must be in (0, 10], got 0"
        );
        assert_eq!(err(r#"{"min_p": 1.5}"#), "min_p must be in [0, 1], got 1.5");
        assert_eq!(
            err(r#"{"min_tokens": 9, "max_tokens": 4}"#),
            "min_tokens must be at most max_tokens (4), got 9"
        );
        assert_eq!(
            err(r#"{"logit_bias": {"abc": 1}}"#),
            "logit_bias keys must be token ids, got `abc`"
        );
        assert_eq!(
            err(r#"{"logit_bias": {"5": 300}}"#),
            "logit_bias values must be in [-100, 100], got 300 for token 5"
        );
        assert_eq!(
            err(r#"{"logprobs": 3}"#),
            "logprobs must be a boolean for chat completions"
        );
        assert_eq!(
            err(r#"{"top_logprobs": 2}"#),
            "top_logprobs requires logprobs to be true"
        );
        assert_eq!(
            err(r#"{"logprobs": true, "top_logprobs": 21}"#),
            "top_logprobs must be in [0, 20], got 21"
        );
        assert_eq!(
            err_completion(r#"{"logprobs": true}"#),
            "logprobs must be an integer for completions"
        );
        assert_eq!(
            err_completion(r#"{"logprobs": -1}"#),
            "logprobs must be in [0, 20], got -1"
        );
        assert_eq!(
            err(r#"{"echo": true}"#),
            "echo is only supported by /v1/completions"
        );
        let v = common(
            &params(r#"{"logprobs": true, "top_logprobs": 3, "logit_bias": {"7": -5, "2": 1}}"#),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(v.sampling.logprobs, Some(3));
        assert_eq!(v.sampling.logit_bias, vec![(2, 1.0), (7, -5.0)]);
        assert!(check_token_ids(&v, 8).is_ok());
        assert!(check_token_ids(&v, 7)
            .unwrap_err()
            .to_string()
            .contains("token id 7"));
        let v = common(&params(r#"{"logprobs": 2}"#), Endpoint::Completion).unwrap();
        assert_eq!(v.sampling.logprobs, Some(2));
    }

    #[test]
    fn defaults_and_conversions() {
        let v = common(
            &params(r#"{"stop": "x", "max_completion_tokens": 5, "max_tokens": 9, "top_k": -1}"#),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(v.stop, vec!["x"]);
        assert_eq!(v.max_tokens, Some(5));
        assert_eq!(v.sampling.top_k, None);
        assert_eq!(v.sampling.temperature, 1.0);
        assert!(v.skip_special_tokens);
    }

    #[test]
    fn context_checks() {
        let v = common(&params(r#"{"max_tokens": 5}"#), Endpoint::Chat).unwrap();
        assert!(generation_request(&v, vec![1; 10], 16, "prompt", 100).is_ok());
        let e = generation_request(&v, vec![1; 12], 16, "prompt", 100).unwrap_err();
        assert!(e.to_string().contains("17 were requested"), "{e}");
        let e = generation_request(&v, vec![1; 16], 16, "prompt", 100).unwrap_err();
        assert!(matches!(e, ApiError::ContextLength { .. }));
        let e = generation_request(&v, vec![100], 16, "prompt", 100).unwrap_err();
        assert!(e.to_string().contains("out of range"));
        let v = common(&params("{}"), Endpoint::Chat).unwrap();
        assert_eq!(
            generation_request(&v, vec![1; 10], 16, "prompt", 100)
                .unwrap()
                .max_tokens,
            6
        );
    }
}
