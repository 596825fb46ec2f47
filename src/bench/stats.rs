//! Summary statistics and the report of a benchmark run (the figures `vllm bench serve` prints).

use serde::Serialize;

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct RequestResult {
    pub ok: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Seconds from send to the first generated text.
    pub ttft: f64,
    /// Seconds between consecutive streamed chunks after the first.
    pub itl: Vec<f64>,
    /// Seconds from send to the end of the response.
    pub e2e: f64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Dist {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

impl Dist {
    /// Of values in seconds; all zero when empty.
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self {
                mean_ms: 0.0,
                median_ms: 0.0,
                p99_ms: 0.0,
            };
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Self {
            mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1e3,
            median_ms: percentile(&v, 50.0) * 1e3,
            p99_ms: percentile(&v, 99.0) * 1e3,
        }
    }
}

/// Linear-interpolated percentile of sorted values (numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub base_url: String,
    /// The server's CPU kernel path and CPU flags, when it says (inferd's `/version`).
    pub cpu_kernels: Option<String>,
    pub cpu_flags: Option<String>,
    pub model: String,
    pub concurrency: usize,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Dist,
    pub tpot: Dist,
    pub itl: Dist,
    pub e2el: Dist,
}

impl Report {
    pub fn new(
        base_url: &str,
        model: &str,
        concurrency: usize,
        duration_s: f64,
        results: &[RequestResult],
    ) -> Self {
        let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
        let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let d = duration_s.max(1e-9);
        let tpot: Vec<f64> = ok
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| (r.e2e - r.ttft) / (r.output_tokens - 1) as f64)
            .collect();
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        Self {
            base_url: base_url.to_string(),
            cpu_kernels: None,
            cpu_flags: None,
            model: model.to_string(),
            concurrency,
            completed: ok.len(),
            failed: results.len() - ok.len(),
            duration_s,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: ok.len() as f64 / d,
            output_throughput: output as f64 / d,
            total_token_throughput: (input + output) as f64 / d,
            ttft: Dist::of(&ok.iter().map(|r| r.ttft).collect::<Vec<_>>()),
            tpot: Dist::of(&tpot),
            itl: Dist::of(&itl),
            e2el: Dist::of(&ok.iter().map(|r| r.e2e).collect::<Vec<_>>()),
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<40}{v:>12}\n"));
        s.push_str(&format!("{:=^52}\n", " Serving Benchmark Result "));
        if let Some(k) = &self.cpu_kernels {
            line(&mut s, "Server CPU kernels:", k.clone());
        }
        if let Some(f) = &self.cpu_flags {
            s.push_str(&format!("Server CPU flags: {f}\n"));
        }
        line(&mut s, "Successful requests:", self.completed.to_string());
        line(&mut s, "Failed requests:", self.failed.to_string());
        line(
            &mut s,
            "Maximum request concurrency:",
            self.concurrency.to_string(),
        );
        line(
            &mut s,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration_s),
        );
        line(
            &mut s,
            "Total input tokens:",
            self.total_input_tokens.to_string(),
        );
        line(
            &mut s,
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            &mut s,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        );
        line(
            &mut s,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput),
        );
        line(
            &mut s,
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        );
        for (title, short, d) in [
            ("Time to First Token", "TTFT", self.ttft),
            ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot),
            ("Inter-token Latency", "ITL", self.itl),
            ("End-to-end Latency", "E2EL", self.e2el),
        ] {
            s.push_str(&format!("{:-^52}\n", title));
            line(
                &mut s,
                &format!("Mean {short} (ms):"),
                format!("{:.2}", d.mean_ms),
            );
            line(
                &mut s,
                &format!("Median {short} (ms):"),
                format!("{:.2}", d.median_ms),
            );
            line(
                &mut s,
                &format!("P99 {short} (ms):"),
                format!("{:.2}", d.p99_ms),
            );
        }
        s.push_str(&"=".repeat(52));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        let d = Dist::of(&[0.3, 0.1, 0.2]);
        assert!((d.mean_ms - 200.0).abs() < 1e-9 && (d.median_ms - 200.0).abs() < 1e-9);
    }

    #[test]
    fn report_counts_only_successes_and_derives_rates() {
        let ok = RequestResult {
            ok: true,
            prompt_tokens: 10,
            output_tokens: 5,
            ttft: 0.1,
            itl: vec![0.05; 4],
            e2e: 0.3,
            ..Default::default()
        };
        let failed = RequestResult {
            error: Some("boom".into()),
            ..Default::default()
        };
        let r = Report::new("http://127.0.0.1:1", "m", 2, 2.0, &[ok.clone(), ok, failed]);
        assert_eq!((r.completed, r.failed), (2, 1));
        assert_eq!((r.total_input_tokens, r.total_output_tokens), (20, 10));
        assert_eq!(r.output_throughput, 5.0);
        assert_eq!(r.total_token_throughput, 15.0);
        assert!((r.tpot.mean_ms - 50.0).abs() < 1e-9);
        assert!(r.table().contains("Output token throughput (tok/s):"));
    }
}
