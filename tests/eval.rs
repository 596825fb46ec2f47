//! `inferd eval` against the default model (Qwen2.5-Coder-0.5B Q4_K_M) served in-process: the
//! built-in suite is asked and scored, a needle sweep at small lengths finds the needle, and
//! report.json, report.md and the PNG heatmap exist and parse. Also: a custom suite with a
//! chosen model, and the loopback guard.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inferd"))
        .arg("eval")
        .args(args)
        .output()
        .expect("run inferd eval")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One daemon for the binary's tests.
fn qwen() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| start(config(model_path(QWEN), "qwen", default_engine())))
        .clone()
}

#[test]
fn eval_scores_the_suite_and_finds_the_needle_at_short_context() {
    let base = qwen();
    let dir = out_dir("eval-default");
    let out = eval(&[
        "--base-url",
        &base,
        "--needle",
        "--needle-lengths",
        "256,512",
        "--needle-depths",
        "0,50,100",
        "--max-tokens",
        "96",
        "--output",
        dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("triangle-hypotenuse") && stdout.contains("passed"),
        "{stdout}"
    );

    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let [model] = report["models"].as_array().unwrap().as_slice() else {
        panic!("one model: {report}")
    };
    assert_eq!(model["model"], "qwen");
    let suite = model["suite"].as_array().unwrap();
    assert_eq!(suite.len(), 10, "the built-in suite");
    assert!(suite
        .iter()
        .all(|q| q["error"].is_null() && q["answer"].as_str().unwrap() != ""));
    let passed = suite.iter().filter(|q| q["passed"] == true).count();
    assert_eq!(model["passed"], passed);
    assert!(passed >= 1, "a real model answers some of it: {suite:?}");

    let needle = &model["needle"];
    let cells = needle["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    for c in cells {
        assert!(c["prompt_tokens"].as_u64().unwrap() >= c["length"].as_u64().unwrap() / 2);
        if c["length"] == 256 {
            assert_eq!(c["score"], 1.0, "found at short context: {c}");
        }
    }
    let png = std::fs::read(dir.join(needle["heatmap"].as_str().unwrap())).unwrap();
    let info = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .expect("a PNG")
        .info()
        .clone();
    assert!(info.width > 300 && info.height > 150);
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("## Needle in a haystack: qwen") && md.contains("| 256 |"),
        "{md}"
    );
}

#[test]
fn a_custom_suite_for_a_chosen_model_and_remote_servers_refused() {
    let base = qwen();
    let dir = out_dir("eval-custom");
    std::fs::create_dir_all(&dir).unwrap();
    let suite = dir.join("suite.jsonl");
    std::fs::write(
        &suite,
        r#"{"id": "echo", "prompt": "Reply with the word banana and nothing else.", "check": {"contains": "banana"}, "max_tokens": 8}
"#,
    )
    .unwrap();
    let out = eval(&[
        "--base-url",
        &base,
        "--model",
        "qwen",
        "--suite",
        suite.to_str().unwrap(),
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["models"][0]["suite"][0]["id"], "echo");
    assert_eq!(report["models"][0]["total"], 1);

    let out = eval(&[
        "--base-url",
        &base,
        "--model",
        "nope",
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model nope"));
    let out = eval(&[
        "--base-url",
        "http://10.255.255.1:8000",
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}
