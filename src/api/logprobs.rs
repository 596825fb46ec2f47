//! OpenAI's two logprobs shapes, built from the engine's neutral [`TokenLogprobs`]:
//! chat (`logprobs.content[]` of `{token, logprob, bytes, top_logprobs}`) and legacy
//! completions (`{tokens, token_logprobs, top_logprobs, text_offset}`, parallel arrays).

use std::sync::Arc;

use super::types::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};
use crate::engine::TokenLogprobs;

/// A token id's raw bytes (its text may be an incomplete UTF-8 sequence).
pub type TokenBytes = Arc<dyn Fn(u32) -> Vec<u8> + Send + Sync>;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A log-probability as JSON: -inf (a masked token) has no JSON number; OpenAI clients expect
/// a number, so it is clamped to -9999 as OpenAI does.
fn num(x: f32) -> f64 {
    if !x.is_finite() {
        return -9999.0;
    }
    // Through f32's shortest decimal form, so -0.1f32 is written -0.1, not -0.10000000149.
    x.to_string().parse::<f64>().unwrap_or(x as f64)
}

/// One entry of a chat choice's `logprobs.content`.
pub fn chat_entry(token: u32, lp: &TokenLogprobs, tb: &TokenBytes) -> ChatTokenLogprob {
    let item = |id: u32, logprob: f32| {
        let bytes = tb(id);
        TopLogprob {
            token: text(&bytes),
            logprob: num(logprob),
            bytes,
        }
    };
    let TopLogprob {
        token,
        logprob,
        bytes,
    } = item(token, lp.logprob);
    ChatTokenLogprob {
        token,
        logprob,
        bytes,
        top_logprobs: lp.top.iter().map(|&(id, l)| item(id, l)).collect(),
    }
}

/// A completions `logprobs` object for one token whose text starts at character `offset`.
pub fn completion_piece(
    token: u32,
    lp: &TokenLogprobs,
    offset: usize,
    tb: &TokenBytes,
) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: vec![text(&tb(token))],
        token_logprobs: vec![num(lp.logprob)],
        top_logprobs: vec![lp
            .top
            .iter()
            .map(|&(id, l)| (text(&tb(id)), num(l)))
            .collect()],
        text_offset: vec![offset],
    }
}

impl ChatLogprobs {
    /// Append a later piece of the same choice.
    pub fn extend(&mut self, more: ChatLogprobs) {
        self.content.extend(more.content);
    }
}

impl CompletionLogprobs {
    /// Append a later piece of the same choice.
    pub fn extend(&mut self, more: CompletionLogprobs) {
        self.tokens.extend(more.tokens);
        self.token_logprobs.extend(more.token_logprobs);
        self.top_logprobs.extend(more.top_logprobs);
        self.text_offset.extend(more.text_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tb() -> TokenBytes {
        Arc::new(|id| match id {
            1 => b" Paris".to_vec(),
            2 => vec![0xe5, 0xb7],
            _ => b"x".to_vec(),
        })
    }

    #[test]
    fn chat_entries_carry_token_text_bytes_and_alternatives() {
        let lp = TokenLogprobs {
            logprob: -0.25,
            top: vec![(1, -0.25), (2, -2.0)],
        };
        let e = serde_json::to_value(chat_entry(1, &lp, &tb())).unwrap();
        assert_eq!(e["token"], " Paris");
        assert_eq!(e["logprob"], -0.25);
        assert_eq!(e["bytes"], json!([32, 80, 97, 114, 105, 115]));
        assert_eq!(e["top_logprobs"][1]["bytes"], json!([0xe5, 0xb7]));
        assert_eq!(e["top_logprobs"][1]["token"], "\u{fffd}");
    }

    #[test]
    fn completion_pieces_merge_into_parallel_arrays() {
        let a = TokenLogprobs {
            logprob: -1.0,
            top: vec![(3, -0.5)],
        };
        let b = TokenLogprobs {
            logprob: f32::NEG_INFINITY,
            top: vec![],
        };
        let mut all = completion_piece(1, &a, 0, &tb());
        all.extend(completion_piece(3, &b, 6, &tb()));
        assert_eq!(
            serde_json::to_value(all).unwrap(),
            json!({"tokens": [" Paris", "x"], "token_logprobs": [-1.0, -9999.0],
                   "top_logprobs": [{"x": -0.5}, {}], "text_offset": [0, 6]})
        );
    }
}
