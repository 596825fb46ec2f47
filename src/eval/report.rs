//! What `inferd eval` reports: the results of each model (suite answers, needle cells), and
//! their renderings — the terminal table, `report.md`, the heatmap's input.

use std::path::PathBuf;

use serde::Serialize;

use super::{heatmap, EvalArgs};

#[derive(Debug, Clone, Serialize)]
pub struct QuestionResult {
    pub id: String,
    pub passed: bool,
    pub answer: String,
    pub error: Option<String>,
    pub seconds: f64,
    pub completion_tokens: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleCell {
    /// Target haystack length in tokens.
    pub length: usize,
    pub depth: u32,
    /// The prompt's length as the server counted it.
    pub prompt_tokens: Option<u64>,
    /// Share of the passphrase recovered (0, 1/3, 2/3, 1); `None` when the cell did not run.
    pub score: Option<f64>,
    pub passphrase: String,
    pub answer: String,
    pub error: Option<String>,
}

impl QuestionResult {
    /// `error`, `pass` or `fail`.
    pub fn mark(&self) -> &'static str {
        match (&self.error, self.passed) {
            (Some(_), _) => "error",
            (None, true) => "pass",
            (None, false) => "fail",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleReport {
    pub lengths: Vec<usize>,
    pub depths: Vec<u32>,
    pub cells: Vec<NeedleCell>,
    /// The heatmap's file name, in the output directory.
    pub heatmap: String,
}

impl NeedleReport {
    /// The scores as a grid: a row per length, a column per depth (`None`: not run).
    pub fn grid(&self) -> Vec<Vec<Option<f64>>> {
        self.lengths
            .iter()
            .map(|&l| {
                self.depths
                    .iter()
                    .map(|&d| {
                        self.cells
                            .iter()
                            .find(|c| c.length == l && c.depth == d)
                            .and_then(|c| c.score)
                    })
                    .collect()
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub max_model_len: Option<u64>,
    pub passed: usize,
    pub total: usize,
    pub suite: Vec<QuestionResult>,
    pub needle: Option<NeedleReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub base_url: String,
    pub created: u64,
    pub models: Vec<ModelReport>,
}

pub(super) fn needle_heatmap(model: &str, n: &NeedleReport) -> heatmap::Heatmap {
    heatmap::Heatmap {
        title: format!("{model}: needle in a haystack"),
        rows: n.lengths.iter().map(|l| l.to_string()).collect(),
        columns: n.depths.iter().map(|d| format!("{d}%")).collect(),
        cells: n.grid(),
        row_axis: "context (tokens)".into(),
        column_axis: "needle depth (% of the context)".into(),
    }
}

/// The suite as a table (questions down, models across) and each model's needle grid.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    if report.models.iter().any(|m| !m.suite.is_empty()) {
        let width = report
            .models
            .first()
            .map_or(0, |m| m.suite.iter().map(|q| q.id.len()).max().unwrap_or(0))
            .max(8);
        out.push_str(&format!("{:width$}", "question"));
        for m in &report.models {
            out.push_str(&format!("  {:>12}", truncate(&m.model, 12)));
        }
        out.push('\n');
        if let Some(first) = report.models.first() {
            for (i, q) in first.suite.iter().enumerate() {
                out.push_str(&format!("{:width$}", q.id));
                for m in &report.models {
                    let mark = m.suite.get(i).map_or("-", QuestionResult::mark);
                    out.push_str(&format!("  {mark:>12}"));
                }
                out.push('\n');
            }
        }
        out.push_str(&format!("{:width$}", "passed"));
        for m in &report.models {
            out.push_str(&format!("  {:>12}", format!("{}/{}", m.passed, m.total)));
        }
        out.push('\n');
    }
    for m in &report.models {
        if let Some(n) = &m.needle {
            out.push_str(&format!(
                "\nneedle, {} (rows: tokens, columns: depth %)\n",
                m.model
            ));
            out.push_str(&needle_grid(n, "\t"));
        }
    }
    out
}

fn needle_grid(n: &NeedleReport, sep: &str) -> String {
    let mut out = format!("tokens{sep}");
    out.push_str(
        &n.depths
            .iter()
            .map(|d| format!("{d}%"))
            .collect::<Vec<_>>()
            .join(sep),
    );
    out.push('\n');
    for (l, row) in n.lengths.iter().zip(n.grid()) {
        let row: Vec<String> = row
            .iter()
            .map(|s| s.map_or("n/a".into(), |s| format!("{s:.2}")))
            .collect();
        out.push_str(&format!("{l}{sep}{}\n", row.join(sep)));
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

pub(super) fn markdown(report: &Report) -> String {
    let mut out = format!("# inferd eval\n\nServer: {}\n\n", report.base_url);
    if report.models.iter().any(|m| !m.suite.is_empty()) {
        out.push_str("## Suite\n\n| question |");
        for m in &report.models {
            out.push_str(&format!(" {} |", m.model));
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(report.models.len()));
        out.push('\n');
        if let Some(first) = report.models.first() {
            for (i, q) in first.suite.iter().enumerate() {
                out.push_str(&format!("| {} |", q.id));
                for m in &report.models {
                    let r = &m.suite[i];
                    let mark = match &r.error {
                        Some(e) => format!("error: {}", one_line(e, 60)),
                        None => r.mark().to_string(),
                    };
                    out.push_str(&format!(" {mark} |"));
                }
                out.push('\n');
            }
        }
        out.push_str("| **passed** |");
        for m in &report.models {
            out.push_str(&format!(" **{}/{}** |", m.passed, m.total));
        }
        out.push_str("\n\n### Answers\n\n");
        for m in &report.models {
            for r in &m.suite {
                out.push_str(&format!(
                    "- {} · {} · {}: {}\n",
                    m.model,
                    r.id,
                    if r.passed { "pass" } else { "fail" },
                    one_line(&r.answer, 200)
                ));
            }
        }
        out.push('\n');
    }
    for m in &report.models {
        if let Some(n) = &m.needle {
            out.push_str(&format!(
                "## Needle in a haystack: {}\n\n![heatmap]({})\n\nScore per cell (share of the \
                 passphrase recovered), context length in tokens down, needle depth across:\n\n",
                m.model, n.heatmap
            ));
            let grid = needle_grid(n, " | ");
            let mut lines = grid.lines();
            if let Some(head) = lines.next() {
                out.push_str(&format!("| {head} |\n|"));
                out.push_str(&"---|".repeat(n.depths.len() + 1));
                out.push('\n');
            }
            for l in lines {
                out.push_str(&format!("| {l} |\n"));
            }
            out.push('\n');
        }
    }
    out
}

fn one_line(s: &str, n: usize) -> String {
    truncate(&s.split_whitespace().collect::<Vec<_>>().join(" "), n)
}

/// Where `run` wrote its files.
pub fn outputs(args: &EvalArgs, report: &Report) -> Vec<PathBuf> {
    let mut out = vec![
        args.output.join("report.md"),
        args.output.join("report.json"),
    ];
    out.extend(
        report
            .models
            .iter()
            .filter_map(|m| m.needle.as_ref())
            .map(|n| args.output.join(&n.heatmap)),
    );
    out
}
