//! `inferd eval`: ask models on any OpenAI-compatible server a suite of questions with checks,
//! and (with `--needle`) sweep a needle-in-a-haystack grid of context lengths × depths; report
//! as a table, `report.md`, `report.json` and one `needle-<model>.png` heatmap per model. Like
//! `bench`, it targets loopback only unless `--allow-remote`, and is bounded in requests (the
//! suite and grid sizes) and time (`--request-timeout`, `--max-duration`).

pub mod check;
pub mod heatmap;
pub mod needle;
pub mod report;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use crate::config::EvalArgs;
use check::Check;
use needle::Needle;
use report::{markdown, needle_heatmap};
pub use report::{outputs, table, ModelReport, NeedleCell, NeedleReport, QuestionResult, Report};

/// The built-in suite (`--suite` replaces it).
const DEFAULT_SUITE: &str = include_str!("default_suite.jsonl");
/// Most questions a suite may hold.
const MAX_QUESTIONS: usize = 10_000;
/// Tokens a needle answer may take.
const NEEDLE_MAX_TOKENS: u32 = 32;
/// Tokens kept free beside the haystack: the question, the chat template, the answer.
const NEEDLE_RESERVE: usize = 64 + NEEDLE_MAX_TOKENS as usize;

/// One suite question.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub id: String,
    pub prompt: String,
    pub check: Check,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// Parse a JSONL suite (blank lines and `//` comments skipped), checking every check.
pub fn parse_suite(text: &str) -> anyhow::Result<Vec<Question>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let q: Question =
            serde_json::from_str(line).with_context(|| format!("suite line {}", i + 1))?;
        q.check
            .validate()
            .map_err(|e| anyhow::anyhow!("suite line {} ({}): {e}", i + 1, q.id))?;
        out.push(q);
    }
    if out.is_empty() {
        bail!("the suite has no questions");
    }
    if out.len() > MAX_QUESTIONS {
        bail!(
            "the suite has {} questions (at most {MAX_QUESTIONS})",
            out.len()
        );
    }
    Ok(out)
}

/// An answer from the server (or why there is none).
struct Answer {
    text: String,
    error: Option<String>,
    seconds: f64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    key: Option<String>,
    deadline: Instant,
    request_timeout: Duration,
}

impl Client {
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let url = self.base.join(path)?;
        let mut r = self.http.request(method, url);
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        Ok(r)
    }

    async fn models(&self) -> anyhow::Result<Vec<(String, Option<u64>)>> {
        let r = self
            .request(reqwest::Method::GET, "v1/models")?
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.context("/v1/models answered no JSON")?;
        if !status.is_success() {
            bail!("/v1/models: {status}: {}", v["error"]["message"]);
        }
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((m["id"].as_str()?.to_string(), m["max_model_len"].as_u64()))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Characters per token of the filler text for `model`, from the server's /tokenize when
    /// it has one (inferd and vLLM do), else the usual 4.
    async fn chars_per_token(&self, model: &str) -> f64 {
        let sample = needle::haystack(4000, 50, &Needle::new(0), 0);
        let counted = async {
            let r = self
                .request(reqwest::Method::POST, "tokenize")
                .ok()?
                .json(&json!({"model": model, "prompt": sample}))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            v["count"]
                .as_u64()
                .or_else(|| v["tokens"].as_array().map(|t| t.len() as u64))
        };
        match counted.await {
            Some(n) if n > 0 => sample.len() as f64 / n as f64,
            _ => 4.0,
        }
    }

    async fn chat(
        &self,
        model: &str,
        system: Option<&str>,
        prompt: &str,
        max_tokens: u32,
    ) -> Answer {
        let started = Instant::now();
        let fail = |e: String| Answer {
            text: String::new(),
            error: Some(e),
            seconds: started.elapsed().as_secs_f64(),
            prompt_tokens: None,
            completion_tokens: None,
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return fail("not run: --max-duration reached".into());
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        let body = json!({"model": model, "messages": messages, "max_tokens": max_tokens,
                          "temperature": 0});
        let sent = match self.request(reqwest::Method::POST, "v1/chat/completions") {
            Ok(r) => {
                r.json(&body)
                    .timeout(left.min(self.request_timeout))
                    .send()
                    .await
            }
            Err(e) => return fail(e.to_string()),
        };
        let r = match sent {
            Ok(r) => r,
            Err(e) => return fail(format!("request failed: {e}")),
        };
        let status = r.status();
        let v: Value = match r.json().await {
            Ok(v) => v,
            Err(e) => return fail(format!("{status}: {e}")),
        };
        if !status.is_success() {
            return fail(format!(
                "{status}: {}",
                v["error"]["message"].as_str().unwrap_or("")
            ));
        }
        Answer {
            text: v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            error: None,
            seconds: started.elapsed().as_secs_f64(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64(),
            completion_tokens: v["usage"]["completion_tokens"].as_u64(),
        }
    }
}

/// The needle lengths for a model: as given, or 512 doubling while the haystack, the question
/// and the answer fit `max_model_len`.
pub fn needle_lengths(given: Option<&[usize]>, max_model_len: Option<u64>) -> Vec<usize> {
    if let Some(g) = given {
        return g.to_vec();
    }
    let Some(max) = max_model_len else {
        return vec![512, 1024, 2048];
    };
    let mut out = Vec::new();
    let mut len = 512;
    while len + NEEDLE_RESERVE <= max as usize {
        out.push(len);
        len *= 2;
    }
    if out.is_empty() && max as usize > NEEDLE_RESERVE + 64 {
        out.push(max as usize - NEEDLE_RESERVE);
    }
    out
}

enum Job {
    Question { model: usize, question: usize },
    Needle { model: usize, cell: usize },
}

/// Run the evaluation and write its reports into `--output`; returns the report.
pub async fn run(args: &EvalArgs) -> anyhow::Result<Report> {
    let base = reqwest::Url::parse(&args.base_url)
        .with_context(|| format!("--base-url {}", args.base_url))?;
    crate::bench::check_loopback(&base, args.limits.allow_remote)?;
    let base = if base.path().ends_with('/') {
        base
    } else {
        reqwest::Url::parse(&format!("{base}/"))?
    };
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let suite = if args.no_suite {
        Vec::new()
    } else {
        match &args.suite {
            Some(p) => parse_suite(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )?,
            None => parse_suite(DEFAULT_SUITE)?,
        }
    };
    if suite.is_empty() && !args.needle {
        bail!("nothing to run: --no-suite without --needle");
    }
    let client = Client {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        base: base.clone(),
        key: args.api_key.clone(),
        deadline: Instant::now() + Duration::from_secs(args.limits.max_duration),
        request_timeout: Duration::from_secs(args.limits.request_timeout),
    };
    let served = client.models().await?;
    let models: Vec<(String, Option<u64>)> = if args.models.is_empty() {
        served
    } else {
        args.models
            .iter()
            .map(|m| match served.iter().find(|(id, _)| id == m) {
                Some(found) => Ok(found.clone()),
                None => bail!(
                    "--model {m}: the server has {:?}",
                    served.iter().map(|(id, _)| id).collect::<Vec<_>>()
                ),
            })
            .collect::<anyhow::Result<_>>()?
    };
    if models.is_empty() {
        bail!("the server lists no models");
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;

    // Every request, planned up front (bounded), then run `--concurrency` at a time.
    let mut reports: Vec<ModelReport> = Vec::new();
    let mut jobs = Vec::new();
    let mut needles: Vec<Vec<(Needle, String)>> = Vec::new();
    for (m, (model, max_len)) in models.iter().enumerate() {
        for q in 0..suite.len() {
            jobs.push(Job::Question {
                model: m,
                question: q,
            });
        }
        let mut cells = Vec::new();
        let mut prompts = Vec::new();
        let mut needle = None;
        if args.needle {
            let lengths = needle_lengths(args.needle_lengths.as_deref(), *max_len);
            let cpt = client.chars_per_token(model).await;
            for &length in &lengths {
                for &depth in &args.needle_depths {
                    let seed = (length as u64) << 8 | depth as u64;
                    let n = Needle::new(seed);
                    let hay = needle::haystack((length as f64 * cpt) as usize, depth, &n, seed);
                    cells.push(NeedleCell {
                        length,
                        depth,
                        prompt_tokens: None,
                        score: None,
                        passphrase: n.passphrase.clone(),
                        answer: String::new(),
                        error: None,
                    });
                    jobs.push(Job::Needle {
                        model: m,
                        cell: cells.len() - 1,
                    });
                    prompts.push((n, needle::question(&hay)));
                }
            }
            needle = Some(NeedleReport {
                lengths,
                depths: args.needle_depths.clone(),
                cells,
                heatmap: format!("needle-{}.png", file_safe(model)),
            });
        }
        needles.push(prompts);
        reports.push(ModelReport {
            model: model.clone(),
            max_model_len: *max_len,
            passed: 0,
            total: suite.len(),
            suite: Vec::new(),
            needle,
        });
    }

    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests, {elapsed} ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let names: Vec<String> = models.iter().map(|(m, _)| m.clone()).collect();
    let results: Vec<(Job, Answer)> = futures::stream::iter(jobs)
        .map(|job| {
            let (client, suite, needles, names, bar) = (&client, &suite, &needles, &names, &bar);
            async move {
                let answer = match &job {
                    Job::Question { model, question } => {
                        let q = &suite[*question];
                        client
                            .chat(
                                &names[*model],
                                q.system.as_deref(),
                                &q.prompt,
                                q.max_tokens.unwrap_or(args.max_tokens),
                            )
                            .await
                    }
                    Job::Needle { model, cell } => {
                        let (_, prompt) = &needles[*model][*cell];
                        client
                            .chat(&names[*model], None, prompt, NEEDLE_MAX_TOKENS)
                            .await
                    }
                };
                bar.inc(1);
                (job, answer)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    bar.finish_and_clear();

    let mut by_question: Vec<Vec<Option<QuestionResult>>> =
        vec![vec![None; suite.len()]; models.len()];
    for (job, a) in results {
        match job {
            Job::Question { model, question } => {
                let q = &suite[question];
                by_question[model][question] = Some(QuestionResult {
                    id: q.id.clone(),
                    passed: a.error.is_none() && q.check.passes(&a.text),
                    answer: a.text,
                    error: a.error,
                    seconds: a.seconds,
                    completion_tokens: a.completion_tokens,
                });
            }
            Job::Needle { model, cell } => {
                let n = &needles[model][cell].0;
                if let Some(report) = reports[model].needle.as_mut() {
                    let c = &mut report.cells[cell];
                    c.score = a.error.is_none().then(|| n.score(&a.text));
                    c.prompt_tokens = a.prompt_tokens;
                    c.answer = a.text;
                    c.error = a.error;
                }
            }
        }
    }
    for (report, results) in reports.iter_mut().zip(by_question) {
        report.suite = results.into_iter().flatten().collect();
        report.passed = report.suite.iter().filter(|r| r.passed).count();
        if let Some(n) = &report.needle {
            let png = heatmap::render(&needle_heatmap(&report.model, n))?;
            write(&args.output.join(&n.heatmap), &png)?;
        }
    }
    let report = Report {
        base_url: args.base_url.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        models: reports,
    };
    write(
        &args.output.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write(&args.output.join("report.md"), markdown(&report).as_bytes())?;
    Ok(report)
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// A model name as a file name.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_suite_parses_and_each_check_is_valid() {
        let suite = parse_suite(DEFAULT_SUITE).unwrap();
        assert!(suite.len() >= 8);
        let mut ids: Vec<_> = suite.iter().map(|q| &q.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), suite.len(), "ids are unique");
    }

    #[test]
    fn bad_suites_are_refused_with_the_line() {
        let e = parse_suite("{\"id\": \"a\", \"prompt\": \"p\", \"check\": {\"regex\": \"(\"}}")
            .unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        assert!(parse_suite("\n// only a comment\n").is_err());
        assert!(
            parse_suite("{\"id\": \"a\", \"prompt\": \"p\", \"check\": {\"nope\": 1}}").is_err()
        );
    }

    #[test]
    fn needle_lengths_double_within_the_context() {
        assert_eq!(needle_lengths(None, Some(4096)), vec![512, 1024, 2048]);
        assert_eq!(needle_lengths(None, Some(32768)).last(), Some(&16384));
        assert_eq!(needle_lengths(None, Some(400)), vec![400 - NEEDLE_RESERVE]);
        assert_eq!(needle_lengths(Some(&[100, 200]), Some(64)), vec![100, 200]);
    }
}
