//! Serving a Hugging Face model directory end to end: safetensors weights, config.json,
//! tokenizer.json and the chat template from tokenizer_config.json.

mod common;

use std::path::Path;

use common::tiny::write_checkpoint;
use common::*;
use serde_json::json;

/// GPT-2's byte → printable character table used by byte-level BPE vocabularies.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut extra = 0;
    let mut out = vec!['\0'; 256];
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            out[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        } else {
            out[b as usize] = char::from_u32(b).unwrap();
        }
    }
    out
}

fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (id, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    vocab.insert("<|im_start|>".into(), json!(256));
    vocab.insert("<|im_end|>".into(), json!(257));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let cfg = json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": null});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

#[tokio::test]
async fn serves_a_hugging_face_directory() {
    let dir = std::env::temp_dir().join(format!("inferd-hfdir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_checkpoint(&dir, true, 258);
    write_tokenizer(&dir);
    let base = start(config(dir.clone(), "tiny-qwen2", default_engine()));

    let (s, v) = get(&base, "/v1/models").await;
    assert_eq!(s, 200);
    assert_eq!(v["data"][0]["id"], "tiny-qwen2");

    let body = json!({"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (s, v) = post(&base, "/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "{v}");
    // "<|im_start|>" "user\nhi" (7 bytes) "<|im_end|>" "\n" "<|im_start|>" "assistant\n" (10 bytes):
    // the template rendered, and special tokens matched whole.
    assert_eq!(v["usage"]["prompt_tokens"], 21, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let (s, v) = post(
        &base,
        "/v1/completions",
        &json!({"model": "tiny-qwen2", "prompt": [256, 10, 65], "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let (s, v) = post(
        &base,
        "/v1/completions",
        &json!({"model": "tiny-qwen2", "prompt": [258], "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 400, "token ids beyond the vocabulary are rejected: {v}");

    // Every route the spec lists is served (whatever a bare request gets, it is not 404/405).
    for (method, path) in inferd::api::ROUTES {
        let req = match *method {
            "get" => client().get(format!("{base}{path}")),
            _ => client().post(format!("{base}{path}")).json(&json!({})),
        };
        let status = req.send().await.unwrap().status().as_u16();
        assert!(
            status != 404 && status != 405,
            "{method} {path} -> {status}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
