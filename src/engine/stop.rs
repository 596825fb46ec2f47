//! When a sequence stops: one pure function from its state after a new token to a finish
//! reason (vLLM's `check_stop`), so every rule is tested on its own.

use super::FinishReason;

/// A sequence's state once its newest token is appended (and detokenized, unless it is an end
/// token: those are never turned into text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopCheck {
    /// The token is EOS (unless `ignore_eos`) or one of `stop_token_ids`.
    pub end_token: bool,
    /// The text now contains one of the `stop` strings.
    pub stop_string: bool,
    /// The request's grammar is complete: no token can follow.
    pub grammar_done: bool,
    /// Generated tokens, the new one included.
    pub num_output_tokens: usize,
    /// Prompt and generated tokens.
    pub num_tokens: usize,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub max_model_len: usize,
}

/// `Stop` for an end token (once `min_tokens` are out), a stop string or a completed grammar; else `Length` when
/// `max_tokens` are generated or the context is full; else `None`: keep going.
pub fn check_stop(s: &StopCheck) -> Option<FinishReason> {
    if s.end_token && s.num_output_tokens >= s.min_tokens {
        return Some(FinishReason::Stop);
    }
    if s.stop_string || s.grammar_done {
        return Some(FinishReason::Stop);
    }
    if s.num_output_tokens >= s.max_tokens || s.num_tokens >= s.max_model_len {
        return Some(FinishReason::Length);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> StopCheck {
        StopCheck {
            end_token: false,
            stop_string: false,
            grammar_done: false,
            num_output_tokens: 3,
            num_tokens: 10,
            min_tokens: 0,
            max_tokens: 8,
            max_model_len: 32,
        }
    }

    #[test]
    fn nothing_stops_a_sequence_within_its_limits() {
        assert_eq!(check_stop(&running()), None);
    }

    #[test]
    fn end_tokens_and_stop_strings_stop() {
        let eos = StopCheck {
            end_token: true,
            ..running()
        };
        assert_eq!(check_stop(&eos), Some(FinishReason::Stop));
        let string = StopCheck {
            stop_string: true,
            ..running()
        };
        assert_eq!(check_stop(&string), Some(FinishReason::Stop));
    }

    #[test]
    fn an_end_token_before_min_tokens_does_not_stop() {
        let early = StopCheck {
            end_token: true,
            min_tokens: 4,
            ..running()
        };
        assert_eq!(check_stop(&early), None);
        let reached = StopCheck {
            num_output_tokens: 4,
            ..early
        };
        assert_eq!(check_stop(&reached), Some(FinishReason::Stop));
    }

    #[test]
    fn max_tokens_or_a_full_context_is_length_and_a_stop_on_the_last_token_wins() {
        let max = StopCheck {
            num_output_tokens: 8,
            ..running()
        };
        assert_eq!(check_stop(&max), Some(FinishReason::Length));
        let full = StopCheck {
            num_tokens: 32,
            ..running()
        };
        assert_eq!(check_stop(&full), Some(FinishReason::Length));
        let eos_last = StopCheck {
            end_token: true,
            ..max
        };
        assert_eq!(check_stop(&eos_last), Some(FinishReason::Stop));
    }
}
