//! Rebuild a Hugging Face `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), with the pre-tokenizer regex chosen by
//! `tokenizer.ggml.pre` the way llama.cpp chooses it. Control (3) and user-defined (4) token
//! types become added tokens, so they are matched whole in text (chat templates rely on this).

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};

use super::TokenizerError;

/// GPT-2's pre-tokenizer split (what `ByteLevel { use_regex: true }` applies).
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2 / Qwen2.5 (single digits).
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3 (digits in groups of up to three).
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek-LLM (DeepSeek-V2's vocabulary): llama.cpp's `deepseek-llm` splits, in order.
const DEEPSEEK_LLM_RES: &[&str] = &[
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];

/// The pieces of a tokenizer that GGUF metadata carries.
pub struct GgufTokenizer {
    pub json: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, TokenizerError> {
    c.metadata
        .get(key)
        .ok_or_else(|| TokenizerError::Load(format!("GGUF metadata `{key}` is missing")))
}

fn strings(c: &Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = meta(c, key)?
        .to_vec()
        .map_err(|e| TokenizerError::Load(format!("{key}: {e}")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| TokenizerError::Load(format!("{key}: {e}")))
        })
        .collect()
}

fn opt_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_u64().ok())
        .map(|v| v as u32)
}

pub fn from_gguf(c: &Content) -> Result<GgufTokenizer, TokenizerError> {
    let model = meta(c, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| TokenizerError::Load(e.to_string()))?
        .clone();
    if model != "gpt2" {
        return Err(TokenizerError::Load(format!(
            "GGUF tokenizer model `{model}` is not supported yet (supported: gpt2 byte-level BPE)"
        )));
    }
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".into());
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let merges = strings(c, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x as i64,
                Value::U32(x) => *x as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };

    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }

    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (pre_tokenizer, ignore_merges) = match pre.as_str() {
        "qwen2" => (vec![split(QWEN2_RE), byte_level(false)], false),
        "llama-bpe" | "llama3" => (vec![split(LLAMA3_RE), byte_level(false)], true),
        // GLM-4 (llama.cpp's CHATGLM4 pre-type: Llama 3's split, spelled without `(?i:)`);
        // `glm4` files are also read ignoring merges, as llama.cpp does.
        "chatglm-bpe" => (vec![split(LLAMA3_RE), byte_level(false)], false),
        "glm4" => (vec![split(LLAMA3_RE), byte_level(false)], true),
        "deepseek-llm" => {
            let mut v: Vec<_> = DEEPSEEK_LLM_RES.iter().map(|r| split(r)).collect();
            v.push(byte_level(false));
            (v, false)
        }
        // SmolLM / StarCoder: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => (vec![split(r"\p{N}"), byte_level(true)], false),
        _ => (vec![split(GPT2_RE), byte_level(false)], false),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizer},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        }
    });
    Ok(GgufTokenizer {
        json: tokenizer.to_string(),
        bos_token_id: opt_u32(c, "tokenizer.ggml.bos_token_id"),
        eos_token_id: opt_u32(c, "tokenizer.ggml.eos_token_id"),
        add_bos_token: c
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        chat_template: c
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
    })
}
