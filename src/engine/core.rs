//! The engine thread: owns the scheduler, the KV block manager, the KV tensors and the model for
//! one loaded model, with no locks. Each iteration: take new requests, drop those whose client
//! went away, schedule, run one forward pass over the flat batch, sample, and send events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedSender;

use super::kv::{KvManager, SeqId};
use super::logits::{is_identity, process, TokenHistory};
use super::runner::{build_batch, execute, Sampled};
use super::sampler::{logprobs, sample};
use super::scheduler::{Scheduler, SchedulerConfig};
use super::sequence::Sequence;
use super::{
    EngineError, EngineEvent, EngineHandle, EngineLimits, EngineMsg, EngineStats, FinishReason,
    GenerationRequest, Usage,
};
use crate::models::{CacheSpec, CausalLm, KvCache};
use crate::telemetry;
use crate::tokenizer::{IncrementalDecoder, StopMatcher, Tokenizer};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_model_len: usize,
    pub max_waiting_requests: usize,
    pub enable_prefix_caching: bool,
    /// Element type of the KV cache (the model's `cache_spec` gives the rest).
    pub cache_dtype: candle_core::DType,
}

/// Per-request state that is not the scheduler's business.
struct Request {
    params: GenerationRequest,
    events: UnboundedSender<EngineEvent>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    rng: StdRng,
    history: TokenHistory,
    /// Tokens that end generation (EOS unless ignored, and `stop_token_ids`).
    end_tokens: Vec<u32>,
    /// Has left the waiting queue once (so it no longer counts against `pending`).
    admitted: bool,
    arrival: Instant,
    last_token: Option<Instant>,
}

/// One sampling sequence's share of a step's output.
enum Row {
    Logits(Vec<f32>),
    /// Picked on the model's device (plain greedy).
    Token(u32),
}

impl Request {
    /// Greedy with nothing between the logits and the argmax (no processors, no logprobs).
    fn plain_greedy(&self) -> bool {
        let sp = &self.params.sampling;
        sp.is_greedy() && sp.logprobs.is_none() && is_identity(sp, &self.history)
    }
}

struct Engine {
    name: String,
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    scheduler: Scheduler,
    kv: KvManager,
    cache: KvCache,
    requests: HashMap<SeqId, Request>,
    stats: Arc<EngineStats>,
    pending: Arc<AtomicUsize>,
}

/// Start the engine thread for `model`. The thread ends when every handle is dropped and its
/// last sequence is done.
pub fn spawn_engine(
    name: &str,
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let pending = Arc::new(AtomicUsize::new(0));
    let cache = KvCache::for_device(
        CacheSpec {
            dtype: cfg.cache_dtype,
            ..model.cache_spec()
        },
        cfg.num_blocks,
        cfg.block_size,
        model.device(),
    )
    .map_err(std::io::Error::other)?;
    let engine = Engine {
        name: name.to_string(),
        model,
        tokenizer,
        cfg,
        scheduler: Scheduler::new(SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
        }),
        kv: KvManager::with_prefix_caching(
            cfg.num_blocks,
            cfg.block_size,
            cfg.enable_prefix_caching,
            name,
        ),
        cache,
        requests: HashMap::new(),
        stats: stats.clone(),
        pending: pending.clone(),
    };
    engine.publish_stats();
    std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || engine.run(rx))?;
    Ok(EngineHandle {
        tx,
        stats,
        limits: EngineLimits {
            max_model_len: cfg.max_model_len,
            max_waiting_requests: cfg.max_waiting_requests,
        },
        next_id: Arc::new(AtomicU64::new(1)),
        pending,
    })
}

impl Engine {
    fn run(mut self, rx: mpsc::Receiver<EngineMsg>) {
        tracing::info!(
            num_blocks = self.cfg.num_blocks,
            block_size = self.cfg.block_size,
            max_model_len = self.cfg.max_model_len,
            "engine started"
        );
        loop {
            if self.scheduler.is_empty() {
                // Idle: sleep until a request arrives; all handles gone means shut down.
                match rx.recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg);
            }
            self.drop_abandoned();
            if !self.step() {
                // Nothing could be scheduled (should not happen: admission guarantees every
                // sequence fits alone). Wait briefly instead of spinning.
                if let Ok(msg) = rx.recv_timeout(Duration::from_millis(5)) {
                    self.handle(msg);
                }
            }
            self.publish_stats();
        }
        tracing::info!("engine stopped");
    }

    fn handle(&mut self, msg: EngineMsg) {
        let EngineMsg::Submit {
            id,
            request,
            events,
            arrival,
        } = msg;
        let needed = request.prompt_ids.len() + request.max_tokens;
        if needed > self.cfg.max_model_len || !Scheduler::fits(&self.kv, needed) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            let _ = events.send(EngineEvent::Error(EngineError::ContextTooLong {
                needed,
                max: self.cfg.max_model_len,
            }));
            return;
        }
        let rng = match request.sampling.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let n_prompt = request.prompt_ids.len();
        let mut end_tokens = request.stop_token_ids.clone();
        if !request.ignore_eos {
            end_tokens.extend_from_slice(self.tokenizer.eos_token_ids());
        }
        self.stats
            .prompt_tokens
            .fetch_add(n_prompt as u64, Ordering::Relaxed);
        self.scheduler
            .add(Sequence::new(id, request.prompt_ids.clone()));
        self.requests.insert(
            id,
            Request {
                decoder: IncrementalDecoder::new(n_prompt, request.skip_special_tokens),
                stop: StopMatcher::new(request.stop.clone()),
                history: TokenHistory::new(&request.prompt_ids, &request.sampling),
                end_tokens,
                params: *request,
                events,
                rng,
                admitted: false,
                arrival,
                last_token: None,
            },
        );
    }

    /// Abort sequences whose client hung up, returning their blocks.
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id, "client disconnected; aborting");
            telemetry::request_finished(&self.name, "abort");
            self.finish(id);
        }
    }

    fn finish(&mut self, id: SeqId) {
        self.scheduler.remove(id, &mut self.kv);
        if let Some(r) = self.requests.remove(&id) {
            if !r.admitted {
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// One scheduling step and forward pass. Returns false when nothing was scheduled.
    fn step(&mut self) -> bool {
        let out = self.scheduler.schedule(&mut self.kv);
        for &id in &out.preempted {
            tracing::debug!(seq = id, "preempted (recompute)");
        }
        if out.scheduled.is_empty() {
            return out.preempted.is_empty() && self.scheduler.is_empty();
        }
        for s in &out.scheduled {
            if let Some(r) = self.requests.get_mut(&s.seq_id) {
                if !r.admitted {
                    r.admitted = true;
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    let queued = r.arrival.elapsed().as_secs_f64();
                    telemetry::observe(telemetry::QUEUE, &self.name, queued);
                }
            }
        }
        let batch = build_batch(&out, &self.scheduler, &self.kv);
        // On an accelerator, a step whose every sampler is plain greedy picks its tokens there.
        let greedy_on_device = !self.model.device().is_cpu()
            && out.scheduled.iter().filter(|s| s.samples).all(|s| {
                self.requests
                    .get(&s.seq_id)
                    .is_some_and(|r| r.plain_greedy())
            });
        let sampled = match execute(
            self.model.as_ref(),
            &batch,
            &mut self.cache,
            greedy_on_device,
        ) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for s in &out.scheduled {
                    if let Some(r) = self.requests.get(&s.seq_id) {
                        let _ = r
                            .events
                            .send(EngineEvent::Error(EngineError::Model(e.to_string())));
                    }
                    self.finish(s.seq_id);
                }
                return true;
            }
        };
        self.scheduler.on_step_computed(&out, &mut self.kv);
        self.stats.num_steps.fetch_add(1, Ordering::Relaxed);

        let samplers = out.scheduled.iter().filter(|s| s.samples);
        match sampled {
            Sampled::Logits(rows) => {
                for (s, row) in samplers.zip(rows) {
                    self.on_sampled(s.seq_id, Row::Logits(row));
                }
            }
            Sampled::Tokens(tokens) => {
                for (s, token) in samplers.zip(tokens) {
                    self.on_sampled(s.seq_id, Row::Token(token));
                }
            }
        }
        true
    }

    /// A sequence's next token, from its logits row or already picked on the device.
    fn on_sampled(&mut self, id: SeqId, row: Row) {
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let sp = &r.params.sampling;
        let (token, token_logprobs) = match row {
            Row::Logits(mut logits) => {
                process(&mut logits, sp, &r.history, &r.end_tokens);
                let token = sample(&logits, sp, &mut r.rng);
                let lp = sp
                    .logprobs
                    .map(|k| logprobs(&logits, sp.temperature, token, k));
                (token, lp)
            }
            Row::Token(token) => (token, None),
        };
        r.history.push(token);
        let now = Instant::now();
        match r.last_token.replace(now) {
            None => {
                telemetry::observe(telemetry::TTFT, &self.name, (now - r.arrival).as_secs_f64())
            }
            Some(prev) => {
                telemetry::observe(telemetry::TPOT, &self.name, (now - prev).as_secs_f64())
            }
        }
        self.scheduler.append_token(id, token);
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let Some(seq) = self.scheduler.get(id) else {
            return;
        };

        let mut reason = None;
        let mut text = String::new();
        let mut matched_stop_string = false;
        if r.end_tokens.contains(&token) {
            reason = Some(FinishReason::Stop);
        } else {
            match r.decoder.step(&self.tokenizer, &seq.token_ids) {
                Ok(delta) => {
                    let st = r.stop.push(&delta);
                    text = st.emit;
                    if st.stopped {
                        reason = Some(FinishReason::Stop);
                        matched_stop_string = true;
                    }
                }
                Err(e) => {
                    let _ = r
                        .events
                        .send(EngineEvent::Error(EngineError::Tokenizer(e.to_string())));
                    self.finish(id);
                    return;
                }
            }
        }
        if reason.is_none()
            && (seq.num_output_tokens() >= r.params.max_tokens
                || seq.num_tokens() >= self.cfg.max_model_len)
        {
            reason = Some(FinishReason::Length);
        }
        let sent = r.events.send(EngineEvent::Token {
            token_id: token,
            text,
            logprobs: token_logprobs,
        });
        if sent.is_err() {
            self.finish(id);
            return;
        }
        if let Some(reason) = reason {
            // Text held back as a possible stop string is released unless one actually matched.
            let text = if matched_stop_string {
                String::new()
            } else {
                r.stop.flush()
            };
            let usage = Usage {
                prompt_tokens: seq.num_prompt_tokens,
                completion_tokens: seq.num_output_tokens(),
            };
            let _ = r.events.send(EngineEvent::Finished {
                text,
                reason,
                usage,
            });
            telemetry::observe(
                telemetry::E2E,
                &self.name,
                r.arrival.elapsed().as_secs_f64(),
            );
            let label = match reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            };
            telemetry::request_finished(&self.name, label);
            self.finish(id);
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.num_running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        s.num_waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
        s.num_free_blocks
            .store(self.kv.num_free_blocks(), Ordering::Relaxed);
        s.num_total_blocks
            .store(self.kv.num_blocks(), Ordering::Relaxed);
        s.num_kv_sequences
            .store(self.kv.num_sequences(), Ordering::Relaxed);
        let (queries, hits) = self.kv.prefix_cache_counters();
        s.prefix_cache_queries.store(queries, Ordering::Relaxed);
        s.prefix_cache_hits.store(hits, Ordering::Relaxed);
        s.num_cached_blocks
            .store(self.kv.num_cached_blocks(), Ordering::Relaxed);
        s.num_preemptions
            .store(self.scheduler.num_preemptions(), Ordering::Relaxed);
    }
}
