//! Load and faults: 128 concurrent streaming clients of mixed lengths against a KV pool small
//! enough to force preemption, a quarter of them hanging up at random points. No 5xx, every
//! surviving stream complete and correct, and afterwards no block or sequence left behind.

mod common;

use common::*;
use futures::StreamExt;
use inferd::config::EngineSettings;
use serde_json::{json, Value};

const NAME: &str = "smol";
const PROMPTS: [&str; 8] = [
    "Tell me about the sea.",
    "Describe a city at night in detail, with its lights, sounds and people.",
    "What is bread?",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Explain gravity.",
    "List some animals that live in the forest and what they eat.",
    "Why is the sky blue?",
    "Give advice to a new programmer.",
];
const LENGTHS: [u32; 4] = [8, 16, 32, 64];

fn body(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
           "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
}

struct Outcome {
    status: u16,
    text: String,
    finish: Option<String>,
    completion_tokens: Option<u64>,
    done: bool,
}

/// Stream one request; with `hang_up_after`, drop the connection after that many events.
async fn run(b: Value, hang_up_after: Option<usize>) -> Outcome {
    let resp = client()
        .post(format!("{}/v1/chat/completions", base()))
        .json(&b)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let mut out = Outcome {
        status,
        text: String::new(),
        finish: None,
        completion_tokens: None,
        done: false,
    };
    if status != 200 {
        return out;
    }
    let mut stream = resp.bytes_stream();
    let mut raw = String::new();
    while let Some(chunk) = stream.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("body")));
        if hang_up_after.is_some_and(|n| raw.matches("data:").count() >= n) {
            return out; // dropping the stream closes the connection mid-generation
        }
    }
    for d in sse_data(&raw) {
        if d == "[DONE]" {
            out.done = true;
            continue;
        }
        let c: Value = serde_json::from_str(&d).expect("chunk JSON");
        assert!(c.get("error").is_none(), "error event: {c}");
        if let Some(ch) = c["choices"].as_array().and_then(|a| a.first()) {
            out.text
                .push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = ch["finish_reason"].as_str() {
                out.finish = Some(f.to_string());
            }
        }
        if let Some(n) = c["usage"]["completion_tokens"].as_u64() {
            out.completion_tokens = Some(n);
        }
    }
    out
}

fn base() -> &'static str {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        start(config(
            model_path(SMOLLM),
            NAME,
            EngineSettings {
                max_num_seqs: 32,
                max_num_batched_tokens: 256,
                block_size: 16,
                // 48 blocks (768 token slots) for up to 32 running sequences of ~40-110 tokens:
                // 30 layers x 192 K and 192 V values x 2 bytes (f16) per token.
                kv_cache_memory: Some(48 * 16 * 23_040),
                max_model_len: Some(256),
                max_waiting_requests: 256,
                enable_prefix_caching: true,
                device: inferd::config::DeviceSpec::Cpu,
                gpu_memory_utilization: 0.9,
                kv_cache_dtype: inferd::config::KvCacheDtype::F16,
                quantize: None,
            },
        ))
    })
}

#[tokio::test]
async fn many_streams_with_disconnects_under_preemption() {
    // References: each prompt alone, at the longest length (shorter ones are its prefixes).
    let mut reference = Vec::new();
    for p in PROMPTS {
        let o = run(body(p, 64), None).await;
        assert_eq!((o.status, o.completion_tokens), (200, Some(64)));
        reference.push(o.text);
    }

    // A fixed pseudo-random plan: prompt, length, and whether/when the client hangs up.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let plan: Vec<(usize, u32, Option<usize>)> = (0..128)
        .map(|i| {
            let p = rnd(8) as usize;
            let len = LENGTHS[rnd(4) as usize];
            let hang = (i % 4 == 0).then(|| 2 + rnd(12) as usize);
            (p, len, hang)
        })
        .collect();
    let outcomes = futures::future::join_all(
        plan.iter()
            .map(|&(p, len, hang)| run(body(PROMPTS[p], len), hang)),
    )
    .await;

    let mut completed = 0;
    for ((p, len, hang), o) in plan.iter().zip(&outcomes) {
        assert_eq!(o.status, 200, "no 5xx (nor any other error) under load");
        if hang.is_some() {
            continue;
        }
        completed += 1;
        assert!(o.done, "stream ended with [DONE]");
        assert_eq!(o.finish.as_deref(), Some("length"));
        assert_eq!(o.completion_tokens, Some(*len as u64));
        assert!(
            reference[*p].starts_with(&o.text),
            "prompt {p} at {len} tokens diverged:\n{:?}\nvs\n{:?}",
            o.text,
            reference[*p]
        );
    }
    assert_eq!(completed, 96);

    let s = wait_until_idle(base()).await;
    assert_eq!(s["num_kv_sequences"], 0, "{s}");
    assert_eq!(s["num_running"], 0, "{s}");
    assert_eq!(s["num_free_blocks"], s["num_total_blocks"], "{s}");
    assert_eq!(s["kv_cache_usage"], 0.0, "{s}");
    assert!(
        s["num_preemptions"].as_u64().unwrap() > 0,
        "the pool was meant to force preemption: {s}"
    );
    let metrics = metrics_text(base()).await;
    let usage = metrics
        .lines()
        .find(|l| l.starts_with("vllm:kv_cache_usage_perc{"))
        .expect("kv usage gauge");
    assert!(usage.ends_with(" 0"), "{usage}");
    let aborts = metric(
        &metrics,
        "vllm:request_success_total",
        &["finished_reason=\"abort\""],
    );
    assert!(
        aborts.is_some_and(|n| n > 0.0),
        "disconnects are counted as aborts: {aborts:?}"
    );
    eprintln!("load test: {s}");
}
