//! Readiness across a server's life, in process on `synthetic:tiny`: while the models load,
//! `/health` answers 200 and `/ready` and the API 503 (`model_loading`); a keep-alive connection
//! opened then gets the API once they have loaded; a failed load ends the server; after the
//! shutdown signal `/ready` answers 503 (`draining`) while new requests are still served for the
//! drain delay, then the listener closes and in-flight streams run to their end.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use inferd::config::EngineSettings;
use serde_json::{json, Value};

fn tiny_config() -> inferd::config::Config {
    config(
        PathBuf::from("synthetic:tiny"),
        "tiny",
        EngineSettings {
            kv_cache_memory: Some(16 << 20),
            max_model_len: Some(1024),
            ..default_engine()
        },
    )
}

/// One HTTP/1.1 exchange on an open keep-alive connection: the status, the `Retry-After`
/// header if any, and the JSON body.
fn exchange(
    conn: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
) -> (u16, Option<String>, Value) {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: t\r\ncontent-length: 0\r\n\r\n");
    conn.get_mut().write_all(head.as_bytes()).unwrap();
    let mut status_line = String::new();
    conn.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let (mut length, mut retry_after) = (0usize, None);
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap(),
            "retry-after" => retry_after = Some(value.trim().to_string()),
            "connection" => assert_ne!(value.trim(), "close", "the connection stays open"),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).unwrap();
    (status, retry_after, serde_json::from_slice(&body).unwrap())
}

/// Runs `serve_loading` on its own runtime thread (it outlives each test's runtime) and returns
/// the base URL and a receiver of its result.
fn spawn_server<L>(
    load: L,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    opts: inferd::ServeOptions,
) -> (String, std::sync::mpsc::Receiver<anyhow::Result<()>>)
where
    L: std::future::Future<Output = anyhow::Result<inferd::api::AppState>> + Send + 'static,
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let shutdown = async move {
                let _ = shutdown.await;
            };
            let r = inferd::serve_loading(load, listener, shutdown, opts).await;
            let _ = done_tx.send(r);
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    (format!("http://{addr}"), done_rx)
}

async fn load_when(
    go: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<inferd::api::AppState> {
    go.await?;
    tokio::task::spawn_blocking(|| inferd::load(&tiny_config())).await?
}

#[test]
fn while_loading_only_liveness_answers_then_the_same_connection_gets_the_api() {
    let (go, wait) = tokio::sync::oneshot::channel();
    let (_stop, shutdown) = tokio::sync::oneshot::channel();
    let (base, _done) = spawn_server(load_when(wait), shutdown, Default::default());
    let stream = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut conn = BufReader::new(stream);

    let (s, _, v) = exchange(&mut conn, "GET", "/health");
    assert_eq!((s, v["status"].as_str()), (200, Some("loading")), "{v}");
    let (s, retry, v) = exchange(&mut conn, "GET", "/ready");
    assert_eq!((s, v["status"].as_str()), (503, Some("loading")), "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    for (method, path) in [("POST", "/v1/chat/completions"), ("GET", "/v1/models")] {
        let (s, retry, v) = exchange(&mut conn, method, path);
        assert_eq!(s, 503, "{path}: {v}");
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "model_loading", "{v}");
        assert!(retry.is_some(), "{path}: Retry-After");
    }
    let (s, _, v) = exchange(&mut conn, "GET", "/version");
    assert_eq!(s, 200, "{v}");

    go.send(()).unwrap();
    let mut ready = exchange(&mut conn, "GET", "/ready");
    for _ in 0..1200 {
        if ready.0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        ready = exchange(&mut conn, "GET", "/ready");
    }
    assert_eq!((ready.0, ready.2["status"].as_str()), (200, Some("ready")));
    let (s, _, v) = exchange(&mut conn, "GET", "/health");
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, _, v) = exchange(&mut conn, "GET", "/v1/models");
    assert_eq!((s, v["data"][0]["id"].as_str()), (200, Some("tiny")), "{v}");
}

#[test]
fn a_failed_load_ends_the_server_with_its_error() {
    let (_stop, shutdown) = tokio::sync::oneshot::channel();
    let load = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        anyhow::bail!("weights unreadable")
    };
    let (base, done) = spawn_server(load, shutdown, Default::default());
    let r = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the server ended");
    let e = r.expect_err("the load's error is returned");
    assert!(e.to_string().contains("weights unreadable"), "{e}");
    assert!(
        TcpStream::connect(base.trim_start_matches("http://")).is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn draining_answers_not_ready_serves_new_requests_then_stops_listening() {
    let (go, wait) = tokio::sync::oneshot::channel();
    let (stop, shutdown) = tokio::sync::oneshot::channel();
    let opts = inferd::ServeOptions {
        drain_delay: Duration::from_secs(4),
        ..Default::default()
    };
    let (base, done) = spawn_server(load_when(wait), shutdown, opts);
    go.send(()).unwrap();
    wait_for_ready_status(&base, 200).await;

    let body = |stream: bool| {
        json!({"model": "tiny", "prompt": "<1><2><3>", "max_tokens": 64,
               "ignore_eos": true, "temperature": 0, "stream": stream})
    };
    let in_flight = send(&base, "/v1/completions", &body(true)).await;
    assert_eq!(in_flight.status(), 200);
    stop.send(()).unwrap();

    let v = wait_for_ready_status(&base, 503).await;
    assert_eq!(v["status"], "draining", "{v}");
    let (s, v) = get(&base, "/health").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")), "still alive");
    let (s, v) = post(&base, "/v1/completions", &body(false)).await;
    assert_eq!(
        s, 200,
        "a new request during the drain delay is served: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 64);

    let text = in_flight.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");

    let r = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("the server stopped after the drain delay");
    r.expect("a clean stop");
    assert!(
        client().get(format!("{base}/health")).send().await.is_err(),
        "no longer listening"
    );
}
