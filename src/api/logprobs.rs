//! OpenAI's two logprobs shapes, built from the engine's neutral [`TokenLogprobs`]:
//! chat (`logprobs.content[]` of `{token, logprob, bytes, top_logprobs}`) and legacy
//! completions (`{tokens, token_logprobs, top_logprobs, text_offset}`, parallel arrays).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::engine::TokenLogprobs;

/// A token id's raw bytes (its text may be an incomplete UTF-8 sequence).
pub type TokenBytes = Arc<dyn Fn(u32) -> Vec<u8> + Send + Sync>;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `logprob` as JSON: -inf (a masked token) has no JSON number; OpenAI clients expect a
/// number, so it is clamped to -9999 as OpenAI does.
fn num(x: f32) -> Value {
    if !x.is_finite() {
        return json!(-9999.0);
    }
    // Through f32's shortest decimal form, so -0.1f32 is written -0.1, not -0.10000000149.
    json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
}

/// One entry of a chat choice's `logprobs.content`.
pub fn chat_entry(token: u32, lp: &TokenLogprobs, tb: &TokenBytes) -> Value {
    let item = |id: u32, logprob: f32| {
        let b = tb(id);
        json!({"token": text(&b), "logprob": num(logprob), "bytes": b})
    };
    let mut e = item(token, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| item(id, l)).collect());
    e
}

/// A completions `logprobs` object for one token whose text starts at character `offset`.
pub fn completion_piece(token: u32, lp: &TokenLogprobs, offset: usize, tb: &TokenBytes) -> Value {
    let top: Map<String, Value> = lp
        .top
        .iter()
        .map(|&(id, l)| (text(&tb(id)), num(l)))
        .collect();
    json!({
        "tokens": [text(&tb(token))],
        "token_logprobs": [num(lp.logprob)],
        "top_logprobs": [top],
        "text_offset": [offset],
    })
}

/// Append a later `logprobs` object of the same choice to an earlier one.
pub fn merge(into: &mut Value, more: &Value) {
    if more.is_null() {
        return;
    }
    if into.is_null() {
        *into = more.clone();
        return;
    }
    if let (Some(a), Some(b)) = (into.as_object_mut(), more.as_object()) {
        for (k, v) in b {
            if let (Some(dst), Some(src)) =
                (a.get_mut(k).and_then(Value::as_array_mut), v.as_array())
            {
                dst.extend(src.iter().cloned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = chat_entry(1, &lp, &tb());
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
        let mut all = Value::Null;
        merge(&mut all, &completion_piece(1, &a, 0, &tb()));
        merge(&mut all, &completion_piece(3, &b, 6, &tb()));
        assert_eq!(
            all,
            json!({"tokens": [" Paris", "x"], "token_logprobs": [-1.0, -9999.0],
                   "top_logprobs": [{"x": -0.5}, {}], "text_offset": [0, 6]})
        );
    }
}
