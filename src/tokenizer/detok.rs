//! Streaming text out of token ids: the incremental detokenizer (emits text only once it is
//! complete UTF-8 and stable under the next tokens) and stop strings (the returned text never
//! contains a stop string, and nothing that might be the start of one is emitted early).

use super::{Tokenizer, TokenizerError};

/// How many tokens before the first new one are decoded with it, so that tokenizers whose
/// pieces depend on their left neighbour (leading spaces) decode the same as a whole.
const CONTEXT_TOKENS: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// `num_prompt_tokens`: where the output starts in the ids given to [`Self::step`].
    pub fn new(num_prompt_tokens: usize, skip_special_tokens: bool) -> Self {
        Self {
            prefix_offset: num_prompt_tokens.saturating_sub(CONTEXT_TOKENS),
            read_offset: num_prompt_tokens,
            skip_special_tokens,
        }
    }

    /// The text the newest token(s) of `ids` add; empty while a character is incomplete.
    pub fn step(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        let prefix = tok.decode(
            &ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// Accumulates output text, finds stop strings, and holds back any tail that could still
/// become one.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What a [`StopMatcher::push`] lets out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to send to the client now.
    pub emit: String,
    /// A stop string was found; the text ends just before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    pub fn push(&mut self, delta: &str) -> StopStep {
        let max_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(max_stop.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(pos) = hit {
            self.text.truncate(pos);
            let emit = self.text[self.emitted.min(pos)..].to_string();
            self.emitted = pos;
            return StopStep {
                emit,
                stopped: true,
            };
        }
        let hold = self.partial_stop_len();
        let mut end = self.text.len() - hold;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let end = end.max(self.emitted);
        let emit = self.text[self.emitted..end].to_string();
        self.emitted = end;
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// Everything not yet emitted (at the end of generation).
    pub fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the longest suffix of the text that is a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for n in (1..s.len()).rev() {
                if n <= best {
                    break;
                }
                if s.is_char_boundary(n) && self.text.ends_with(&s[..n]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for d in deltas {
            let s = m.push(d);
            out.push(s.emit);
            if s.stopped {
                return (out, true, m.text().to_string());
            }
        }
        out.push(m.flush());
        (out, false, m.text().to_string())
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_emitted() {
        let (out, stopped, text) = run(&["\n\nUser"], &["Hello", " world", "\n", "\nUs", "er: hi"]);
        assert!(stopped);
        assert_eq!(text, "Hello world");
        assert_eq!(out, vec!["Hello", " world", "", "", ""]);
    }

    #[test]
    fn held_back_text_is_released_when_it_stops_matching() {
        let (out, stopped, _) = run(&["END"], &["a E", "N", "x"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "", "ENx", ""]);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, text) = run(&["cd", "b"], &["abcd"]);
        assert!(stopped);
        assert_eq!(text, "a");
        assert_eq!(out, vec!["a"]);
    }

    #[test]
    fn no_stops_passes_through_and_handles_multibyte() {
        let (out, stopped, _) = run(&[], &["巴", "黎"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "巴黎");
        let (_, stopped, text) = run(&["黎"], &["巴", "黎!"]);
        assert!(stopped);
        assert_eq!(text, "巴");
    }
}
