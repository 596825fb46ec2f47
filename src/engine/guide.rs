//! Constrained decoding for one sequence: a grammar matcher (llguidance) that, before each
//! sample, masks every token the grammar cannot take next, and after it advances by the token
//! drawn. Compiled off the engine thread (the API does it); each choice owns its own matcher.
//! Preemption by recompute keeps a sequence's tokens, so the matcher's state stays valid.

use std::time::{Duration, Instant};

use llguidance::Matcher;

use super::EngineError;

pub struct Guide {
    matcher: Matcher,
    /// The request field the grammar came from, named in errors.
    field: &'static str,
    /// Time spent masking and advancing since [`Guide::take_spent`] last asked.
    spent: Duration,
}

impl Guide {
    /// A matcher fresh from its grammar (no tokens consumed), compiled from request `field`.
    pub fn new(matcher: Matcher, field: &'static str) -> Self {
        Self {
            matcher,
            field,
            spent: Duration::ZERO,
        }
    }

    /// The time spent on this grammar since the last call (the cost of constrained decoding
    /// apart from the forward pass).
    pub fn take_spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
    }

    /// The matcher failed. Grammars are checked before submission, so this is a constraint
    /// the vocabulary cannot spell (a byte no token holds) or one past the matcher's limits:
    /// the client's request, named by its field, with the matcher's first line of reasons.
    fn error(&self, e: impl std::fmt::Display) -> EngineError {
        let e = e.to_string();
        let reason = e.lines().next().unwrap_or_default();
        EngineError::Grammar {
            field: self.field,
            message: format!(
                "{} cannot be followed with this model's vocabulary ({reason})",
                self.field
            ),
        }
    }

    /// Set every logit the grammar forbids at this point to -inf. Rows wider than the mask
    /// (padding ids) are forbidden too.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let started = Instant::now();
        let allowed = match self.matcher.compute_mask_or_eos() {
            Ok(a) => a,
            Err(e) => return Err(self.error(e)),
        };
        let words = allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.spent += started.elapsed();
        Ok(())
    }

    /// Advance by the token drawn; returns whether the grammar is complete and can take no
    /// more tokens (the sequence ends there).
    pub fn commit(&mut self, token: u32) -> Result<bool, EngineError> {
        let started = Instant::now();
        if let Err(e) = self.matcher.consume_token(token) {
            return Err(self.error(e));
        }
        self.spent += started.elapsed();
        Ok(self.matcher.is_stopped())
    }
}

impl Clone for Guide {
    /// An independent matcher in the same state (one per choice of `n`).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            field: self.field,
            spent: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}
