//! The `inferd` binary: SIGTERM turns `/ready` to 503, serves new requests for the drain delay,
//! then stops new connections but lets an in-flight stream finish, and the process exits
//! cleanly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

/// Start the binary on SmolLM2 with `extra` flags; returns it and its base URL.
fn start_daemon(extra: &[&str]) -> (Daemon, String) {
    let mut args = vec!["--kv-cache-memory", "64MiB"];
    args.extend_from_slice(extra);
    spawn_serve(&model_path(SMOLLM), "smol", &args, &[])
}

fn sigterm(daemon: &Daemon) {
    let killed = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// Wait (bounded) for the process to exit; it must exit successfully.
async fn exits_cleanly(daemon: &mut Daemon) {
    let mut status = None;
    for _ in 0..800 {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status.expect("inferd did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_streams_then_exits() {
    let (mut daemon, base) = start_daemon(&[]);
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = send(&base, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\"") || text.matches("data:").count() < 3 {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }

    sigterm(&daemon);
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let data = sse_data(&text);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "the stream ended cleanly"
    );
    assert!(
        text.contains("\"finish_reason\":\"length\""),
        "the stream ran to completion"
    );

    exits_cleanly(&mut daemon).await;
    assert!(
        client().get(format!("{base}/health")).send().await.is_err(),
        "no longer listening"
    );
}

/// When the grace (`--shutdown-timeout`) is over, each remaining stream ends with an error event
/// in OpenAI's shape and `[DONE]`, a remaining non-streaming request gets a 503, and the process
/// exits cleanly.
#[tokio::test]
async fn streams_still_running_when_the_grace_ends_get_an_error_event_and_done() {
    let (mut daemon, base) = start_daemon(&["--shutdown-timeout", "1"]);
    let long = |stream: bool| {
        json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}],
               "max_tokens": 2000, "temperature": 0, "ignore_eos": true, "stream": stream})
    };
    let url = format!("{base}/v1/chat/completions");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let resp = client().post(&url).json(&long(true)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    let whole = tokio::spawn({
        let url = url.clone();
        async move { client().post(&url).json(&long(false)).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&daemon);
    for resp in streams {
        let text = resp.text().await.expect("a complete body");
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let error: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(error["error"]["code"], "shutting_down", "{error}");
        assert!(
            !text.contains("finish_reason\":\"length"),
            "cut before its end"
        );
    }
    let whole = whole.await.unwrap();
    assert_eq!(whole.status(), 503);
    let v: serde_json::Value = whole.json().await.unwrap();
    assert_openai_error(&v);
    exits_cleanly(&mut daemon).await;
}

/// With `--drain-delay`, SIGTERM turns `/ready` to 503 at once while the API still answers; the
/// process then stops and exits cleanly.
#[tokio::test]
async fn sigterm_with_a_drain_delay_turns_ready_off_and_keeps_serving() {
    let (mut daemon, base) = start_daemon(&["--drain-delay", "3"]);
    let (s, v) = get(&base, "/ready").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ready")));
    sigterm(&daemon);
    let v = wait_for_ready_status(&base, 503).await;
    assert_eq!(v["status"], "draining", "{v}");
    let (s, v) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(s, 200, "still serving during the drain delay: {v}");
    exits_cleanly(&mut daemon).await;
}
