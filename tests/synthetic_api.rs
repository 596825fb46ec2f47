//! HTTP and engine behaviour that does not depend on a real model's text, on `synthetic:tiny`
//! (seeded random weights, token `i` is the text `<i>`): no download, seconds to run. OpenAI's
//! error shape for every bad input, the SSE shape, stop / length / min_tokens, a full waiting
//! queue, and clients that hang up. Real models keep the tests of meaning (`qwen_api.rs`).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use inferd::config::EngineSettings;
use serde_json::{json, Value};

const NAME: &str = "tiny";
const MAX_LEN: u64 = 2048;

fn engine(max_num_seqs: usize, max_waiting_requests: usize) -> EngineSettings {
    EngineSettings {
        max_num_seqs,
        max_waiting_requests,
        kv_cache_memory: Some(16 << 20),
        max_model_len: Some(MAX_LEN as usize),
        ..default_engine()
    }
}

/// A daemon on `synthetic:tiny` with `engine`, started once per `cell`; `customize` adjusts
/// its config and server options first.
fn tiny(
    cell: &'static OnceLock<String>,
    engine: EngineSettings,
    customize: impl FnOnce(&mut inferd::config::Config, &mut inferd::ServeOptions),
) -> &'static str {
    cell.get_or_init(|| {
        let mut c = config(PathBuf::from("synthetic:tiny"), NAME, engine);
        let mut opts = inferd::ServeOptions::from(&c);
        customize(&mut c, &mut opts);
        start_with(c, opts)
    })
}

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(8, 64), |_, _| {})
}

/// With `--api-key`.
fn keyed() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(8, 64), |c, _| c.api_key = Some(KEY.into()))
}

const KEY: &str = "sk-test";

/// Two running and one waiting: the engine takes three requests at once.
fn three_slots() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(2, 1), |_, _| {})
}

/// A 1 s header deadline.
fn impatient() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(8, 64), |_, o| {
        o.limits.header_read_timeout = Duration::from_secs(1)
    })
}

/// Browser calls allowed from one origin (and an API key, which preflights do not carry).
fn with_origins() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(8, 64), |c, _| {
        c.allowed_origins = vec![ORIGIN.into()];
        c.api_key = Some(KEY.into());
    })
}

const ORIGIN: &str = "https://app.example.com";

/// At most two open connections.
fn two_connections() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(8, 64), |_, o| o.limits.max_connections = 2)
}

/// One sequence at a time and one waiting: the queue fills at the third request.
fn one_slot() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    tiny(&URL, engine(1, 1), |_, _| {})
}

/// A greedy completion of token ids, with `extra` keys merged in.
fn completion(max_tokens: u32, extra: Value) -> Value {
    let mut b = json!({"model": NAME, "prompt": [100, 200, 300, 400], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().into_iter().flatten() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn every_bad_input_is_an_openai_shaped_4xx_naming_the_field() {
    let base = server();
    let r = client()
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_openai_error(&r.json().await.unwrap());

    let over: Vec<u32> = vec![5; MAX_LEN as usize];
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/v1/completions", json!([1, 2]), 400, "null"),
        ("/v1/completions", json!({"model": NAME}), 400, "prompt"),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "model",
        ),
        (
            "/v1/completions",
            completion(4, json!({"temperature": "hot"})),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            completion(4, json!({"top_p": 2})),
            400,
            "top_p",
        ),
        ("/v1/completions", completion(4, json!({"n": 65})), 400, "n"),
        (
            "/v1/completions",
            completion(4, json!({"stream_options": {}})),
            400,
            "stream_options",
        ),
        (
            "/v1/completions",
            completion(4, json!({"min_tokens": 9})),
            400,
            "min_tokens",
        ),
        (
            "/v1/completions",
            completion(4, json!({"logit_bias": {"9216": 1}})),
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            completion(4, json!({"prompt": [9216]})),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            completion(4, json!({"prompt": []})),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            completion(4, json!({"prompt": over})),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            completion(MAX_LEN as u32, json!({})),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"model": NAME, "messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": NAME, "messages": "hi"}),
            400,
            "messages",
        ),
        ("/detokenize", json!({"tokens": [9216]}), 400, "tokens"),
        (
            "/tokenize",
            json!({"prompt": "hi", "tools": []}),
            400,
            "tools",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}),
            400,
            "tool_choice",
        ),
    ];
    for (path, body, status, param) in cases {
        let (s, v) = post(base, path, &body).await;
        assert_eq!(s, status, "{path} {body} -> {v}");
        assert_openai_error(&v);
        assert_eq!(
            v["error"]["param"].to_string().trim_matches('"'),
            param,
            "{body} -> {v}"
        );
    }
    let (_, v) = post(
        base,
        "/v1/completions",
        &completion(MAX_LEN as u32, json!({})),
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let (s, v) = get(base, "/v1/nothing-here").await;
    assert_eq!(s, 404);
    assert_openai_error(&v);

    // Still serving.
    let (s, v) = post(base, "/v1/completions", &completion(3, json!({}))).await;
    assert_eq!(
        (s, v["usage"]["completion_tokens"].as_u64()),
        (200, Some(3)),
        "{v}"
    );
}

/// The stream: `text_completion` chunks whose text concatenates to the non-streaming text, a
/// last chunk with the finish reason, the usage chunk with no choices, then `[DONE]`; chat
/// opens each choice with the assistant role.
#[tokio::test]
async fn streams_have_openai_shape_and_match_the_whole_response() {
    let base = server();
    let (s, whole) = post(base, "/v1/completions", &completion(6, json!({}))).await;
    assert_eq!(s, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10})
    );

    let body = completion(
        6,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (s, raw, ctype) = stream_body(base, "/v1/completions", &body).await;
    assert_eq!(s, 200);
    assert!(ctype.unwrap_or_default().starts_with("text/event-stream"));
    let data = sse_data(&raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "length");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"]));

    let chat = json!({"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3, "temperature": 0, "ignore_eos": true, "stream": true, "n": 2});
    let (s, raw, _) = stream_body(base, "/v1/chat/completions", &chat).await;
    assert_eq!(s, 200);
    let data = sse_data(&raw);
    let first: Vec<Value> = data[..2]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    for (i, c) in first.iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"][0]["index"], i);
        assert_eq!(
            c["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
    }
    let finishes = data
        .iter()
        .filter(|d| d.contains("\"finish_reason\":\"length\""))
        .count();
    assert_eq!(finishes, 2, "one last chunk per choice");
}

/// `max_tokens` ends with `length`; an end token ends with `stop` but not before
/// `min_tokens`; a stop string ends with `stop` and is cut from the text.
#[tokio::test]
async fn stop_length_and_min_tokens() {
    let base = server();
    let run = |body: Value| async move {
        let (s, v) = post(base, "/v1/completions", &body).await;
        assert_eq!(s, 200, "{v}");
        let c = &v["choices"][0];
        (
            c["text"].as_str().unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    // EOS (token 0) is made the likeliest token at every step.
    let eos = json!({"ignore_eos": false, "logit_bias": {"0": 100}});
    let (text, reason, n) = run(completion(8, eos.clone())).await;
    assert_eq!((text.as_str(), reason.as_str(), n), ("", "stop", 1));
    let mut late = eos.clone();
    late["min_tokens"] = json!(3);
    let (_, reason, n) = run(completion(8, late)).await;
    assert_eq!(
        (reason.as_str(), n),
        ("stop", 4),
        "EOS is masked for the first 3 tokens"
    );
    let (_, reason, n) = run(completion(
        8,
        json!({"logit_bias": {"7": 100}, "stop_token_ids": [7]}),
    ))
    .await;
    assert_eq!((reason.as_str(), n), ("stop", 1));

    // Token 42 (text ` <42>`) every step: the stop string spans two tokens.
    let (text, reason, _) = run(completion(
        8,
        json!({"logit_bias": {"42": 100}, "stop": ["2> <4"]}),
    ))
    .await;
    assert_eq!((text.as_str(), reason.as_str()), (" <4", "stop"));
    let (text, reason, n) = run(completion(3, json!({"logit_bias": {"42": 100}}))).await;
    assert_eq!(
        (text.as_str(), reason.as_str(), n),
        (" <42> <42> <42>", "length", 3)
    );
}

#[tokio::test]
async fn a_full_waiting_queue_is_a_503_and_nothing_hangs() {
    let base = one_slot();
    let url = format!("{base}/v1/completions");
    let long = completion(200, json!({"stream": true}));
    let c = client();
    // A runs (it has sent tokens, so it left the waiting queue)...
    let a = c.post(&url).json(&long).send().await.unwrap();
    assert_eq!(a.status(), 200);
    let mut a_stream = a.bytes_stream();
    let mut events = 0;
    while let Some(chunk) = a_stream.next().await {
        events += String::from_utf8_lossy(&chunk.unwrap())
            .matches("data:")
            .count();
        if events >= 2 {
            break;
        }
    }
    // ...B waits (max_num_seqs = 1)...
    let b = c.post(&url).json(&long).send().await.unwrap();
    assert_eq!(b.status(), 200);
    // ...and C finds the queue full.
    let r = c
        .post(&url)
        .json(&completion(2, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_openai_error(&r.json().await.unwrap());

    drop(a_stream);
    drop(b);
    let s = wait_until_idle(base).await;
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
    let (s, _) = post(base, "/v1/completions", &completion(2, json!({}))).await;
    assert_eq!(s, 200);
}

/// Clients that hang up mid-stream (some with several choices) are aborted and give back every
/// block; the metrics count them as aborts.
#[tokio::test]
async fn clients_that_hang_up_are_aborted_and_free_their_blocks() {
    let base = server();
    let url = format!("{base}/v1/completions");
    let mut handles = Vec::new();
    for n in [1, 1, 3, 2] {
        let body = completion(2000, json!({"stream": true, "n": n, "prompt": [9, 8, 7]}));
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let r = client().post(&url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut s = r.bytes_stream();
            let mut seen = 0;
            while let Some(chunk) = s.next().await {
                seen += String::from_utf8_lossy(&chunk.unwrap())
                    .matches("data:")
                    .count();
                if seen >= 4 {
                    break; // dropping the stream closes the connection mid-generation
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let during = engine_stats(base).await;
    let s = wait_until_idle(base).await;
    let generated = s["generation_tokens"].as_u64().unwrap();
    assert!(
        generated < during["generation_tokens"].as_u64().unwrap() + 7 * 1900,
        "generation stopped early: {during} -> {s}"
    );
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
    assert_eq!(s["num_kv_sequences"], 0, "{s}");
    let r = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    let metrics = r.text().await.unwrap();
    let labels = ["model_name=\"tiny\"", "finished_reason=\"abort\""];
    let aborts = metric(&metrics, "vllm:request_success_total", &labels);
    assert!(
        aborts.is_some_and(|n| n >= 7.0),
        "7 choices hung up: {aborts:?}"
    );
}

/// A client that hangs up while its long prompt is still being prefilled (2,000 tokens in
/// 2-token chunks: 1,000 steps) is dropped at a next step; the prefill does not run to its end.
#[tokio::test]
async fn a_client_gone_during_prefill_stops_its_prefill() {
    static URL: OnceLock<String> = OnceLock::new();
    let settings = EngineSettings {
        max_num_batched_tokens: 2,
        max_model_len: Some(2048),
        ..engine(8, 64)
    };
    let base = tiny(&URL, settings, |_, _| {});
    let before = engine_stats(base).await["num_steps"].as_u64().unwrap();
    let prompt: Vec<u32> = (0..2000).map(|i| 2 + (i * 7) % 9000).collect();
    let body = json!({"model": NAME, "prompt": prompt, "max_tokens": 4, "stream": true});
    let r = send(base, "/v1/completions", &body).await;
    assert_eq!(r.status(), 200);
    // Hang up once the prefill is under way (and before its first token).
    let started = Instant::now();
    while engine_stats(base).await["num_steps"].as_u64().unwrap() < before + 5 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the prefill never started"
        );
    }
    drop(r);
    let s = wait_until_idle(base).await;
    let steps = s["num_steps"].as_u64().unwrap() - before;
    assert!(
        (5..900).contains(&steps),
        "the prefill ran on after the client left: {steps} of 1,000 steps"
    );
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
}

/// A body not declared as JSON is a 415 (a browser's cross-origin "simple request" cannot
/// spend compute), and the message says which part of the context overflows, by how much.
#[tokio::test]
async fn json_routes_want_json_and_context_errors_say_what_overflows() {
    let base = server();
    let body = completion(2, json!({})).to_string();
    for ctype in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = client()
            .post(format!("{base}/v1/completions"))
            .header("content-type", ctype)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ctype}");
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v);
    }
    let r = client()
        .post(format!("{base}/tokenize"))
        .header("content-type", "application/json; charset=utf-8")
        .body(json!({"prompt": "<5> <6>"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (_, v) = post(base, "/v1/completions", &completion(2045, json!({}))).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("max_tokens is too large")
            && msg.contains("1 over")
            && msg.contains("at most 2044"),
        "{msg}"
    );
    let long: Vec<u32> = vec![5; MAX_LEN as usize + 9];
    let (_, v) = post(
        base,
        "/v1/completions",
        &completion(1, json!({"prompt": long})),
    )
    .await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("the prompt is too long") && msg.contains("10 over"),
        "{msg}"
    );
}

/// With a key, every route but /health, /ready and /version wants it.
#[tokio::test]
async fn an_api_key_guards_every_route_that_holds_data() {
    let base = keyed();
    for path in ["/health", "/ready", "/version"] {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let gets = ["/v1/models", "/stats", "/metrics", "/nothing-here"];
    for path in gets {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_openai_error(&r.json().await.unwrap());
        let r = client()
            .get(format!("{base}{path}"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 401, "{path} with the key");
    }
    let posts = [
        ("/tokenize", json!({"prompt": "<5>"})),
        ("/detokenize", json!({"tokens": [5]})),
        ("/v1/completions", completion(2, json!({}))),
    ];
    for (path, body) in posts {
        let (s, v) = post(base, path, &body).await;
        assert_eq!(s, 401, "{path}: {v}");
        let r = client()
            .post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} with the key");
    }
}

/// A burst is admitted up to what can run plus the waiting bound (it used to be the waiting
/// bound alone, counting requests the engine had not picked up yet), and each rejection is
/// counted.
#[tokio::test]
async fn a_burst_is_admitted_up_to_running_capacity_plus_the_waiting_bound() {
    let base = three_slots();
    let url = format!("{base}/v1/completions");
    let body = completion(2000, json!({"stream": true}));
    let sends = (0..6).map(|_| client().post(&url).json(&body).send());
    let responses: Vec<reqwest::Response> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let busy = responses.iter().filter(|r| r.status() == 503).count();
    assert_eq!((ok, busy), (3, 3));
    drop(responses);
    let s = wait_until_idle(base).await;
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
    let text = metrics_text(base).await;
    let rejected = metric(
        &text,
        "inferd:requests_rejected_total",
        &["reason=\"overloaded\""],
    );
    assert!(rejected.is_some_and(|n| n >= 3.0), "{rejected:?}");
}

/// Read from `stream` until the server closes it (or `limit` passes); returns what came and
/// how long it took.
async fn until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Slowloris connections (a header byte now and then), idle new connections and idle
/// keep-alive connections are closed at the header deadline; a stream that takes longer than
/// the deadline to read is not cut.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_at_the_header_deadline() {
    use tokio::io::AsyncWriteExt;
    let base = impatient();
    let mut slow = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    let request =
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let t0 = Instant::now();
    let mut sent = 0;
    for &b in request.iter() {
        if slow.write_all(&[b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let (got, _) = until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(sent < request.len(), "the whole slow request was accepted");
    // The unfinished request is answered 408 in OpenAI's shape.
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    let v: Value = serde_json::from_str(got.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");

    // An idle connection (nothing sent) closes silently.
    let mut idle = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    let (got, took) = until_closed(&mut idle, Duration::from_secs(10)).await;
    assert_eq!(got, "");
    assert!(
        took < Duration::from_secs(5),
        "an idle connection stayed {took:?}"
    );

    let mut kept = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, took) = until_closed(&mut kept, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        !got.contains("408"),
        "an answered keep-alive connection closes silently: {got}"
    );
    assert!(
        took < Duration::from_secs(5),
        "an idle keep-alive connection stayed {took:?}"
    );

    // A stream whose client pauses for longer than the deadline still arrives whole.
    let body = completion(1500, json!({"stream": true}));
    let r = send(base, "/v1/completions", &body).await;
    let mut s = r.bytes_stream();
    let mut text = String::from_utf8_lossy(&s.next().await.unwrap().unwrap()).into_owned();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while let Some(chunk) = s.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream was cut"),
        ));
    }
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(text.contains("\"finish_reason\":\"length\""));
}

/// Over the connection cap, a connection is answered with a 503 in OpenAI's shape and closed;
/// once one closes, new connections are served again.
#[tokio::test]
async fn connections_over_the_cap_get_a_503() {
    let base = two_connections();
    let a = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    let b = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::Client::new()
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "too_many_connections");
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::Client::new()
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// CORS: no preflight is answered unless `--allowed-origins` names the origin; then it is,
/// before the API key check (a preflight carries no key), and the real call still needs the
/// key.
#[tokio::test]
async fn cors_preflights_are_answered_only_for_allowed_origins() {
    let preflight = |base: &str, origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let r = preflight(server(), ORIGIN).await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(!r.status().is_success(), "{}", r.status());

    let base = with_origins();
    let r = preflight(base, ORIGIN).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
    let r = preflight(base, "https://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let call = |key: Option<&str>| {
        let mut b = client()
            .post(format!("{base}/v1/completions"))
            .header("origin", ORIGIN)
            .json(&completion(2, json!({})));
        if let Some(k) = key {
            b = b.bearer_auth(k);
        }
        b.send()
    };
    assert_eq!(call(None).await.unwrap().status(), 401);
    let r = call(Some(KEY)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
}

/// Send raw bytes; the status and JSON body of the answer.
async fn raw_answer(base: &str, request: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// What hyper cannot parse is answered in OpenAI's shape too: a malformed request line (400),
/// a head past hyper's own limit of 256 fields (431).
#[tokio::test]
async fn unparsable_requests_get_openai_shaped_errors() {
    let base = server();
    let (s, v) = raw_answer(base, b"GARBAGE\r\n\r\n").await;
    assert_eq!(s, 400);
    assert_openai_error(&v);
    let mut many = b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..300 {
        many.extend_from_slice(format!("x-f{i}: a\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (s, v) = raw_answer(base, &many).await;
    assert_eq!(s, 431);
    assert_eq!(v["error"]["code"], "request_header_fields_too_large");
}

/// Too many or too large headers get a 431 in OpenAI's shape.
#[tokio::test]
async fn oversized_headers_get_an_openai_shaped_431() {
    let base = server();
    let mut many = client().get(format!("{base}/v1/models"));
    for i in 0..70 {
        many = many.header(format!("x-filler-{i}"), "x");
    }
    let long = client()
        .get(format!("{base}/v1/models"))
        .header("x-long", "y".repeat(40 << 10));
    for req in [many, long] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 431);
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "request_header_fields_too_large");
    }
    let (s, _) = get(base, "/v1/models").await;
    assert_eq!(s, 200);
}
