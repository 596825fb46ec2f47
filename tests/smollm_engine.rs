//! The engine under pressure, on the real SmolLM2-135M GGUF (Llama architecture): a KV pool so
//! small that sequences are preempted and recomputed, a waiting queue that fills up, and
//! prompts that can never fit.

mod common;

use std::sync::OnceLock;

use common::*;
use inferd::config::EngineSettings;
use serde_json::{json, Value};

const NAME: &str = "smollm2";
/// SmolLM2-135M with the CPU default f16 cache: 30 layers × 3 KV heads × 64 dims × K and V ×
/// 2 bytes = 23,040 bytes a token.
const BYTES_PER_TOKEN: u64 = 23_040;

/// 16 blocks of 16 tokens: four 100-token sequences cannot all be resident at once.
fn tiny_pool() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        start(config(
            model_path(SMOLLM),
            NAME,
            EngineSettings {
                max_num_seqs: 8,
                max_num_batched_tokens: 64,
                block_size: 16,
                kv_cache_memory: Some(16 * 16 * BYTES_PER_TOKEN),
                max_model_len: None,
                max_waiting_requests: 64,
                enable_prefix_caching: true,
                device: inferd::config::DeviceSpec::Cpu,
                gpu_memory_utilization: 0.9,
                kv_cache_dtype: inferd::config::KvCacheDtype::Auto,
                quantize: None,
            },
        ))
    })
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": NAME, "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max_tokens, "ignore_eos": true})
}

#[tokio::test]
async fn loads_and_generates() {
    let (status, v) = post(
        tiny_pool(),
        "/v1/chat/completions",
        &chat("Hello! Who are you?", 12),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn preemption_by_recompute_is_invisible() {
    let base = tiny_pool();
    let prompts = [
        "Tell me about the moon.",
        "Describe a cat.",
        "What is rain?",
        "Give me a recipe for bread.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(chat_text(base, &chat(p, 64)).await);
    }
    let before = engine_stats(base).await["num_preemptions"]
        .as_u64()
        .unwrap();
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|p| async move { chat_text(base, &chat(p, 64)).await }),
    )
    .await;
    let after = wait_until_idle(base).await;
    assert!(
        after["num_preemptions"].as_u64().unwrap() > before,
        "the pool was meant to force preemption: {after}"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "prompt {i} changed under preemption");
    }
    assert_eq!(
        after["num_free_blocks"], after["num_total_blocks"],
        "{after}"
    );
}

/// A seeded, sampled request whose output must follow `schema`.
fn constrained(content: &str, seed: u64, schema: &Value) -> Value {
    json!({"model": NAME, "messages": [{"role": "user", "content": content}],
           "temperature": 0.8, "seed": seed, "max_tokens": 120, "ignore_eos": true,
           "response_format": {"type": "json_schema",
                               "json_schema": {"name": "answer", "schema": schema}}})
}

/// Grammar-constrained requests batched with plain ones, and preempted and recomputed, give the
/// tokens they give alone; every constrained output parses and follows its schema, and a
/// completed grammar ends the sequence even with `ignore_eos`.
#[tokio::test]
async fn constrained_requests_batch_and_preempt_like_plain_ones() {
    let base = tiny_pool();
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "maxItems": 4,
                 "items": {"type": "string", "enum": ["small", "furry", "fast", "loud"]}}},
        "required": ["name", "tags"], "additionalProperties": false});
    let regex = json!({"model": NAME, "prompt": "My phone number is", "max_tokens": 30,
                       "temperature": 0.9, "seed": 5,
                       "structured_outputs": {"regex": "[0-9]{3}-[0-9]{3}-[0-9]{4}"}});
    let requests = [
        (
            "/v1/chat/completions",
            constrained("Describe a cat as JSON.", 1, &schema),
        ),
        ("/v1/chat/completions", chat("Tell me about the moon.", 100)),
        (
            "/v1/chat/completions",
            constrained("Describe a dog as JSON.", 2, &schema),
        ),
        ("/v1/completions", regex),
        ("/v1/chat/completions", chat("Describe a cat.", 100)),
        ("/v1/chat/completions", chat("What is rain?", 100)),
    ];
    let text = |v: &Value| {
        let c = &v["choices"][0];
        c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut alone = Vec::new();
    for (path, body) in &requests {
        let (s, v) = post(base, path, body).await;
        assert_eq!(s, 200, "{v}");
        alone.push(v);
    }
    for v in [&alone[0], &alone[2]] {
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let out: Value = serde_json::from_str(&text(v)).expect("the output is JSON");
        assert!(out["name"].as_str().unwrap().chars().count() <= 24, "{out}");
        for t in out["tags"].as_array().unwrap() {
            assert!(
                ["small", "furry", "fast", "loud"].contains(&t.as_str().unwrap()),
                "{out}"
            );
        }
    }
    let phone = text(&alone[3]);
    assert!(
        phone.len() == 12 && phone.chars().filter(|c| c.is_ascii_digit()).count() == 10,
        "{phone}"
    );
    let before = engine_stats(base).await["num_preemptions"]
        .as_u64()
        .unwrap();
    let together = futures::future::join_all(
        requests
            .iter()
            .map(|(path, body)| async move { post(base, path, body).await.1 }),
    )
    .await;
    let after = wait_until_idle(base).await;
    assert!(
        after["num_preemptions"].as_u64().unwrap() > before,
        "the pool was meant to force preemption: {after}"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(text(a), text(t), "request {i} changed when batched");
    }
    // A constraint the vocabulary cannot spell (no SmolLM2 token holds the byte 0xF2 that
    // U+A84F8 begins with) is the client's 400, naming its field, not a 500.
    let mut unspellable = chat("Say it.", 8);
    unspellable["guided_choice"] = json!(["\u{A84F8}"]);
    let (s, v) = post(base, "/v1/chat/completions", &unspellable).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("guided_choice")),
        "{v}"
    );
    // This model's template has no tool format: the generic JSON protocol stands in, and its
    // calls are as valid as a native format's, streamed or not.
    let mut with_tools = chat("What is the weather in Paris?", 80);
    with_tools["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": false}}}]);
    with_tools["tool_choice"] = json!("required");
    let (s, v) = post(base, "/v1/chat/completions", &with_tools).await;
    assert_eq!(s, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], Value::Null, "{v}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(
        args["city"].as_str().unwrap().chars().count() <= 20,
        "{args}"
    );
    streamed_calls_add_up(base, with_tools, &v).await;
}

/// `body` streamed: its tool-call deltas add up to the calls of `whole`, its blocking reply.
async fn streamed_calls_add_up(base: &str, mut body: Value, whole: &Value) {
    body["stream"] = json!(true);
    let (s, text, _) = stream_body(base, "/v1/chat/completions", &body).await;
    assert_eq!(s, 200);
    let (mut name, mut arguments) = (String::new(), String::new());
    for d in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        for t in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            name.push_str(t["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(t["function"]["arguments"].as_str().unwrap());
        }
    }
    let calls = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    let folded: (String, String) = calls.iter().fold(Default::default(), |(n, a), c| {
        (
            n + c["function"]["name"].as_str().unwrap(),
            a + c["function"]["arguments"].as_str().unwrap(),
        )
    });
    assert_eq!(
        (name, arguments),
        folded,
        "the stream adds up to the whole reply"
    );
}

/// GLM-4's tool format end to end on a real vocabulary: SmolLM2 served with `--chat-template`
/// set to GLM-4-0414's real template (tools in the template's `tools`) and to
/// glm-4-9b-chat-hf's (tools on a system item), from the tool fixtures. Required and named
/// calls are forced into GLM-4's `name\n{arguments}` and come back as `tool_calls` (the
/// stream adding up to the whole), and a history of a call and its result renders as
/// transformers renders it and is served.
#[tokio::test]
async fn glm4_tool_calls_through_a_chat_template_override() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates_tools.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in ["glm-4-0414 single", "glm-4-hf single"] {
        let c = cases.iter().find(|c| c["name"] == case).unwrap();
        let mut cfg = config(model_path(SMOLLM), NAME, default_engine());
        cfg.models[0].chat_template = Some(c["template"].as_str().unwrap().to_string());
        let base = start(cfg);
        // The prompt the served chat makes of the fixture's wire messages and tools (/tokenize
        // renders as chat does) is transformers' rendering.
        let (s, v) = post(
            &base,
            "/tokenize",
            &json!({"messages": c["messages"], "tools": c["tools"]}),
        )
        .await;
        assert_eq!(s, 200, "{case}: {v}");
        let (_, text) = post(&base, "/detokenize", &json!({"tokens": v["tokens"]})).await;
        assert_eq!(text["prompt"], c["expected"], "{case}");
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"], "additionalProperties": false}}},
            {"type": "function", "function": {"name": "get_time"}}]);
        let mut req = chat("What is the weather in Paris?", 60);
        req["tools"] = tools.clone();
        req["tool_choice"] = json!("required");
        let (s, v) = post(&base, "/v1/chat/completions", &req).await;
        assert_eq!(s, 200, "{case}: {v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{case}: {v}");
        assert_eq!(choice["message"]["content"], Value::Null, "{case}: {v}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "one call per GLM-4 turn: {v}");
        let f = &calls[0]["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        match f["name"].as_str().unwrap() {
            "get_weather" => assert!(args["city"].as_str().unwrap().chars().count() <= 20),
            "get_time" => assert_eq!(args, json!({}), "{case}"),
            other => panic!("{case}: called {other}"),
        }
        streamed_calls_add_up(&base, req.clone(), &v).await;

        // The tokens sampled are GLM-4's own call: the name on a line, then the arguments.
        req["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
        req["logprobs"] = json!(true);
        let (s, v) = post(&base, "/v1/chat/completions", &req).await;
        assert_eq!(s, 200, "{case}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{case}: {v}");
        let f = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(
            (f["name"].as_str(), f["arguments"].as_str()),
            (Some("get_time"), Some("{}"))
        );
        let sampled: String = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert!(
            ["get_time\n{}", "get_time \n{}"].contains(&sampled.as_str()),
            "{case}: {sampled:?}"
        );

        // A finished call and its result in the history, then an answer without tools.
        let history = json!({"model": NAME, "temperature": 0, "max_tokens": 8, "tools": tools,
            "tool_choice": "none", "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]});
        let (s, v) = post(&base, "/v1/chat/completions", &history).await;
        assert_eq!(s, 200, "{case}: {v}");
        assert!(
            v["choices"][0]["message"]["content"].is_string(),
            "{case}: {v}"
        );
        assert!(
            v["choices"][0]["message"]["tool_calls"].is_null(),
            "{case}: {v}"
        );
    }
}

#[tokio::test]
async fn a_prompt_that_can_never_fit_is_a_400() {
    let base = tiny_pool();
    let (_, models) = get(base, "/v1/models").await;
    let max_len = models["data"][0]["max_model_len"].as_u64().unwrap();
    assert_eq!(max_len, 256, "max_model_len is capped by the pool");
    let (s, v) = post(base, "/v1/chat/completions", &chat("hi", 300)).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post(
        base,
        "/v1/completions",
        &json!({"model": NAME, "prompt": "x ".repeat(400)}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_openai_error(&v);

    // Text that cannot fit whatever its tokens is refused before it is tokenized (a byte-level
    // BPE token stands for a bounded number of bytes), on every route that tokenizes.
    let huge = "lorem ipsum ".repeat(400_000);
    for (path, body) in [
        ("/tokenize", json!({"prompt": huge})),
        ("/v1/completions", json!({"model": NAME, "prompt": huge})),
        ("/v1/chat/completions", chat(&huge, 4)),
    ] {
        let (s, v) = post(base, path, &body).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("bytes of text cannot fit"), "{path}: {msg}");
    }
}

#[tokio::test]
async fn the_bench_client_measures_a_run() {
    let args = inferd::bench::BenchArgs {
        base_url: tiny_pool().to_string(),
        model: None,
        concurrency: vec![3],
        num_requests: 6,
        requests_per_stream: None,
        prompt_tokens: 32,
        max_tokens: 16,
        stream: true,
        seed: 0,
        limits: inferd::config::ClientLimits {
            request_timeout: 120,
            max_duration: 600,
            allow_remote: false,
        },
        response_format: None,
        tools: None,
        serve: Default::default(),
    };
    let r = inferd::bench::run(&args).await.unwrap().remove(0);
    assert_eq!(r.model, NAME);
    assert_eq!((r.completed, r.failed), (6, 0));
    assert_eq!(r.total_input_tokens, 6 * 32);
    assert_eq!(
        r.total_output_tokens,
        6 * 16,
        "usage from the stream counts every token"
    );
    assert!(r.ttft.mean_ms > 0.0 && r.ttft.mean_ms <= r.e2el.mean_ms);
    assert!(r.output_throughput > 0.0 && r.itl.median_ms > 0.0);

    // --response-format: every request constrained; the server counts its guided tokens.
    let guided = |v: &Value| v["guided_tokens"].as_u64().unwrap();
    let before = guided(&engine_stats(tiny_pool()).await);
    let schema =
        r#"{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}"#;
    let args = inferd::bench::BenchArgs {
        response_format: Some(schema.into()),
        ..args
    };
    let r = inferd::bench::run(&args).await.unwrap().remove(0);
    assert_eq!((r.completed, r.failed), (6, 0));
    let after = engine_stats(tiny_pool()).await;
    assert!(
        guided(&after) >= before + r.total_output_tokens as u64,
        "{after}"
    );
    assert!(after["guide_seconds"].as_f64().unwrap() > 0.0);

    // --tools: chat requests whose every reply is a constrained call.
    let tools = r#"[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]"#;
    let args = inferd::bench::BenchArgs {
        response_format: None,
        tools: Some(tools.into()),
        ..args
    };
    let r = inferd::bench::run(&args).await.unwrap().remove(0);
    assert_eq!((r.completed, r.failed), (6, 0));
    assert!(r.total_output_tokens > 0 && r.total_input_tokens > 6 * 32);
}

/// `inferd bench --self-serve` on a synthetic model: the numerics check (here the tensor cache
/// path against the host kernel, both on the CPU), an in-process daemon, two levels.
#[tokio::test]
async fn self_serve_bench_checks_numerics_and_runs_every_level() {
    let mut serve = inferd::bench::self_serve::SelfServeArgs {
        self_serve: true,
        synthetic_model: Some("tiny".into()),
        device: "cpu".into(),
        max_num_batched_tokens: 64,
        ..Default::default()
    };
    let args = inferd::bench::BenchArgs {
        base_url: "http://127.0.0.1:1".into(),
        model: None,
        concurrency: vec![1, 3],
        num_requests: 6,
        requests_per_stream: None,
        prompt_tokens: 40,
        max_tokens: 12,
        stream: true,
        seed: 0,
        limits: inferd::config::ClientLimits {
            request_timeout: 120,
            max_duration: 600,
            allow_remote: false,
        },
        response_format: None,
        tools: None,
        serve: serve.clone(),
    };
    let o = inferd::bench::self_serve::run(&args).await.unwrap();
    let c = o.check.expect("the check runs unless --no-check");
    assert_eq!((c.steps, c.top1_agree), (9, 9), "{c:?}");
    assert!(c.passed && c.max_abs_diff < 1e-4, "{c:?}");
    assert_eq!(o.reports.len(), 2);
    for (r, c) in o.reports.iter().zip([1, 3]) {
        assert_eq!(r.concurrency, c);
        assert_eq!((r.completed, r.failed), (6, 0), "{r:?}");
        assert_eq!(r.total_output_tokens, 6 * 12);
    }

    // MLA + MoE (DeepSeek-V2 style): the same check and a level.
    let moe = inferd::bench::BenchArgs {
        concurrency: vec![2],
        num_requests: 2,
        serve: inferd::bench::self_serve::SelfServeArgs {
            synthetic_model: Some("tiny-moe".into()),
            ..serve.clone()
        },
        ..args.clone()
    };
    let o = inferd::bench::self_serve::run(&moe).await.unwrap();
    let c = o.check.unwrap();
    assert!(
        c.passed && c.max_abs_diff < 1e-4 && c.top1_agree == 9,
        "{c:?}"
    );
    assert_eq!((o.reports[0].completed, o.reports[0].failed), (2, 0));

    serve.synthetic_model = Some("no-such-shape".into());
    let bad = inferd::bench::BenchArgs { serve, ..args };
    let e = inferd::bench::self_serve::run(&bad).await.err().unwrap();
    assert!(format!("{e:#}").contains("presets: tiny"), "{e:#}");
}
