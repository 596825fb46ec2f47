//! Configuration: the only code that reads command-line flags, config files and environment.
//! Precedence: flag (or its `INFERD_*` environment variable) > `--config` file > built-in default.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

pub const DEFAULT_MODEL_PATH: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

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
    Bench(crate::bench::BenchArgs),
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

    /// Address to listen on. [default: 127.0.0.1]
    #[arg(long, env = "INFERD_HOST")]
    pub host: Option<String>,

    /// Port to listen on (0 picks a free one). [default: 8000]
    #[arg(long, env = "INFERD_PORT")]
    pub port: Option<u16>,

    /// Require `Authorization: Bearer <KEY>` on every /v1/* request (/health, /version,
    /// /stats, /tokenize and /detokenize stay open). [default: no key]
    #[arg(long, env = "INFERD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

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

    /// Requests that may wait for admission; beyond this, new requests get a 503. [default: 256]
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

    /// Element type of the KV cache: `auto`, `f32`, `f16` or `bf16`. `auto` is f16 on the CPU
    /// (half the memory and half the bytes attention reads per key, as llama.cpp's default)
    /// and the model's dtype (bf16) on CUDA. [default: auto]
    #[arg(long, env = "INFERD_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<String>,
}

/// The config file's shape (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: FileServer,
    #[serde(default)]
    pub model: FileModel,
    #[serde(default)]
    pub engine: FileEngine,
    /// Several models in one daemon; each gets its own engine thread and KV pool.
    #[serde(default)]
    pub models: Vec<FileModelEntry>,
}

/// One `[[models]]` entry; its `[models.engine]` table overrides the engine settings for it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModelEntry {
    pub path: PathBuf,
    pub served_model_name: Option<String>,
    #[serde(default)]
    pub engine: FileEngine,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModel {
    pub path: Option<PathBuf>,
    pub served_model_name: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub block_size: Option<usize>,
    pub kv_cache_memory: Option<String>,
    pub max_model_len: Option<usize>,
    pub max_waiting_requests: Option<usize>,
    pub enable_prefix_caching: Option<bool>,
    pub device: Option<String>,
    pub gpu_memory_utilization: Option<f64>,
    pub kv_cache_dtype: Option<String>,
}

impl FileEngine {
    /// Each value from `self`, else from `lower`.
    fn over(self, lower: &FileEngine) -> FileEngine {
        FileEngine {
            max_num_seqs: self.max_num_seqs.or(lower.max_num_seqs),
            max_num_batched_tokens: self.max_num_batched_tokens.or(lower.max_num_batched_tokens),
            block_size: self.block_size.or(lower.block_size),
            kv_cache_memory: self
                .kv_cache_memory
                .or_else(|| lower.kv_cache_memory.clone()),
            max_model_len: self.max_model_len.or(lower.max_model_len),
            max_waiting_requests: self.max_waiting_requests.or(lower.max_waiting_requests),
            enable_prefix_caching: self.enable_prefix_caching.or(lower.enable_prefix_caching),
            device: self.device.or_else(|| lower.device.clone()),
            gpu_memory_utilization: self.gpu_memory_utilization.or(lower.gpu_memory_utilization),
            kv_cache_dtype: self.kv_cache_dtype.or_else(|| lower.kv_cache_dtype.clone()),
        }
    }

    fn resolve(&self) -> Result<EngineSettings, ConfigError> {
        let utilization = self.gpu_memory_utilization.unwrap_or(0.9);
        if !(utilization > 0.0 && utilization <= 1.0) {
            return Err(ConfigError::Invalid {
                field: "gpu_memory_utilization",
                message: format!("must be in (0, 1], got {utilization}"),
            });
        }
        Ok(EngineSettings {
            max_num_seqs: positive("max_num_seqs", self.max_num_seqs.unwrap_or(32))?,
            max_num_batched_tokens: positive(
                "max_num_batched_tokens",
                self.max_num_batched_tokens.unwrap_or(512),
            )?,
            block_size: positive("block_size", self.block_size.unwrap_or(16))?,
            kv_cache_memory: self
                .kv_cache_memory
                .as_deref()
                .map(parse_bytes)
                .transpose()
                .map_err(|message| ConfigError::Invalid {
                    field: "kv_cache_memory",
                    message,
                })?,
            max_model_len: self
                .max_model_len
                .map(|v| positive("max_model_len", v))
                .transpose()?,
            max_waiting_requests: self.max_waiting_requests.unwrap_or(256),
            enable_prefix_caching: self.enable_prefix_caching.unwrap_or(true),
            device: DeviceSpec::parse(self.device.as_deref().unwrap_or("cpu"))?,
            gpu_memory_utilization: utilization,
            kv_cache_dtype: KvCacheDtype::parse(self.kv_cache_dtype.as_deref().unwrap_or("auto"))?,
        })
    }
}

/// The KV cache's element type as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// f16 on the CPU, the model's dtype on an accelerator.
    Auto,
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(ConfigError::Invalid {
                field: "kv_cache_dtype",
                message: format!("expected `auto`, `f32`, `f16` or `bf16`, got `{s}`"),
            }),
        }
    }

    /// The dtype for a model whose activations are `model_dtype`, on the CPU or not.
    pub fn resolve(self, cpu: bool, model_dtype: candle_core::DType) -> candle_core::DType {
        use candle_core::DType;
        match self {
            Self::Auto if cpu => DType::F16,
            Self::Auto => model_dtype,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The CUDA device index, `None` for the CPU.
    pub fn cuda_ordinal(self) -> Option<usize> {
        match self {
            Self::Cpu => None,
            Self::Cuda(n) => Some(n),
        }
    }

    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Invalid {
            field: "device",
            message: format!("expected `cpu`, `cuda` or `cuda:N`, got `{s}`"),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ServeArgs {
    /// The engine settings given as flags.
    fn engine(&self) -> FileEngine {
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
        }
    }
}

/// Fully resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub models: Vec<ModelConfig>,
}

/// One served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub served_model_name: String,
    pub engine: EngineSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// Bytes for the KV pool; `None`: 512 MiB on the CPU, `gpu_memory_utilization` on CUDA.
    pub kv_cache_memory: Option<u64>,
    pub max_model_len: Option<usize>,
    pub max_waiting_requests: usize,
    pub enable_prefix_caching: bool,
    pub device: DeviceSpec,
    pub gpu_memory_utilization: f64,
    pub kv_cache_dtype: KvCacheDtype,
}

impl Config {
    /// Resolve flags over the file named by `--config` (if any) over defaults.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    /// Models: `--model` serves that one model; otherwise the file's `[[models]]`, or its
    /// `[model]`, or the default model. Engine settings: a model's own `[models.engine]` >
    /// flags > the file's `[engine]` > defaults.
    pub fn resolve(a: &ServeArgs, f: FileConfig) -> Result<Self, ConfigError> {
        let base = a.engine().over(&f.engine);
        let models = if a.model.is_some() || f.models.is_empty() {
            if !f.models.is_empty()
                && (f.model.path.is_some() || f.model.served_model_name.is_some())
            {
                return Err(ConfigError::Invalid {
                    field: "models",
                    message: "use either [model] or [[models]], not both".into(),
                });
            }
            let path = a
                .model
                .clone()
                .or(f.model.path)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_PATH));
            let name = a
                .served_model_name
                .clone()
                .or(f.model.served_model_name)
                .unwrap_or_else(|| default_served_name(&path));
            vec![ModelConfig {
                served_model_name: name,
                path,
                engine: base.resolve()?,
            }]
        } else {
            f.models
                .into_iter()
                .map(|m| {
                    Ok(ModelConfig {
                        served_model_name: m
                            .served_model_name
                            .unwrap_or_else(|| default_served_name(&m.path)),
                        engine: m.engine.over(&base).resolve()?,
                        path: m.path,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?
        };
        let mut names: Vec<&str> = models
            .iter()
            .map(|m| m.served_model_name.as_str())
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid {
                field: "served_model_name",
                message: format!("`{}` names two models", w[0]),
            });
        }
        Ok(Self {
            host: a
                .host
                .clone()
                .or(f.server.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: a.port.or(f.server.port).unwrap_or(8000),
            api_key: a
                .api_key
                .clone()
                .or(f.server.api_key)
                .filter(|k| !k.is_empty()),
            models,
        })
    }
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn positive(field: &'static str, v: usize) -> Result<usize, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            field,
            message: "must be at least 1, got 0".into(),
        });
    }
    Ok(v)
}

fn default_served_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `512MiB`, `2GiB`, `1.5GB`, `4096`, `64k` → bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like 512MiB or 2GiB, got `{s}`"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    let bytes = (n * mult).round();
    if bytes < 1.0 {
        return Err(format!("must be positive, got `{s}`"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[engine]\nmax_num_seqs = 4\nkv_cache_memory = \"1GiB\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            port: Some(1234),
            model: Some("/x/m.gguf".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args, file).unwrap();
        assert_eq!(c.port, 1234);
        assert_eq!(c.host, "0.0.0.0");
        let m = &c.models[0];
        assert_eq!(m.engine.max_num_seqs, 4);
        assert_eq!(m.engine.kv_cache_memory, Some(1 << 30));
        assert_eq!(m.engine.block_size, 16);
        assert_eq!(m.served_model_name, "m");
    }

    #[test]
    fn the_shipped_config_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/inferd.toml");
        let from_file = Config::resolve(&ServeArgs::default(), read_file(&path).unwrap()).unwrap();
        let defaults = Config::resolve(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(from_file, defaults);
    }

    #[test]
    fn several_models_with_their_own_engine_settings() {
        let file: FileConfig = toml::from_str(
            r#"
            [engine]
            max_num_seqs = 8
            [[models]]
            path = "models/a.gguf"
            [[models]]
            path = "models/b"
            served_model_name = "bee"
            [models.engine]
            kv_cache_memory = "64MiB"
            max_num_seqs = 2
            "#,
        )
        .unwrap();
        let args = ServeArgs {
            max_num_seqs: Some(6),
            ..Default::default()
        };
        let c = Config::resolve(&args, file).unwrap();
        let names: Vec<_> = c
            .models
            .iter()
            .map(|m| m.served_model_name.as_str())
            .collect();
        assert_eq!(names, ["a", "bee"]);
        assert_eq!(c.models[0].engine.max_num_seqs, 6, "flags over [engine]");
        assert_eq!(
            c.models[1].engine.max_num_seqs, 2,
            "a model's own settings win"
        );
        assert_eq!(c.models[1].engine.kv_cache_memory, Some(64 << 20));
        assert_eq!(c.models[0].engine.kv_cache_memory, None);

        let dup: FileConfig =
            toml::from_str("[[models]]\npath = \"x/a.gguf\"\n[[models]]\npath = \"y/a.gguf\"\n")
                .unwrap();
        let err = Config::resolve(&ServeArgs::default(), dup).unwrap_err();
        assert_eq!(err.to_string(), "served_model_name: `a` names two models");
    }

    #[test]
    fn rejects_unknown_keys_and_zero_limits() {
        assert!(toml::from_str::<FileConfig>("[engine]\nmax_seqs = 4\n").is_err());
        let args = ServeArgs {
            block_size: Some(0),
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "block_size: must be at least 1, got 0");
    }

    #[test]
    fn kv_cache_dtype_auto_is_f16_on_the_cpu_and_the_model_dtype_elsewhere() {
        use candle_core::DType;
        let file: FileConfig = toml::from_str("[engine]\nkv_cache_dtype = \"f32\"\n").unwrap();
        let c = Config::resolve(&ServeArgs::default(), file).unwrap();
        assert_eq!(c.models[0].engine.kv_cache_dtype, KvCacheDtype::F32);
        let auto = Config::resolve(&ServeArgs::default(), FileConfig::default()).unwrap();
        let auto = auto.models[0].engine.kv_cache_dtype;
        assert_eq!(auto.resolve(true, DType::F32), DType::F16);
        assert_eq!(auto.resolve(false, DType::BF16), DType::BF16);
        assert_eq!(
            KvCacheDtype::F32.resolve(false, DType::BF16),
            DType::F32,
            "an explicit choice holds everywhere"
        );
        let args = ServeArgs {
            kv_cache_dtype: Some("fp8".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kv_cache_dtype: expected `auto`, `f32`, `f16` or `bf16`, got `fp8`"
        );
    }
}
