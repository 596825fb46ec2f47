//! Text in and out: the `tokenizers` wrapper (from GGUF metadata or `tokenizer.json`), chat
//! templates, the incremental detokenizer and stop strings.

pub mod chat_template;
pub mod detok;
pub mod gguf;
mod trie;

use std::path::Path;
use std::str::FromStr;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detok::{IncrementalDecoder, StopMatcher, StopStep};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("loading tokenizer: {0}")]
    Load(String),
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// Names that mark the end of a turn in the chat models inferd serves; any of them present in
/// the vocabulary as a special token stops generation, like the configured EOS.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    // GLM-4 ends a turn by starting the next one (its generation config lists both).
    "<|user|>",
    "<|observation|>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens are byte-level BPE strings (GPT-2's byte-to-character table).
    byte_level: bool,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    chat_template: Option<ChatTemplate>,
    /// Bytes of text that `n` tokens can stand for at most are `n` times this, when the model
    /// bounds it (see [`Tokenizer::max_text_bytes`]).
    max_bytes_per_token: Option<usize>,
}

impl Tokenizer {
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        add_bos_token: bool,
        template: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let mut eos_token_ids: Vec<u32> = eos_token_id.into_iter().collect();
        for t in END_OF_TURN {
            if let Some(id) = inner.token_to_id(t) {
                let special = inner
                    .get_added_tokens_decoder()
                    .get(&id)
                    .is_some_and(|a| a.special);
                if special && !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let chat_template = template
            .map(|t| ChatTemplate::new(&t, &name(bos_token_id), &name(eos_token_id)))
            .transpose()?;
        let byte_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let mut tok = Self {
            inner,
            byte_level,
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            chat_template,
            max_bytes_per_token: None,
        };
        tok.max_bytes_per_token = tok.bytes_per_token_bound();
        Ok(tok)
    }

    /// The most bytes of input one token can stand for, when that is bounded: in BPE every
    /// token is a string of the vocabulary, unless an `<unk>` can swallow a run of unknown
    /// characters (`fuse_unk`); word-level models map whole words to `<unk>` (unbounded). A
    /// normalizer may shrink text before it is split (NFC folds up to three code points into
    /// one), hence the margin.
    fn bytes_per_token_bound(&self) -> Option<usize> {
        let bpe = match self.inner.get_model() {
            tokenizers::ModelWrapper::BPE(b) => b,
            _ => return None,
        };
        if bpe.unk_token.is_some() && bpe.fuse_unk {
            return None;
        }
        // A token string's UTF-8 length bounds the input bytes it stands for: byte-level
        // tokens spell each byte with one character of at most two bytes, byte-fallback tokens
        // (`<0x41>`) stand for one byte, added tokens for their own text.
        let longest = self
            .inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(4);
        let margin = if self.inner.get_normalizer().is_some() {
            4
        } else {
            1
        };
        Some(longest * margin)
    }

    /// The most bytes of text that can fit in `max_tokens` tokens, when the tokenizer bounds
    /// it: a longer text certainly does not fit, and can be refused before it is tokenized.
    pub fn max_text_bytes(&self, max_tokens: usize) -> Option<usize> {
        self.max_bytes_per_token
            .map(|b| b.saturating_mul(max_tokens))
    }

    /// From the `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(
        content: &candle_core::quantized::gguf_file::Content,
    ) -> Result<Self, TokenizerError> {
        let g = gguf::from_gguf(content)?;
        let inner = tokenizers::Tokenizer::from_str(&g.json)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        Self::assemble(
            inner,
            g.bos_token_id,
            g.eos_token_id,
            g.add_bos_token,
            g.chat_template,
        )
    }

    /// From a Hugging Face model directory (`tokenizer.json`, `tokenizer_config.json`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            TokenizerError::Load(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let token_id = |key: &str| {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(s)
        };
        let template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            serde_json::Value::Array(a) => a
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let (bos, eos) = (token_id("bos_token"), token_id("eos_token"));
        // A tokenizer.json with a post-processor adds BOS itself; only add it by hand when asked.
        let add_bos =
            cfg["add_bos_token"].as_bool().unwrap_or(false) && inner.get_post_processor().is_none();
        Self::assemble(inner, bos, eos, add_bos, template)
    }

    /// A tokenizer for random-weight models: token `i` is the text `<i>` (0 is
    /// `<|endoftext|>`, the EOS; 1 is `<unk>`), so any token sequence round-trips.
    pub fn synthetic(vocab_size: usize) -> Result<Self, TokenizerError> {
        let mut vocab = serde_json::Map::with_capacity(vocab_size);
        vocab.insert("<|endoftext|>".into(), 0.into());
        vocab.insert("<unk>".into(), 1.into());
        for i in 2..vocab_size {
            vocab.insert(format!("<{i}>"), i.into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "<\\d+>"},
                              "behavior": "Isolated", "invert": false},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        Self::assemble(inner, None, Some(0), false, Some(template.to_string()))
    }

    /// Encode a prompt. Special-token text (e.g. `<|im_start|>`) becomes its token.
    /// `add_special` adds BOS where the model wants one (plain-text prompts).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The raw bytes a token stands for (part of a UTF-8 character, possibly).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let added = self.inner.get_added_tokens_decoder().contains_key(&id);
        if self.byte_level && !added {
            let table = byte_decoder();
            let mut out = Vec::with_capacity(tok.len());
            for c in tok.chars() {
                match table.get(&c) {
                    Some(&b) => out.push(b),
                    None => out.extend_from_slice(c.to_string().as_bytes()),
                }
            }
            out
        } else if added {
            tok.into_bytes()
        } else {
            self.decode(&[id], false).unwrap_or_default().into_bytes()
        }
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The id of special token `name` (`<|python_tag|>`), if the vocabulary has it.
    pub fn special_token_id(&self, name: &str) -> Option<u32> {
        let id = self.inner.token_to_id(name)?;
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|a| a.special)
            .then_some(id)
    }

    /// Use `source` as the chat template instead of the model's own (vLLM's
    /// `--chat-template`).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), TokenizerError> {
        let name = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        let (bos, eos) = (
            name(self.bos_token_id),
            name(self.eos_token_ids.first().copied()),
        );
        self.chat_template = Some(ChatTemplate::new(source, &bos, &eos)?);
        Ok(())
    }
}

/// GPT-2's printable character → byte table (the inverse of `bytes_to_unicode`).
fn byte_decoder() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut extra = 0;
        (0..256u32)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    extra += 1;
                    255 + extra
                };
                (char::from_u32(c).unwrap_or('?'), b as u8)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_byte_level_bpe_from_gguf_like_json() {
        // Minimal tokenizer through the same JSON path GGUF uses: "a", "b", "ab", plus a special.
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 3, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"a": 0, "b": 1, "ab": 2, "<|im_end|>": 3}, "merges": ["a b"]}
        });
        let inner = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        let t = Tokenizer::assemble(inner, None, None, false, None).unwrap();
        assert_eq!(t.encode("abab<|im_end|>", false).unwrap(), vec![2, 2, 3]);
        assert_eq!(t.eos_token_ids(), &[3]);
        assert_eq!(t.decode(&[2, 0, 3], true).unwrap(), "aba");
        assert_eq!(t.token_bytes(2), b"ab".to_vec());
        assert_eq!(t.token_bytes(3), b"<|im_end|>".to_vec());
        assert_eq!(byte_decoder()[&'\u{120}'], b' ', "Ġ is the space byte");
        assert_eq!(byte_decoder()[&'\u{10a}'], b'\n', "Ċ is the newline byte");
    }

    #[test]
    fn synthetic_tokens_round_trip() {
        let t = Tokenizer::synthetic(1000).unwrap();
        assert_eq!(t.encode("<5><999><42>", false).unwrap(), vec![5, 999, 42]);
        assert_eq!(t.token_bytes(42), b"<42>".to_vec());
        assert_eq!(t.eos_token_ids(), &[0]);
        // A word-level model maps any unknown word to `<unk>`: no byte bound exists.
        assert_eq!(t.max_text_bytes(10), None);
    }
}
