//! `bench`'s flags. They live with the other flags, so `config` depends on nothing above it;
//! `bench` reads them.

use std::path::PathBuf;

/// The bounds of a client subcommand (`bench`, `eval`): per request, in all, and where to.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientLimits {
    /// Give up on one request after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,

    /// Stop sending new requests after this many seconds; what is left is reported as not run.
    #[arg(long, default_value_t = 3600)]
    pub max_duration: u64,

    /// Allow a base URL that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Server to benchmark (its OpenAI API lives under /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,

    /// Model name to request. [default: the first one /v1/models lists]
    #[arg(long)]
    pub model: Option<String>,

    /// Requests in flight at once; a comma-separated list runs each level in turn (1,16,64).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub concurrency: Vec<usize>,

    /// Requests to send in all (at each concurrency level).
    #[arg(long, default_value_t = 32)]
    pub num_requests: usize,

    /// Send this many requests per stream at each level instead of --num-requests (e.g. 4 with
    /// --concurrency 1,16,64 sends 4, 64 and 256), so every level runs about as long.
    #[arg(long)]
    pub requests_per_stream: Option<usize>,

    /// Prompt length in tokens (token ids from a fixed seeded sequence).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,

    /// Tokens to generate per request (EOS is ignored, so every request generates them all).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,

    /// Stream responses (needed for time-to-first-token and inter-token latency).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,

    /// Constrain every request's output: `json_object`, or a JSON schema (inline JSON, or
    /// @FILE) sent as a `json_schema` response format. Compare with a run without it to see
    /// what constrained decoding costs (the server's /stats reports its mask time).
    #[arg(long)]
    pub response_format: Option<String>,

    /// Offer these tools (a JSON array of OpenAI tools, inline or @FILE) with `tool_choice:
    /// required`: requests go to /v1/chat/completions with a synthetic user message of
    /// --prompt-tokens words, and every reply is a grammar-constrained call.
    #[arg(long)]
    pub tools: Option<String>,

    /// Seed of the prompt corpus.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub limits: ClientLimits,

    #[command(flatten)]
    pub serve: SelfServeArgs,
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct SelfServeArgs {
    /// Start inferd in-process on a loopback port and benchmark it (--base-url is ignored).
    #[arg(long)]
    pub self_serve: bool,

    /// Model for --self-serve: a .gguf file, a Hugging Face directory, or synthetic:<preset>.
    #[arg(long)]
    pub serve_model: Option<PathBuf>,

    /// Random-weight model for --self-serve (same as --serve-model synthetic:<NAME>): tiny,
    /// tiny-moe, llama-1b-shape, llama-8b-shape, qwen2.5-0.5b-shape, deepseek-v2-lite-shape.
    #[arg(long)]
    pub synthetic_model: Option<String>,

    /// Device for --self-serve: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// KV pool for --self-serve, e.g. 8GiB. [default: from GPU memory on CUDA, 512MiB on CPU]
    #[arg(long)]
    pub kv_cache_memory: Option<String>,

    /// Quantize the --self-serve model's matrices at load (q8_0, q5_k, q4_k, q4_0; safetensors
    /// directories and synthetic models), as `inferd serve --quantize`.
    #[arg(long)]
    pub quantize: Option<String>,

    /// Most tokens in one forward pass of the --self-serve daemon.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Skip the numerics check against the CPU.
    #[arg(long)]
    pub no_check: bool,
}
