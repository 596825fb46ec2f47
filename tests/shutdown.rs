//! The `inferd` binary: SIGTERM stops new connections but lets an in-flight stream finish, and
//! the process then exits cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

/// Kills the daemon if the test fails before it exits, so no process outlives the test.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_finishes_in_flight_streams_then_exits() {
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args([
                "serve",
                "--port",
                "0",
                "--served-model-name",
                "smol",
                "--kv-cache-memory",
                "64MiB",
            ])
            .arg("--model")
            .arg(model_path(SMOLLM))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn inferd"),
    );
    let child = &mut daemon.0;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let base = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("inferd did not start");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_string();
        }
    };

    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\"") || text.matches("data:").count() < 3 {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
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

    let mut status = None;
    for _ in 0..400 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status.expect("inferd did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        client().get(format!("{base}/health")).send().await.is_err(),
        "no longer listening"
    );
}
