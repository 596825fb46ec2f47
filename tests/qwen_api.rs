//! End to end on the real default model (Qwen2.5-Coder-0.5B-Instruct, GGUF): answers, streaming,
//! batching, stop strings and prefix caching, through HTTP. Behaviour that does not depend on
//! a real model's text (bad input, disconnects, queue limits) is tested on `synthetic:tiny` in
//! `synthetic_api.rs`.

mod common;

use std::sync::OnceLock;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const NAME: &str = "qwen";

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| start(config(model_path(QWEN), NAME, default_engine())))
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": NAME, "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max_tokens})
}

#[tokio::test]
async fn answers_in_english_and_chinese() {
    let (status, v) = post(
        base(),
        "/v1/chat/completions",
        &chat("What is the capital of France?", 32),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], NAME);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 10);
    assert!(u["completion_tokens"].as_u64().unwrap() >= 2);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    let zh = chat_text(base(), &chat("法国的首都是哪里？", 32)).await;
    assert!(zh.contains("巴黎"), "{zh}");
}

#[tokio::test]
async fn streaming_chunks_concatenate_to_the_non_streaming_text() {
    let mut body = chat("Write a haiku about the sea.", 40);
    let whole = chat_text(base(), &body).await;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text, ctype) = stream_body(base(), "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    assert!(ctype.unwrap().starts_with("text/event-stream"));
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("every chunk is JSON"))
        .collect();
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id for the whole stream");
        assert_eq!(c["model"], NAME);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = None;
    for c in &chunks {
        if let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if !choice["finish_reason"].is_null() {
                assert!(finish.is_none(), "one finish_reason");
                finish = Some(choice["finish_reason"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(streamed, whole);
    assert!(finish.is_some());
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn batching_is_invisible_to_greedy_requests() {
    let prompts = [
        "What is the capital of France?",
        "Write a Python function that reverses a string.",
        "Name three primary colors.",
        "用一句话介绍长城。",
        "What is 17 times 23?",
        "Explain what a linked list is in one sentence.",
        "Translate 'good morning' into Spanish.",
        "List the first five prime numbers.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(chat_text(base(), &chat(p, 24)).await);
    }
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|p| async move { chat_text(base(), &chat(p, 24)).await }),
    )
    .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "prompt {i} differs when batched");
    }
    let s = wait_until_idle(base()).await;
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
}

#[tokio::test]
async fn completions_with_stop_strings_token_prompts_and_length() {
    let (s, v) = post(
        base(),
        "/v1/completions",
        &json!({"model": NAME, "prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": [" 7"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
    assert!(text.starts_with(" 5, 6,"), "{text}");
    assert!(
        !text.contains('7'),
        "the stop string is not returned: {text}"
    );

    // The same prompt as token ids gives the same text; max_tokens ends it with `length`.
    let (_, tok) = post(
        base(),
        "/v1/completions",
        &json!({"model": NAME, "prompt": "1, 2, 3, 4,", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(tok["choices"][0]["finish_reason"], "length");
    assert_eq!(tok["usage"]["completion_tokens"], 3);
    let n_prompt = tok["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(n_prompt > 3);

    let (s, v) = post(base(), "/v1/models", &json!({})).await;
    assert_eq!(s, 405, "{v}");
    let (s, v) = get(base(), "/v1/models").await;
    assert_eq!(s, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], NAME);
    assert_eq!(v["data"][0]["object"], "model");
    let (s, v) = get(base(), "/health").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_and_completion_streams_work() {
    let body = json!({"model": NAME, "prompt": "Once upon a time", "max_tokens": 16,
                      "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 1234});
    let (_, a) = post(base(), "/v1/completions", &body).await;
    let (_, b) = post(base(), "/v1/completions", &body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (status, text, _) = stream_body(base(), "/v1/completions", &sb).await;
    assert_eq!(status, 200);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|c| {
            assert_eq!(c["object"], "text_completion");
            c["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(streamed, a["choices"][0]["text"].as_str().unwrap());
}

/// Time to the first content chunk of a streamed chat completion, and the streamed text.
async fn ttft(base: &str, body: &Value) -> (std::time::Duration, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let t0 = std::time::Instant::now();
    let resp = send(base, "/v1/chat/completions", &body).await;
    let mut stream = resp.bytes_stream();
    let (mut first, mut raw) = (None, String::new());
    while let Some(chunk) = stream.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if first.is_none() && raw.contains("\"content\":\"") && raw.matches("data:").count() >= 2 {
            first = Some(t0.elapsed());
        }
    }
    let text = sse_data(&raw)
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    (first.expect("a content chunk"), text)
}

/// A daemon of its own, so that its counters see only this test's requests.
fn cache_base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let engine = inferd::config::EngineSettings {
            kv_cache_memory: Some(96 << 20),
            max_model_len: Some(2048),
            ..default_engine()
        };
        start(config(model_path(QWEN), NAME, engine))
    })
}

#[tokio::test]
async fn a_repeated_long_prompt_and_a_grown_chat_reuse_cached_blocks() {
    let base = cache_base();
    let doc = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let body = chat(
        &format!("{doc}\nHow many times does the word fox appear above?"),
        8,
    );
    let before = engine_stats(base).await;
    let (cold, a) = ttft(base, &body).await;
    let mid = engine_stats(base).await;
    let (warm, b) = ttft(base, &body).await;
    let after = engine_stats(base).await;
    assert_eq!(a, b, "a prefix hit changes nothing in the output");
    let n_prompt =
        mid["prompt_tokens"].as_u64().unwrap() - before["prompt_tokens"].as_u64().unwrap();
    let hits =
        after["prefix_cache_hits"].as_u64().unwrap() - mid["prefix_cache_hits"].as_u64().unwrap();
    // Every full block but the one holding the last prompt token comes from cache.
    assert!(
        hits >= (n_prompt / 16 - 1) * 16,
        "{hits} of {n_prompt} prompt tokens hit"
    );
    eprintln!(
        "prefix cache: {n_prompt}-token prompt, TTFT cold {:?} vs warm {:?} (ratio {:.1}x)",
        cold,
        warm,
        cold.as_secs_f64() / warm.as_secs_f64()
    );

    // A chat re-sent with the reply and one more message recomputes only the new tail.
    let mut turn = body.clone();
    turn["messages"] = json!([
        body["messages"][0],
        {"role": "assistant", "content": a},
        {"role": "user", "content": "Answer in one word."}
    ]);
    let s0 = engine_stats(base).await;
    chat_text(base, &turn).await;
    let s1 = engine_stats(base).await;
    let hits =
        s1["prefix_cache_hits"].as_u64().unwrap() - s0["prefix_cache_hits"].as_u64().unwrap();
    let queried =
        s1["prefix_cache_queries"].as_u64().unwrap() - s0["prefix_cache_queries"].as_u64().unwrap();
    assert!(
        hits >= (n_prompt / 16 - 1) * 16,
        "turn 2: {hits} of {queried} tokens hit"
    );
    assert!(
        queried - hits < 64,
        "turn 2 recomputed {} tokens",
        queried - hits
    );
}
