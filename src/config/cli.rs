//! The command line: subcommands and `serve`'s flags (each with its `INFERD_*` variable).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::file::FileEngine;

#[derive(Debug, Parser)]
#[command(
    name = "inferd",
    version,
    about = "An OpenAI-compatible LLM inference daemon with continuous batching and a paged KV cache."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a model and serve the OpenAI API over HTTP.
    Serve(ServeArgs),
    /// Benchmark an OpenAI-compatible server (this one, vLLM, llama.cpp...): throughput and
    /// latency at a given concurrency, as a table and one JSON line.
    Bench(super::BenchArgs),
    /// Evaluate models on an OpenAI-compatible server: a question suite with checks and a
    /// needle-in-a-haystack sweep, as a table, Markdown and JSON reports and a PNG heatmap.
    Eval(super::EvalArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file (see config/inferd.toml); flags given here override its values.
    #[arg(long, env = "INFERD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Model to serve: a .gguf file, a Hugging Face model directory (config.json,
    /// *.safetensors, tokenizer.json, tokenizer_config.json), or `synthetic:<preset>` — seeded
    /// random weights of a real shape, for benchmarks (tiny, tiny-moe, llama-1b-shape,
    /// llama-8b-shape, qwen2.5-0.5b-shape, deepseek-v2-lite-shape).
    /// [default: models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, fetched by scripts/fetch-models.sh]
    #[arg(long, env = "INFERD_MODEL")]
    pub model: Option<PathBuf>,

    /// Name clients pass as `model` in requests and see in /v1/models.
    /// [default: the model file's name without extension, or the directory's name]
    #[arg(long, env = "INFERD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Chat template to use instead of the model's own (vLLM's flag): a Jinja file, or the
    /// template itself when no file has that name and it holds `{{` or `{%`. For checkpoints
    /// whose template is missing or wrong; the tool-call format follows the template.
    /// [default: the model's template — tokenizer_config.json or GGUF metadata]
    #[arg(long, env = "INFERD_CHAT_TEMPLATE", value_name = "FILE|TEMPLATE")]
    pub chat_template: Option<String>,

    /// Address to listen on. [default: 127.0.0.1]
    #[arg(long, env = "INFERD_HOST")]
    pub host: Option<String>,

    /// Port to listen on (0 picks a free one). [default: 8000]
    #[arg(long, env = "INFERD_PORT")]
    pub port: Option<u16>,

    /// Require `Authorization: Bearer <KEY>` on every request (/metrics, /stats and the
    /// tokenizer routes included); only /health and /version stay open. [default: no key]
    #[arg(long, env = "INFERD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Web origins allowed to call the API from a browser (CORS), comma-separated, e.g.
    /// `https://app.example.com`; `*` allows any. Without it no CORS preflight is answered, so
    /// browsers refuse cross-origin calls. [default: none]
    #[arg(long, env = "INFERD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// CPU threads for the forward pass (matmuls, attention). [default: the physical cores in
    /// this process's CPU affinity, capped by a cgroup CPU quota]
    #[arg(long, env = "INFERD_THREADS")]
    pub threads: Option<usize>,

    /// Seconds to keep serving new requests after SIGTERM while `/ready` answers 503, so a
    /// load balancer's health check (or Kubernetes' endpoint update) takes this replica out of
    /// rotation before it stops listening. Set it a little above the balancer's check interval
    /// × fall count; 0 closes the listener at once. [default: 0]
    #[arg(long, env = "INFERD_DRAIN_DELAY", value_name = "SECS")]
    pub drain_delay: Option<u64>,

    /// Seconds in-flight requests may run once the listener has closed (after SIGTERM and the
    /// drain delay). When they are up, each remaining stream gets an error event and `[DONE]`,
    /// and each remaining non-streaming request a 503. [default: 30]
    #[arg(long, env = "INFERD_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,

    /// Seconds a connection has to deliver a request's complete headers once it is ready for
    /// one: new connections, slow senders (slowloris) and idle keep-alive connections are
    /// closed after it; responses being written, streams included, are not. [default: 30]
    #[arg(long, env = "INFERD_HEADER_READ_TIMEOUT", value_name = "SECS")]
    pub header_read_timeout: Option<u64>,

    /// Most open connections; one more gets a 503 and is closed. [default: 1024]
    #[arg(long, env = "INFERD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most sequences computed together in one forward pass (running batch size). [default: 32]
    #[arg(long, env = "INFERD_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,

    /// Most tokens computed in one forward pass; longer prompts are prefilled in chunks of
    /// this size, sharing the pass with running decodes. [default: 512]
    #[arg(long, env = "INFERD_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<usize>,

    /// Token positions per KV-cache block. [default: 16]
    #[arg(long, env = "INFERD_BLOCK_SIZE")]
    pub block_size: Option<usize>,

    /// Memory for the KV-cache block pool, e.g. 512MiB, 2GiB, 1000000 (bytes). [default: 512MiB]
    #[arg(long, env = "INFERD_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<String>,

    /// Longest sequence (prompt + generated tokens) served. [default: the model's context
    /// length, capped by what the KV pool holds]
    #[arg(long, env = "INFERD_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Turn off automatic prefix caching (reusing the KV blocks of identical prompt prefixes,
    /// e.g. a system prompt or an earlier chat turn). [default: on]
    #[arg(long, env = "INFERD_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,

    /// Requests that may wait beyond the --max-num-seqs that run; with that many running and
    /// waiting, new requests get a 503. [default: 256]
    #[arg(long, env = "INFERD_MAX_WAITING_REQUESTS")]
    pub max_waiting_requests: Option<usize>,

    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (GPU N; needs a build with
    /// `--features cuda`). On CUDA dense weights are bf16 and the KV cache stays on the GPU.
    /// [default: cpu]
    #[arg(long, env = "INFERD_DEVICE")]
    pub device: Option<String>,

    /// On CUDA: the fraction of the GPU's total memory this model may use (weights, activations
    /// and KV cache together, vLLM's meaning); the KV pool gets what the loaded weights and an
    /// activation reserve leave of it. Ignored when --kv-cache-memory is given, and on the CPU.
    /// [default: 0.9]
    #[arg(long, env = "INFERD_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: Option<f64>,

    /// Element type of the KV cache: `auto`, `f32`, `f16`, `bf16` or `q8_0`. `auto` is f16 on
    /// the CPU (half the memory and half the bytes attention reads per key, as llama.cpp's
    /// default) and the model's dtype (bf16) on CUDA. `q8_0` (CPU only; heads of a multiple of
    /// 32 values) stores int8 values with an f16 scale per 32: 53% of f16's memory, for long
    /// contexts. [default: auto]
    #[arg(long, env = "INFERD_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<String>,

    /// Quantize a Hugging Face (safetensors) checkpoint as it loads: `q8_0`, `q5_k`, `q4_k` or
    /// `q4_0`. Each bf16/f16/f32 matrix is read and quantized in turn (peak memory ≈ the
    /// quantized model plus one tensor) and runs on the quantized CPU kernels GGUF files use;
    /// the output head gets Q6_K below 8 bits, as llama.cpp's quantizer does (rows that are
    /// not whole 256-value super-blocks fall back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).
    /// An error for a GGUF file.
    /// [default: none — weights load as stored]
    #[arg(long, env = "INFERD_QUANTIZE")]
    pub quantize: Option<String>,
}

impl ServeArgs {
    /// The engine settings given as flags.
    pub(super) fn engine(&self) -> FileEngine {
        FileEngine {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            kv_cache_memory: self.kv_cache_memory.clone(),
            max_model_len: self.max_model_len,
            max_waiting_requests: self.max_waiting_requests,
            enable_prefix_caching: self.no_prefix_caching.then_some(false),
            device: self.device.clone(),
            gpu_memory_utilization: self.gpu_memory_utilization,
            kv_cache_dtype: self.kv_cache_dtype.clone(),
            quantize: self.quantize.clone(),
        }
    }
}
