//! Batch invariance, end to end: a seeded, sampled request gives the same tokens alone, after a
//! prefix-cache hit, amid 15 other random requests, and with its prompt prefilled in small
//! chunks on a daemon with a tiny `max_num_batched_tokens`.

mod common;

use std::sync::OnceLock;

use common::*;
use inferd::config::EngineSettings;
use serde_json::{json, Value};

fn server(budget: usize) -> String {
    start(config(
        model_path(SMOLLM),
        "smol",
        EngineSettings {
            max_num_batched_tokens: budget,
            kv_cache_memory: Some(64 << 20),
            max_model_len: Some(1024),
            ..default_engine()
        },
    ))
}

fn wide() -> &'static str {
    static B: OnceLock<String> = OnceLock::new();
    B.get_or_init(|| server(512))
}

fn chunked() -> &'static str {
    static B: OnceLock<String> = OnceLock::new();
    B.get_or_init(|| server(16))
}

fn seeded(prompt: &str, seed: u64) -> Value {
    json!({"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
           "temperature": 0.9, "top_p": 0.95, "seed": seed, "ignore_eos": true})
}

#[tokio::test]
async fn a_seeded_request_is_identical_alone_batched_chunked_and_cached() {
    let prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle. \
                  Include the weather, the sea, and what the message says.";
    let req = seeded(prompt, 1234);
    let alone = chat_text(wide(), &req).await;
    let after_prefix_hit = chat_text(wide(), &req).await;
    assert_eq!(alone, after_prefix_hit, "after a prefix hit");

    let others: Vec<Value> = (0..15)
        .map(|i| {
            seeded(
                &format!(
                    "Request {i}: name {} things that are {}.",
                    i + 2,
                    ["red", "loud", "old"][i % 3]
                ),
                i as u64,
            )
        })
        .collect();
    let mut all = vec![chat_text(wide(), &req)];
    // Each future borrows its own body; the target request is first.
    let rest: Vec<_> = others.iter().map(|b| chat_text(wide(), b)).collect();
    all.extend(rest);
    let results = futures::future::join_all(all).await;
    assert_eq!(results[0], alone, "amid 15 other requests");

    let stats_before = engine_stats(chunked()).await;
    let chunked_text = chat_text(chunked(), &req).await;
    let stats_after = engine_stats(chunked()).await;
    assert!(
        stats_after["num_steps"].as_u64().unwrap() - stats_before["num_steps"].as_u64().unwrap()
            > 40,
        "the prompt was prefilled over several steps"
    );
    assert_eq!(chunked_text, alone, "prefilled in 16-token chunks");
}
