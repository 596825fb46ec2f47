//! Prometheus metrics under vLLM's names (so existing vLLM Grafana dashboards work), each with
//! a `model_name` label. Engines record per-request latencies as they happen; gauges and
//! counters are read from the engines' live counters when `/metrics` is scraped.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::StatsSnapshot;

pub const TTFT: &str = "vllm:time_to_first_token_seconds";
pub const TPOT: &str = "vllm:time_per_output_token_seconds";
pub const E2E: &str = "vllm:e2e_request_latency_seconds";
pub const QUEUE: &str = "vllm:request_queue_time_seconds";
pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";

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

/// A request ended; `reason` is `stop`, `length` or `abort`.
pub fn request_finished(model: &str, reason: &'static str) {
    counter!(REQUEST_SUCCESS, "model_name" => model.to_string(), "finished_reason" => reason)
        .increment(1);
}

/// Publish one engine's counters as gauges and (monotonic) counters.
pub fn publish_engine(model: &str, s: &StatsSnapshot) {
    let m = || vec![metrics::Label::new("model_name", model.to_string())];
    gauge!("vllm:num_requests_running", m()).set(s.num_running as f64);
    gauge!("vllm:num_requests_waiting", m()).set(s.num_waiting as f64);
    gauge!("vllm:kv_cache_usage_perc", m()).set(s.kv_cache_usage);
    counter!("vllm:num_preemptions_total", m()).absolute(s.num_preemptions);
    counter!("vllm:prefix_cache_queries_total", m()).absolute(s.prefix_cache_queries);
    counter!("vllm:prefix_cache_hits_total", m()).absolute(s.prefix_cache_hits);
    counter!("vllm:prompt_tokens_total", m()).absolute(s.prompt_tokens);
    counter!("vllm:generation_tokens_total", m()).absolute(s.generation_tokens);
}
