//! Shared test harness: one daemon per test binary, started in-process on port 0 with its own
//! runtime so it outlives each `#[tokio::test]`'s runtime.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use inferd::config::{Config, EngineSettings, ModelConfig};
use serde_json::Value;

pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn model_path(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh (the README's test command does)",
        p.display()
    );
    p
}

pub fn config(model: PathBuf, name: &str, engine: EngineSettings) -> Config {
    Config {
        host: "127.0.0.1".into(),
        port: 0,
        api_key: None,
        drain_delay: Duration::ZERO,
        threads: None,
        shutdown_timeout: Duration::from_secs(30),
        connection_limits: Default::default(),
        allowed_origins: Vec::new(),
        models: vec![ModelConfig {
            chat_template: None,
            path: model,
            served_model_name: name.into(),
            engine,
        }],
    }
}

pub fn default_engine() -> EngineSettings {
    EngineSettings {
        max_num_seqs: 32,
        max_num_batched_tokens: 512,
        block_size: 16,
        kv_cache_memory: Some(256 << 20),
        max_model_len: Some(4096),
        max_waiting_requests: 256,
        enable_prefix_caching: true,
        device: inferd::config::DeviceSpec::Cpu,
        gpu_memory_utilization: 0.9,
        kv_cache_dtype: inferd::config::KvCacheDtype::Auto,
        quantize: None,
    }
}

/// Start a daemon for `config` on a background thread; returns its base URL.
pub fn start(config: Config) -> String {
    let opts = inferd::ServeOptions::from(&config);
    start_with(config, opts)
}

/// [`start`] with explicit server options (timeouts, connection cap).
pub fn start_with(config: Config, opts: inferd::ServeOptions) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let state = tokio::task::spawn_blocking(move || inferd::load(&config))
                .await
                .expect("join")
                .expect("load model");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tx.send(format!("http://{addr}")).expect("send addr");
            inferd::serve(state, listener, std::future::pending(), opts)
                .await
                .expect("serve");
        });
    });
    rx.recv_timeout(Duration::from_secs(300))
        .expect("server start")
}

/// A spawned `inferd serve`, killed if a test ends before it exits.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary on `model` (served as `name`) on a free port, with `extra` flags and `env`;
/// returns once it is ready, with its base URL.
pub fn spawn_serve(
    model: &std::path::Path,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Daemon, String) {
    use std::io::{BufRead, BufReader};
    let mut daemon = Daemon(
        std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["serve", "--port", "0", "--served-model-name", name])
            .args(extra)
            .arg("--model")
            .arg(model)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn inferd"),
    );
    let stderr = daemon.0.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut base = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("inferd did not start");
        if let Some(rest) = line.split("listening on ").nth(1) {
            base = Some(rest.trim().to_string());
        }
        if line.contains("ready: serving the API") {
            break;
        }
    }
    (
        daemon,
        base.expect("the address is logged before the models load"),
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// POST `body` as JSON to `{base}{path}`; the response, unread (streams included).
pub async fn send(base: &str, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("request")
}

pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = send(base, path, body).await;
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.expect("json body");
    (status, v)
}

pub async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.expect("json body"))
}

/// Poll `GET {base}/ready` (bounded: 30 s) until it answers `status`; returns its body.
pub async fn wait_for_ready_status(base: &str, status: u16) -> Value {
    let mut last = (0, Value::Null);
    for _ in 0..1200 {
        last = get(base, "/ready").await;
        if last.0 == status {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("/ready did not answer {status}; last {last:?}");
}

/// The assistant text of a successful chat completion.
pub async fn chat_text(base: &str, body: &Value) -> String {
    let (status, v) = post(base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .flat_map(|ev| ev.lines())
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.to_string())
        .collect()
}

pub async fn stream_body(base: &str, path: &str, body: &Value) -> (u16, String, Option<String>) {
    let r = send(base, path, body).await;
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string());
    (status, r.text().await.expect("body"), ctype)
}

/// Engine counters of the first served model.
pub async fn engine_stats(base: &str) -> Value {
    let (_, v) = get(base, "/stats").await;
    v["models"][0]["engine"].clone()
}

/// Wait (bounded: 2 minutes) until the engine holds no sequence and every block is free. Other
/// tests of the same binary may share the daemon, so this waits for theirs to finish too.
pub async fn wait_until_idle(base: &str) -> Value {
    let mut s = engine_stats(base).await;
    for _ in 0..4800 {
        if s["num_kv_sequences"] == 0
            && s["num_running"] == 0
            && s["num_waiting"] == 0
            && s["num_free_blocks"] == s["num_total_blocks"]
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        s = engine_stats(base).await;
    }
    s
}

pub fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "no error.message in {v}");
    assert!(e["type"].is_string(), "no error.type in {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "no param/code in {v}"
    );
}

/// One sequence's part of a hand-built batch: its new tokens start at `start` (positions
/// `start..start + new.len()`), its blocks are `table`, and it wants the last row's logits.
pub struct SeqPart {
    pub new: Vec<u32>,
    pub start: usize,
    pub table: Vec<u32>,
}

pub fn batch_of(parts: &[SeqPart], block_size: usize) -> inferd::models::ForwardBatch {
    let mut b = inferd::models::ForwardBatch::new(block_size);
    for p in parts {
        b.push_sequence(&p.new, p.start, &p.table);
    }
    b
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Tiny random-weight checkpoints in Hugging Face layout.
pub mod tiny {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{Device, Tensor};

    pub const H: usize = 64;
    pub const HEADS: usize = 4;
    pub const KV_HEADS: usize = 2;
    pub const INTER: usize = 128;
    pub const LAYERS: usize = 2;

    /// Deterministic pseudo-random values in [-scale, scale].
    pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    pub fn write_checkpoint(dir: &Path, qwen2: bool, vocab: usize) {
        write_variant(dir, qwen2, vocab, false, serde_json::json!({}));
    }

    /// With `tied`, no `lm_head.weight` (the embeddings are the output head); `extra` keys are
    /// merged into config.json.
    pub fn write_variant(
        dir: &Path,
        qwen2: bool,
        vocab: usize,
        tied: bool,
        extra: serde_json::Value,
    ) {
        let dev = Device::Cpu;
        let mut seed = 0;
        let mut t = |shape: &[usize], scale: f32, offset: f32| {
            seed += 1;
            let n = shape.iter().product();
            let v: Vec<f32> = values(n, seed, scale)
                .into_iter()
                .map(|x| x + offset)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let hd = H / HEADS;
        let mut w: HashMap<String, Tensor> = HashMap::new();
        w.insert("model.embed_tokens.weight".into(), t(&[vocab, H], 1.0, 0.0));
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            w.insert(format!("{p}.input_layernorm.weight"), t(&[H], 0.2, 1.0));
            w.insert(
                format!("{p}.post_attention_layernorm.weight"),
                t(&[H], 0.2, 1.0),
            );
            w.insert(
                format!("{p}.self_attn.q_proj.weight"),
                t(&[HEADS * hd, H], 0.25, 0.0),
            );
            w.insert(
                format!("{p}.self_attn.k_proj.weight"),
                t(&[KV_HEADS * hd, H], 0.25, 0.0),
            );
            w.insert(
                format!("{p}.self_attn.v_proj.weight"),
                t(&[KV_HEADS * hd, H], 0.25, 0.0),
            );
            w.insert(
                format!("{p}.self_attn.o_proj.weight"),
                t(&[H, HEADS * hd], 0.25, 0.0),
            );
            if qwen2 {
                w.insert(
                    format!("{p}.self_attn.q_proj.bias"),
                    t(&[HEADS * hd], 0.5, 0.0),
                );
                w.insert(
                    format!("{p}.self_attn.k_proj.bias"),
                    t(&[KV_HEADS * hd], 0.5, 0.0),
                );
                w.insert(
                    format!("{p}.self_attn.v_proj.bias"),
                    t(&[KV_HEADS * hd], 0.5, 0.0),
                );
            }
            w.insert(
                format!("{p}.mlp.gate_proj.weight"),
                t(&[INTER, H], 0.2, 0.0),
            );
            w.insert(format!("{p}.mlp.up_proj.weight"), t(&[INTER, H], 0.2, 0.0));
            w.insert(
                format!("{p}.mlp.down_proj.weight"),
                t(&[H, INTER], 0.2, 0.0),
            );
        }
        w.insert("model.norm.weight".into(), t(&[H], 0.2, 1.0));
        if !tied {
            w.insert("lm_head.weight".into(), t(&[vocab, H], 0.3, 0.0));
        }
        candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
        let arch = if qwen2 {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let mut cfg = serde_json::json!({
            "architectures": [arch], "hidden_size": H, "intermediate_size": INTER, "vocab_size": vocab,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-6, "rope_theta": if qwen2 { 1_000_000.0 } else { 10_000.0 },
            "max_position_embeddings": 512, "tie_word_embeddings": tied,
            "sliding_window": 512, "max_window_layers": LAYERS, "use_sliding_window": false,
            "hidden_act": "silu"
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            cfg[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    }
}

/// The value of the Prometheus sample `name{...}` whose labels include every one of `labels`
/// (`key="value"`), in a `/metrics` text.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The daemon's `/metrics` text.
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body")
}
