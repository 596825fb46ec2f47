//! `eval`'s flags (beside the other flags, so `config` depends on nothing above it).

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Server to evaluate (any OpenAI-compatible one; its API lives under /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,

    /// Model to evaluate; repeat for several. [default: every model /v1/models lists]
    #[arg(long = "model")]
    pub models: Vec<String>,

    /// Bearer key for a server started with --api-key.
    #[arg(long, env = "INFERD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Questions with checks, one JSON object per line: {"id", "prompt", "check", "system"?,
    /// "max_tokens"?}, where check is one of {"contains": TEXT}, {"regex": PATTERN},
    /// {"number": X, "tolerance"?: T} (the answer's last number) or {"choice": ANSWER,
    /// "options": [...]} (the first option the answer names). [default: the built-in suite:
    /// arithmetic, geometry, logic riddles, code, facts]
    #[arg(long, value_name = "FILE.jsonl")]
    pub suite: Option<PathBuf>,

    /// Skip the question suite (run only --needle).
    #[arg(long)]
    pub no_suite: bool,

    /// Also run a needle-in-a-haystack sweep: a passphrase hidden at each depth of filler text
    /// of each length, scored per cell, written as a PNG heatmap and a table.
    #[arg(long)]
    pub needle: bool,

    /// Haystack lengths in tokens. [default: 512, doubling up to each model's max_model_len
    /// (from /v1/models) less room for the question and answer]
    #[arg(long, value_delimiter = ',')]
    pub needle_lengths: Option<Vec<usize>>,

    /// Needle depths, in percent of the haystack.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub needle_depths: Vec<u32>,

    /// Most tokens per answer (a question's own max_tokens wins).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// Where the reports go: report.md, report.json and needle-<model>.png.
    #[arg(long, default_value = "eval-out")]
    pub output: PathBuf,

    #[command(flatten)]
    pub limits: super::ClientLimits,
}
