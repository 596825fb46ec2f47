//! One request's engine-side state beside its sequence: how its next token is chosen (RNG,
//! token history, logits processors), its incremental detokenizer and stop strings, its client
//! channel and its timestamps. The scheduler holds it next to the [`Sequence`], so the two are
//! added and removed together.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedSender;

use super::guide::Guide;
use super::logits::{is_identity, process, TokenHistory};
use super::sampler::{logprobs, sample};
use super::sequence::Sequence;
use super::{EngineError, EngineEvent, FinishReason, GenerationRequest, TokenLogprobs};
use crate::tokenizer::{IncrementalDecoder, StopMatcher, StopStep, Tokenizer};

pub(crate) struct Request {
    pub params: GenerationRequest,
    pub events: UnboundedSender<EngineEvent>,
    decoder: IncrementalDecoder,
    pub stop: StopMatcher,
    rng: StdRng,
    history: TokenHistory,
    /// The grammar the output must follow, when the request has one.
    guide: Option<Guide>,
    /// Tokens that end generation (EOS unless ignored, and `stop_token_ids`).
    pub end_tokens: Vec<u32>,
    /// Has been scheduled once (its queue time is recorded).
    pub admitted: bool,
    pub arrival: Instant,
    last_token: Option<Instant>,
}

/// A token drawn for one sequence.
pub(crate) struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    /// The request's grammar is complete and takes no more tokens.
    pub grammar_done: bool,
    /// Time spent on the grammar (mask and advance), when there is one.
    pub guide_time: Option<std::time::Duration>,
}

/// One sampling sequence's share of a step's output.
pub(crate) enum Row {
    Logits(Vec<f32>),
    /// Picked on the model's device (plain greedy).
    Token(u32),
}

/// The time since the previous token: the first token's is its time to first token.
pub(crate) enum TokenLatency {
    First(f64),
    Next(f64),
}

/// How a request ended: what its client is told, and its `finished_reason` label.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Finished(FinishReason),
    /// The client went away.
    Aborted,
    Failed(EngineError),
}

impl Outcome {
    /// The `finished_reason` label of `vllm:request_success_total` (failures are not counted).
    pub fn label(&self) -> Option<&'static str> {
        match self {
            Self::Finished(FinishReason::Stop) => Some("stop"),
            Self::Finished(FinishReason::Length) => Some("length"),
            Self::Aborted => Some("abort"),
            Self::Failed(_) => None,
        }
    }
}

impl Request {
    pub fn new(
        mut params: GenerationRequest,
        events: UnboundedSender<EngineEvent>,
        arrival: Instant,
        eos_token_ids: &[u32],
    ) -> Self {
        let rng = match params.sampling.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let mut end_tokens = params.stop_token_ids.clone();
        if !params.ignore_eos {
            end_tokens.extend_from_slice(eos_token_ids);
        }
        let guide = params.guide.take();
        Self {
            guide,
            decoder: IncrementalDecoder::new(params.prompt_ids.len(), params.skip_special_tokens),
            stop: StopMatcher::new(params.stop.clone()),
            history: TokenHistory::new(&params.prompt_ids, &params.sampling),
            end_tokens,
            params,
            events,
            rng,
            admitted: false,
            arrival,
            last_token: None,
        }
    }

    /// Greedy with nothing between the logits and the argmax (no grammar, no processors, no
    /// logprobs).
    pub fn plain_greedy(&self) -> bool {
        let sp = &self.params.sampling;
        self.guide.is_none()
            && sp.is_greedy()
            && sp.logprobs.is_none()
            && is_identity(sp, &self.history)
    }

    /// The next token from `row` (processed and sampled here, or already picked on the
    /// device), recorded in the history, with its log-probabilities when asked for. The
    /// grammar's mask comes first, so logprobs describe the distribution sampled from; end
    /// tokens are masked until `min_tokens` are out, so none is sampled before then.
    pub fn sample(&mut self, row: Row) -> Result<Sampled, EngineError> {
        let sp = &self.params.sampling;
        let (token, logprobs) = match row {
            Row::Logits(mut logits) => {
                if let Some(g) = &mut self.guide {
                    g.mask(&mut logits)?;
                }
                process(&mut logits, sp, &self.history, &self.end_tokens);
                let token = sample(&logits, sp, &mut self.rng);
                let lp = sp
                    .logprobs
                    .map(|k| logprobs(&logits, sp.temperature, token, k));
                (token, lp)
            }
            Row::Token(token) => (token, None),
        };
        self.history.push(token);
        let grammar_done = match &mut self.guide {
            Some(g) => g.commit(token)?,
            None => false,
        };
        Ok(Sampled {
            token,
            logprobs,
            grammar_done,
            guide_time: self.guide.as_mut().map(Guide::take_spent),
        })
    }

    /// The text `seq`'s newest token completes, held back while it may become a stop string.
    pub fn detokenize(
        &mut self,
        tokenizer: &Tokenizer,
        seq: &Sequence,
    ) -> Result<StopStep, EngineError> {
        let delta = self
            .decoder
            .step(tokenizer, &seq.token_ids)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(self.stop.push(&delta))
    }

    /// Record that a token came out now.
    pub fn mark_token(&mut self, now: Instant) -> TokenLatency {
        match self.last_token.replace(now) {
            None => TokenLatency::First((now - self.arrival).as_secs_f64()),
            Some(prev) => TokenLatency::Next((now - prev).as_secs_f64()),
        }
    }
}
