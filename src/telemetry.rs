//! Prometheus metrics under vLLM's names (so existing vLLM Grafana dashboards work), each with
//! a `model_name` label, and [`EngineStats`], the snapshot an engine publishes after every step.
//! Engines record per-request latencies as they happen; gauges and counters are set from the
//! engines' latest snapshots when `/metrics` is scraped. Every metric of a model is registered
//! when its engine starts, so a scrape before the first request already lists them all. This
//! module imports nothing of the engine's: the engine writes the snapshot, `/stats` and
//! `/metrics` read it.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// One engine's state after a step: what `/stats` shows and `/metrics` exports.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, PartialEq)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub num_kv_sequences: usize,
    /// Fraction of the KV blocks in use.
    pub kv_cache_usage: f64,
    pub num_preemptions: u64,
    pub num_steps: u64,
    pub generation_tokens: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Blocks holding a cached prefix (free or in use).
    pub num_cached_blocks: usize,
    /// Tokens sampled under a grammar, and the time spent computing their masks and advancing
    /// their matchers (the cost of constrained decoding, apart from the forward pass).
    pub guided_tokens: u64,
    pub guide_seconds: f64,
}

pub const TTFT: &str = "vllm:time_to_first_token_seconds";
pub const TPOT: &str = "vllm:time_per_output_token_seconds";
pub const E2E: &str = "vllm:e2e_request_latency_seconds";
pub const QUEUE: &str = "vllm:request_queue_time_seconds";
pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
/// Requests turned away before reaching an engine (inferd's own; vLLM has no bound to hit).
pub const REJECTED: &str = "inferd:requests_rejected_total";

/// vLLM's latency buckets (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// The process-wide recorder (installed once; later calls return the same handle). `None` if
/// another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut b = PrometheusBuilder::new();
            for name in [TTFT, TPOT, E2E, QUEUE] {
                b = b
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), LATENCY_BUCKETS)
                    .ok()?;
            }
            b.install_recorder().ok()
        })
        .clone()
}

pub fn observe(metric: &'static str, model: &str, seconds: f64) {
    histogram!(metric, "model_name" => model.to_string()).record(seconds);
}

/// The `finished_reason` labels of [`REQUEST_SUCCESS`].
pub const FINISHED_REASONS: [&str; 3] = ["stop", "length", "abort"];

/// A request ended; `reason` is one of [`FINISHED_REASONS`].
pub fn request_finished(model: &str, reason: &'static str) {
    counter!(REQUEST_SUCCESS, "model_name" => model.to_string(), "finished_reason" => reason)
        .increment(1);
}

/// A request was turned away (`reason`: `overloaded`).
pub fn request_rejected(reason: &'static str) {
    counter!(REJECTED, "reason" => reason).increment(1);
}

/// Register every metric of `model` (histograms empty, counters and gauges at zero), so they
/// exist before its first request.
pub fn register_model(model: &str) {
    for name in [TTFT, TPOT, E2E, QUEUE] {
        let _ = histogram!(name, "model_name" => model.to_string());
    }
    for reason in FINISHED_REASONS {
        counter!(REQUEST_SUCCESS, "model_name" => model.to_string(), "finished_reason" => reason)
            .increment(0);
    }
    counter!(REJECTED, "reason" => "overloaded").increment(0);
    publish_engine(model, &EngineStats::default());
}

/// Publish one engine's snapshot as gauges and (monotonic) counters.
pub fn publish_engine(model: &str, s: &EngineStats) {
    let m = || vec![metrics::Label::new("model_name", model.to_string())];
    gauge!("vllm:num_requests_running", m()).set(s.num_running as f64);
    gauge!("vllm:num_requests_waiting", m()).set(s.num_waiting as f64);
    gauge!("vllm:kv_cache_usage_perc", m()).set(s.kv_cache_usage);
    counter!("vllm:num_preemptions_total", m()).absolute(s.num_preemptions);
    counter!("vllm:prefix_cache_queries_total", m()).absolute(s.prefix_cache_queries);
    counter!("vllm:prefix_cache_hits_total", m()).absolute(s.prefix_cache_hits);
    counter!("vllm:prompt_tokens_total", m()).absolute(s.prompt_tokens);
    counter!("vllm:generation_tokens_total", m()).absolute(s.generation_tokens);
    counter!("inferd:guided_tokens_total", m()).absolute(s.guided_tokens);
    gauge!("inferd:guide_seconds_total", m()).set(s.guide_seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape right after an engine starts lists every metric of its model.
    #[test]
    fn every_metric_exists_before_the_first_request() {
        let Some(handle) = install() else {
            panic!("another recorder owns the process")
        };
        register_model("fresh");
        let text = handle.render();
        let label = "model_name=\"fresh\"";
        for name in [TTFT, TPOT, E2E, QUEUE] {
            let count = format!("{name}_count{{{label}}} 0");
            assert!(text.contains(&count), "{count} missing:\n{text}");
        }
        for reason in FINISHED_REASONS {
            let line = format!("{REQUEST_SUCCESS}{{{label},finished_reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for gauge in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc"] {
            assert!(text.contains(&format!("{gauge}{{{label}}} 0")), "{gauge}");
        }
    }
}
