//! Two models in one daemon: each has its own engine and KV pool and answers by its own name.

mod common;

use common::*;
use inferd::config::{Config, ModelConfig};
use serde_json::json;

#[tokio::test]
async fn two_models_served_at_once_route_by_name() {
    let model = |file: &str, name: &str| ModelConfig {
        chat_template: None,
        path: model_path(file),
        served_model_name: name.into(),
        engine: inferd::config::EngineSettings {
            kv_cache_memory: Some(64 << 20),
            max_model_len: Some(1024),
            ..default_engine()
        },
    };
    let base = start(Config {
        models: vec![model(QWEN, "qwen"), model(SMOLLM, "smol")],
        ..config(model_path(QWEN), "unused", default_engine())
    });

    let (_, v) = get(&base, "/v1/models").await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen", "smol"]);

    let ask = |name: &str| {
        json!({"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "temperature": 0, "max_tokens": 12})
    };
    let (qb, sb) = (ask("qwen"), ask("smol"));
    let (q, s) = tokio::join!(chat_text(&base, &qb), chat_text(&base, &sb));
    assert!(q.contains("Paris"), "{q}");
    assert!(!s.is_empty());

    // Each engine counted only its own request.
    let (_, stats) = get(&base, "/stats").await;
    let models = stats["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        assert!(
            m["engine"]["generation_tokens"].as_u64().unwrap() > 0,
            "{m}"
        );
        assert!(
            m["engine"]["generation_tokens"].as_u64().unwrap() <= 12,
            "{m}"
        );
    }
    let (status, v) = post(&base, "/v1/chat/completions", &ask("llama")).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
}
