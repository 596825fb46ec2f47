//! `inferd bench`: a serving benchmark for any OpenAI-compatible endpoint (inferd, vLLM,
//! llama.cpp's server...). It sends `--num-requests` completions with `--concurrency` in
//! flight, prompts of exactly `--prompt-tokens` token ids drawn from a fixed seeded sequence
//! (so runs are comparable), `ignore_eos` so every request generates `--max-tokens`, and reports
//! what `vllm bench serve` reports. It only targets loopback addresses unless
//! `--allow-remote` is given, and every loop is bounded in count and time.

pub mod self_serve;
pub mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};

pub use crate::config::BenchArgs;
pub use stats::{Report, RequestResult};

/// Token ids below this are avoided (special and byte tokens live there in most vocabularies);
/// ids stay below `FIRST_ID + ID_RANGE`, inside every supported model's vocabulary.
const FIRST_ID: u64 = 1000;
const ID_RANGE: u64 = 8000;

/// The prompts of a run: request `i` gets the `i`-th slice of one seeded id sequence.
pub fn corpus(seed: u64, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (FIRST_ID + s % ID_RANGE) as u32
    };
    (0..n).map(|_| (0..len).map(|_| next()).collect()).collect()
}

pub(crate) fn check_loopback(url: &reqwest::Url, allow_remote: bool) -> anyhow::Result<()> {
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback && !allow_remote {
        bail!("{url} is not a loopback address; pass --allow-remote to use it");
    }
    Ok(())
}

/// Benchmark `--base-url` at each `--concurrency` level, one report per level.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::with_capacity(args.concurrency.len());
    for &c in &args.concurrency {
        reports.push(run_at(args, c).await?);
    }
    Ok(reports)
}

/// One benchmark run with `concurrency` requests in flight.
pub async fn run_at(args: &BenchArgs, concurrency: usize) -> anyhow::Result<Report> {
    let num_requests = args
        .requests_per_stream
        .map_or(args.num_requests, |k| k * concurrency);
    let base = args.base_url.trim_end_matches('/').to_string();
    let url = reqwest::Url::parse(&base).context("--base-url")?;
    check_loopback(&url, args.limits.allow_remote)?;
    if concurrency == 0 || num_requests == 0 || args.max_tokens == 0 || args.prompt_tokens == 0 {
        bail!("--concurrency, --num-requests (or --requests-per-stream), --prompt-tokens and --max-tokens must be at least 1");
    }
    // A fresh connection per request: reusing a pooled keep-alive connection races with servers
    // that close idle ones (llama-server does), which shows up as failed requests.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.limits.request_timeout))
        .pool_max_idle_per_host(0)
        .build()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = client
                .get(format!("{base}/v1/models"))
                .send()
                .await?
                .json()
                .await?;
            v["data"][0]["id"]
                .as_str()
                .context("/v1/models lists no model; pass --model")?
                .to_string()
        }
    };
    let prompts = Arc::new(corpus(args.seed, num_requests, args.prompt_tokens));
    let shape = Arc::new(Shape {
        response_format: args
            .response_format
            .as_deref()
            .map(response_format)
            .transpose()?,
        tools: args.tools.as_deref().map(tools).transpose()?,
        max_tokens: args.max_tokens,
        stream: args.stream,
    });
    let progress = indicatif::ProgressBar::new(num_requests as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} requests ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    progress.set_message(format!("benchmarking {model}"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.limits.max_duration);
    let workers = (0..concurrency.min(num_requests)).map(|_| {
        let (client, base, model, prompts, next, progress, shape) = (
            client.clone(),
            base.clone(),
            model.clone(),
            prompts.clone(),
            next.clone(),
            progress.clone(),
            shape.clone(),
        );
        tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= prompts.len() || Instant::now() > deadline {
                    return results;
                }
                let (path, body) = shape.request(&model, &prompts[i]);
                let url = format!("{base}{path}");
                let r = one_request(&client, &url, body, prompts[i].len(), shape.stream).await;
                progress.inc(1);
                results.push(r);
            }
        })
    });
    let mut results = Vec::new();
    for w in futures::future::join_all(workers).await {
        results.extend(w?);
    }
    let duration = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    if let Some(e) = results.iter().find_map(|r| r.error.as_ref()) {
        tracing::warn!(error = %e, failed = results.iter().filter(|r| !r.ok).count(), "some requests failed");
    }
    let mut report = Report::new(&base, &model, concurrency, duration, &results);
    // inferd says which CPU kernels it runs; other servers answer 404 or without the fields.
    if let Ok(r) = client.get(format!("{base}/version")).send().await {
        if let Ok(v) = r.json::<Value>().await {
            report.cpu_kernels = v["cpu_kernels"].as_str().map(String::from);
            report.cpu_flags = v["cpu_flags"].as_array().map(|f| {
                f.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        }
    }
    Ok(report)
}

/// Whether a stream chunk carries output: completion text, chat content, or a piece of a call.
fn has_output(chunk: &Value) -> bool {
    let c = &chunk["choices"][0];
    let nonempty = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    nonempty(&c["text"])
        || nonempty(&c["delta"]["content"])
        || c["delta"]["tool_calls"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
}

/// What every request of a run looks like.
struct Shape {
    response_format: Option<Value>,
    tools: Option<Value>,
    max_tokens: usize,
    stream: bool,
}

impl Shape {
    /// The route and body for one prompt: a completion of its token ids, or with tools a chat
    /// whose user message has as many words.
    fn request(&self, model: &str, prompt: &[u32]) -> (&'static str, Value) {
        let mut body = json!({"model": model, "max_tokens": self.max_tokens, "temperature": 0,
                              "ignore_eos": true, "stream": self.stream});
        let path = match &self.tools {
            Some(tools) => {
                // Common words, about a token each, so the prompt is about as long.
                const WORDS: [&str; 16] = [
                    "the", "of", "and", "to", "in", "is", "it", "you", "that", "was", "for", "on",
                    "are", "with", "as", "be",
                ];
                let words: Vec<&str> = prompt.iter().map(|&t| WORDS[t as usize % 16]).collect();
                body["messages"] = json!([{"role": "user", "content": words.join(" ")}]);
                body["tools"] = tools.clone();
                body["tool_choice"] = json!("required");
                "/v1/chat/completions"
            }
            None => {
                body["prompt"] = json!(prompt);
                "/v1/completions"
            }
        };
        if let Some(f) = &self.response_format {
            body["response_format"] = f.clone();
        }
        (path, body)
    }
}

/// JSON given inline or as `@FILE`.
fn json_arg(flag: &str, arg: &str) -> anyhow::Result<Value> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("{flag} {path}"))?,
        None => arg.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("{flag} is not valid JSON"))
}

/// `--response-format`: `json_object`, or a JSON schema (inline, or `@FILE`).
fn response_format(arg: &str) -> anyhow::Result<Value> {
    if arg == "json_object" {
        return Ok(json!({"type": "json_object"}));
    }
    let schema = json_arg("--response-format", arg)?;
    Ok(json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}))
}

/// `--tools`: a JSON array of tools.
fn tools(arg: &str) -> anyhow::Result<Value> {
    let v = json_arg("--tools", arg)?;
    if !v.is_array() {
        bail!("--tools must be a JSON array of tools");
    }
    Ok(v)
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    mut body: Value,
    prompt_tokens: usize,
    stream: bool,
) -> RequestResult {
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let t0 = Instant::now();
    let mut r = RequestResult {
        prompt_tokens,
        ..Default::default()
    };
    let fail = |mut r: RequestResult, e: String| {
        r.error = Some(e);
        r
    };
    let resp = match client.post(url).json(&body).send().await {
        Ok(resp) if resp.status().is_success() => resp,
        Ok(resp) => return fail(r, format!("HTTP {}", resp.status())),
        Err(e) => return fail(r, e.to_string()),
    };
    if !stream {
        return match resp.json::<Value>().await {
            Ok(v) => {
                r.e2e = t0.elapsed().as_secs_f64();
                r.ttft = r.e2e;
                r.output_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                r.ok = true;
                r
            }
            Err(e) => fail(r, e.to_string()),
        };
    }
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut chunks, mut last) = (String::new(), 0usize, None::<Instant>);
    let mut usage_tokens = None;
    while let Some(piece) = bytes.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => return fail(r, e.to_string()),
        };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
                r.prompt_tokens = n as usize;
            }
            if has_output(&v) {
                let now = Instant::now();
                match last {
                    None => r.ttft = (now - t0).as_secs_f64(),
                    Some(prev) => r.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
                chunks += 1;
            }
        }
    }
    r.e2e = t0.elapsed().as_secs_f64();
    r.output_tokens = usage_tokens.unwrap_or(chunks);
    r.ok = chunks > 0 || r.output_tokens > 0;
    if !r.ok {
        r.error = Some("no tokens in the stream".into());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_fixed_by_seed_and_in_range() {
        let a = corpus(0, 3, 5);
        assert_eq!(a, corpus(0, 3, 5));
        assert_ne!(a, corpus(1, 3, 5));
        assert_eq!((a.len(), a[0].len()), (3, 5));
        assert!(a.iter().flatten().all(|&t| (1000..9000).contains(&t)));
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn only_loopback_unless_allowed() {
        let ok = |u: &str| check_loopback(&reqwest::Url::parse(u).unwrap(), false).is_ok();
        assert!(ok("http://127.0.0.1:8000"));
        assert!(ok("http://127.3.4.5:1"));
        assert!(ok("http://localhost:8000"));
        assert!(ok("http://[::1]:8000"));
        assert!(!ok("http://10.0.0.1:8000"));
        assert!(!ok("http://example.com"));
        assert!(check_loopback(&reqwest::Url::parse("http://10.0.0.1").unwrap(), true).is_ok());
    }
}
