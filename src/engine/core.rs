//! The engine thread: owns the scheduler, the KV block manager, the KV tensors and the model for
//! one loaded model, with no locks. Each iteration: take new requests, drop those whose client
//! went away, schedule, run one forward pass over the flat batch, sample, and send events.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::kv::{KvManager, SeqId};
use super::request::{Outcome, Request, Row, Sampled, TokenLatency};
use super::runner::{build_batch, execute};
use super::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use super::sequence::Sequence;
use super::stop::{check_stop, StopCheck};
use super::{
    fit_context, EngineError, EngineEvent, EngineHandle, EngineLimits, EngineMsg, EngineStats,
    Usage,
};
use crate::models::{CacheSpec, CausalLm, KvCache};
use crate::telemetry;
use crate::tokenizer::{StopStep, Tokenizer};

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

struct Engine {
    name: String,
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    /// Every sequence with its request state: their one owner.
    scheduler: Scheduler<Request>,
    kv: KvManager,
    cache: KvCache,
    /// Where the engine publishes its [`EngineStats`] after every step.
    stats: Arc<Mutex<EngineStats>>,
    counters: Counters,
    /// Shared with the handles: requests submitted and not finished.
    outstanding: Arc<AtomicUsize>,
}

/// Totals only the engine thread updates.
#[derive(Debug, Default)]
struct Counters {
    num_steps: u64,
    generation_tokens: u64,
    prompt_tokens: u64,
    guided_tokens: u64,
    guide_seconds: f64,
}

/// An engine's thread. It ends once every [`EngineHandle`] is dropped and the sequences it
/// holds are done (those whose clients left are aborted at once).
pub struct EngineThread {
    name: String,
    thread: std::thread::JoinHandle<()>,
}

impl EngineThread {
    /// Wait up to `timeout` for the thread to end; returns whether it did (a thread still
    /// running then is left to the process's exit).
    pub fn join(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!(model = %self.name, "engine still busy at shutdown; not waiting");
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.thread.join().is_err() {
            tracing::error!(model = %self.name, "engine thread panicked");
        }
        true
    }
}

/// Start the engine thread for `model`. `cfg.max_model_len` must fit the KV pool, so that every
/// admitted sequence can run alone.
pub fn spawn_engine(
    name: &str,
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
) -> std::io::Result<(EngineHandle, EngineThread)> {
    let pool_tokens = cfg.num_blocks * cfg.block_size;
    if cfg.max_model_len > pool_tokens {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "max_model_len {} does not fit the KV pool ({pool_tokens} tokens)",
                cfg.max_model_len
            ),
        ));
    }
    let (tx, rx) = mpsc::channel();
    telemetry::register_model(name);
    let stats = Arc::new(Mutex::new(EngineStats::default()));
    let outstanding = Arc::new(AtomicUsize::new(0));
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
        stats: stats.clone(),
        counters: Counters::default(),
        outstanding: outstanding.clone(),
    };
    engine.publish_stats();
    let thread = std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || engine.run(rx))?;
    let handle = EngineHandle {
        tx,
        stats,
        limits: EngineLimits {
            max_model_len: cfg.max_model_len,
            max_num_seqs: cfg.max_num_seqs,
            max_waiting_requests: cfg.max_waiting_requests,
        },
        next_id: Arc::new(AtomicU64::new(1)),
        outstanding,
    };
    let thread = EngineThread {
        name: name.to_string(),
        thread,
    };
    Ok((handle, thread))
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
        // `submit` checked the same rule; the engine holds every sequence of at most
        // `max_model_len` tokens (`spawn_engine` refuses a pool smaller than that).
        let max_len = self.cfg.max_model_len;
        if let Err(e) = fit_context(request.prompt_ids.len(), Some(request.max_tokens), max_len) {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            let _ = events.send(EngineEvent::Error(e.into()));
            return;
        }
        self.counters.prompt_tokens += request.prompt_ids.len() as u64;
        let seq = Sequence::new(id, request.prompt_ids.clone());
        let eos = self.tokenizer.eos_token_ids();
        let request = Request::new(*request, events, arrival, eos);
        self.scheduler.add(seq, request);
    }

    /// Abort sequences whose client hung up, returning their blocks.
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .scheduler
            .requests()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id, "client disconnected; aborting");
            self.finish(id, Outcome::Aborted);
        }
    }

    /// End a request: free its blocks, tell its client how it ended, count it.
    fn finish(&mut self, id: SeqId, outcome: Outcome) {
        let Some((seq, mut r)) = self.scheduler.remove(id, &mut self.kv) else {
            return;
        };
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        if let Some(label) = outcome.label() {
            telemetry::request_finished(&self.name, label);
        }
        // Publish before the client hears of the end: whoever has seen a request finish then
        // reads counters that include all of its tokens (the step's own publication comes
        // after every sequence of the step has advanced).
        self.publish_stats();
        match outcome {
            Outcome::Finished(reason) => {
                let usage = Usage {
                    prompt_tokens: seq.num_prompt_tokens,
                    completion_tokens: seq.num_output_tokens(),
                };
                // Text held back as a possible stop string is released (after a stop string
                // matched there is none).
                let text = r.stop.flush();
                let _ = r.events.send(EngineEvent::Finished {
                    text,
                    reason,
                    usage,
                });
                let e2e = r.arrival.elapsed().as_secs_f64();
                telemetry::observe(telemetry::E2E, &self.name, e2e);
            }
            Outcome::Failed(e) => {
                let _ = r.events.send(EngineEvent::Error(e));
            }
            Outcome::Aborted => {}
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
        self.mark_admitted(&out);
        let batch = build_batch(&out, &self.scheduler, &self.kv);
        // On an accelerator, a step whose every sampler is plain greedy picks its tokens there.
        let greedy_on_device = !self.model.device().is_cpu()
            && out.scheduled.iter().filter(|s| s.samples).all(|s| {
                self.scheduler
                    .request(s.seq_id)
                    .is_some_and(Request::plain_greedy)
            });
        let model = self.model.as_ref();
        let sampled = match execute(model, &batch, &mut self.cache, greedy_on_device) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for s in &out.scheduled {
                    self.finish(s.seq_id, Outcome::Failed(EngineError::Model(e.to_string())));
                }
                return true;
            }
        };
        self.scheduler.on_step_computed(&out, &mut self.kv);
        self.counters.num_steps += 1;

        let rows: Vec<Row> = match sampled {
            super::runner::Sampled::Logits(rows) => rows.into_iter().map(Row::Logits).collect(),
            super::runner::Sampled::Tokens(tokens) => tokens.into_iter().map(Row::Token).collect(),
        };
        let samplers = out.scheduled.iter().filter(|s| s.samples);
        for (s, row) in samplers.zip(rows) {
            if let Some(outcome) = self.advance(s.seq_id, row) {
                self.finish(s.seq_id, outcome);
            }
        }
        true
    }

    /// Sequences scheduled for the first time record how long they waited.
    fn mark_admitted(&mut self, out: &SchedulerOutput) {
        for s in &out.scheduled {
            if let Some((_, r)) = self.scheduler.get_mut(s.seq_id) {
                if !r.admitted {
                    r.admitted = true;
                    let queued = r.arrival.elapsed().as_secs_f64();
                    telemetry::observe(telemetry::QUEUE, &self.name, queued);
                }
            }
        }
    }

    /// Give sequence `id` its next token from `row`, send it to the client, and say whether
    /// the sequence is done.
    fn advance(&mut self, id: SeqId, row: Row) -> Option<Outcome> {
        let (seq, r) = self.scheduler.get_mut(id)?;
        let Sampled {
            token,
            logprobs,
            grammar_done,
            guide_time,
        } = match r.sample(row) {
            Ok(s) => s,
            Err(e) => return Some(Outcome::Failed(e)),
        };
        if let Some(t) = guide_time {
            self.counters.guided_tokens += 1;
            self.counters.guide_seconds += t.as_secs_f64();
        }
        seq.token_ids.push(token);
        self.counters.generation_tokens += 1;
        match r.mark_token(Instant::now()) {
            TokenLatency::First(s) => telemetry::observe(telemetry::TTFT, &self.name, s),
            TokenLatency::Next(s) => telemetry::observe(telemetry::TPOT, &self.name, s),
        }
        let end_token = r.end_tokens.contains(&token);
        let step = if end_token {
            StopStep::default()
        } else {
            match r.detokenize(&self.tokenizer, seq) {
                Ok(step) => step,
                Err(e) => return Some(Outcome::Failed(e)),
            }
        };
        let reason = check_stop(&StopCheck {
            end_token,
            stop_string: step.stopped,
            grammar_done,
            num_output_tokens: seq.num_output_tokens(),
            num_tokens: seq.num_tokens(),
            min_tokens: r.params.sampling.min_tokens,
            max_tokens: r.params.max_tokens,
            max_model_len: self.cfg.max_model_len,
        });
        let event = EngineEvent::Token {
            token_id: token,
            text: step.emit,
            logprobs,
        };
        if r.events.send(event).is_err() {
            return Some(Outcome::Aborted);
        }
        reason.map(Outcome::Finished)
    }

    fn publish_stats(&self) {
        let (total, free) = (self.kv.num_blocks(), self.kv.num_free_blocks());
        let (queries, hits) = self.kv.prefix_cache_counters();
        let snapshot = EngineStats {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            num_free_blocks: free,
            num_total_blocks: total,
            num_kv_sequences: self.kv.num_sequences(),
            kv_cache_usage: if total == 0 {
                0.0
            } else {
                (total - free) as f64 / total as f64
            },
            num_preemptions: self.scheduler.num_preemptions(),
            num_steps: self.counters.num_steps,
            generation_tokens: self.counters.generation_tokens,
            prompt_tokens: self.counters.prompt_tokens,
            prefix_cache_queries: queries,
            prefix_cache_hits: hits,
            num_cached_blocks: self.kv.num_cached_blocks(),
            guided_tokens: self.counters.guided_tokens,
            guide_seconds: self.counters.guide_seconds,
        };
        if let Ok(mut s) = self.stats.lock() {
            *s = snapshot;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, GenerationRequest, SamplingParams};

    fn tiny() -> (Box<dyn CausalLm>, Arc<Tokenizer>) {
        let path = std::path::Path::new("synthetic:tiny");
        let model = crate::models::load_model(path, &candle_core::Device::Cpu, Some(64))
            .unwrap()
            .model;
        let tok = Arc::new(Tokenizer::synthetic(model.vocab_size()).unwrap());
        (model, tok)
    }

    fn config(num_blocks: usize, max_model_len: usize) -> EngineConfig {
        EngineConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            block_size: 4,
            num_blocks,
            max_model_len,
            max_waiting_requests: 8,
            enable_prefix_caching: true,
            cache_dtype: candle_core::DType::F32,
        }
    }

    fn request(max_tokens: usize) -> GenerationRequest {
        GenerationRequest {
            prompt_ids: vec![100, 200, 300],
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            skip_special_tokens: true,
            guide: None,
        }
    }

    #[test]
    fn a_context_longer_than_the_pool_is_refused_at_start() {
        let (model, tok) = tiny();
        let Err(e) = spawn_engine("t", model, tok, config(4, 17)) else {
            panic!("a 17-token context cannot fit 4 blocks of 4")
        };
        assert!(e.to_string().contains("max_model_len 17"), "{e}");
    }

    /// The thread ends once its handles are gone, after finishing or aborting what it holds:
    /// here one request that completed and one whose client left mid-generation.
    #[test]
    fn the_thread_ends_once_every_handle_is_gone() {
        let (model, tok) = tiny();
        let (handle, thread) = spawn_engine("t", model, tok, config(16, 64)).unwrap();
        let mut done = handle.submit(request(3)).unwrap();
        let mut tokens = 0;
        let reason = loop {
            match done.blocking_recv() {
                Some(EngineEvent::Token { .. }) => tokens += 1,
                Some(EngineEvent::Finished { reason, usage, .. }) => {
                    assert_eq!(usage.completion_tokens, 3);
                    break reason;
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!((tokens, reason), (3, FinishReason::Length));
        let mut left = handle.submit(request(50)).unwrap();
        assert!(matches!(
            left.blocking_recv(),
            Some(EngineEvent::Token { .. })
        ));
        drop(left);
        drop(handle);
        assert!(thread.join(Duration::from_secs(30)), "engine did not stop");
    }
}
