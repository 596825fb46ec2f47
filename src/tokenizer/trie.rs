//! The vocabulary as constrained decoding sees it: every token id's bytes in a token trie
//! (llguidance's `TokEnv`), built from the same [`Tokenizer`] whether it came from a
//! `tokenizer.json` or from GGUF metadata. Special tokens are named, not spelled: the trie marks
//! them so a grammar can only produce them where it names them (`<|im_end|>`), and the chat's
//! end-of-turn tokens are its EOS.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::{Tokenizer, TokenizerError};

struct Env {
    trie: TokTrie,
    inner: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                // Plain text always encodes; should it not, the trie's greedy split is a valid
                // (if unusual) tokenization of the same bytes.
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

impl Tokenizer {
    /// The bytes a token stands for in the trie: special tokens as the marker byte and their
    /// name, byte-fallback tokens (`<0x0A>`) as their byte, SentencePiece's `▁` as a space.
    fn trie_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let added = self.inner.get_added_tokens_decoder();
        if let Some(a) = added.get(&id) {
            if a.special {
                let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                bytes.extend_from_slice(a.content.as_bytes());
                return bytes;
            }
            return a.content.clone().into_bytes();
        }
        if self.byte_level {
            return self.token_bytes(id);
        }
        if let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        tok.replace('\u{2581}', " ").into_bytes()
    }

    /// The trie of this vocabulary, padded to the model's `vocab_size` rows (ids the tokenizer
    /// does not know are special and never allowed).
    pub fn tok_env(&self, vocab_size: usize) -> Result<TokEnv, TokenizerError> {
        let n = vocab_size.max(self.inner.get_vocab_size(true));
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = self.trie_bytes(id);
                if bytes.is_empty() {
                    let mut name = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    name.extend_from_slice(format!("[{id}]").as_bytes());
                    name
                } else {
                    bytes
                }
            })
            .collect();
        let eos = self.eos_token_ids();
        let Some(&first) = eos.first() else {
            return Err(TokenizerError::Load(
                "constrained decoding needs an end-of-turn token, and this vocabulary has none"
                    .into(),
            ));
        };
        let mut info = TokRxInfo::new(n as u32, first);
        info.tok_bos = self.bos_token_id;
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        Ok(Arc::new(Env {
            trie,
            inner: self.inner.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_vocabulary_builds_a_trie_with_its_eos() {
        let t = Tokenizer::synthetic(300).unwrap();
        let env = t.tok_env(320).unwrap();
        let trie = env.tok_trie();
        assert_eq!(trie.vocab_size(), 320);
        assert_eq!(trie.eos_token(), 0);
        assert!(trie.is_special_token(0), "<|endoftext|> is special");
        assert_eq!(trie.token(42), b"<42>");
        assert!(trie.is_special_token(310), "padding rows are never text");
        assert_eq!(env.tokenize_bytes(b"<5><17>"), vec![5, 17]);
    }
}
