//! Configuration: the only code that reads command-line flags, config files and environment.
//! Precedence: flag (or its `INFERD_*` environment variable) > `--config` file > built-in default.

use std::path::{Path, PathBuf};

mod bench_args;
mod cli;
mod eval_args;
mod file;
mod values;

pub use bench_args::{BenchArgs, ClientLimits, SelfServeArgs};
pub use cli::{Cli, Command, ServeArgs};
pub use eval_args::EvalArgs;
pub use file::{FileConfig, FileEngine, FileModel, FileModelEntry, FileServer};
pub use values::{DeviceSpec, KvCacheDtype};

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

/// Fully resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// After SIGTERM, how long new requests are still served while `/ready` answers 503.
    pub drain_delay: std::time::Duration,
    /// Compute threads (`None`: the default, see `models::layers::pool::default_threads`).
    pub threads: Option<usize>,
    /// After the drain delay, how long in-flight requests may run before they are ended.
    pub shutdown_timeout: std::time::Duration,
    pub connection_limits: crate::server::ConnectionLimits,
    /// Browser origins answered CORS preflights (`*`: any); empty: none.
    pub allowed_origins: Vec<String>,
    pub models: Vec<ModelConfig>,
}

/// The default of `--shutdown-timeout`, in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;

/// One served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub served_model_name: String,
    /// `--chat-template`: a file or the template itself, in place of the model's own.
    pub chat_template: Option<String>,
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
    /// Quantize a safetensors checkpoint's matrices at load.
    pub quantize: Option<crate::models::quantize::LoadQuant>,
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
                && (f.model.path.is_some()
                    || f.model.served_model_name.is_some()
                    || f.model.chat_template.is_some())
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
                chat_template: a.chat_template.clone().or(f.model.chat_template),
                engine: base.resolve()?,
            }]
        } else {
            if a.chat_template.is_some() {
                return Err(ConfigError::Invalid {
                    field: "chat_template",
                    message: "--chat-template is for one model; with [[models]], give each entry its own chat_template".into(),
                });
            }
            f.models
                .into_iter()
                .map(|m| {
                    Ok(ModelConfig {
                        served_model_name: m
                            .served_model_name
                            .unwrap_or_else(|| default_served_name(&m.path)),
                        engine: m.engine.over(&base).resolve()?,
                        chat_template: m.chat_template,
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
        let connection_limits = connection_limits(a, &f.server)?;
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
            drain_delay: std::time::Duration::from_secs(
                a.drain_delay.or(f.server.drain_delay).unwrap_or(0),
            ),
            threads: a.threads.or(f.server.threads),
            shutdown_timeout: std::time::Duration::from_secs(
                a.shutdown_timeout
                    .or(f.server.shutdown_timeout)
                    .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            ),
            connection_limits,
            allowed_origins: a
                .allowed_origins
                .clone()
                .or(f.server.allowed_origins)
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            models,
        })
    }
}

fn connection_limits(
    a: &ServeArgs,
    f: &file::FileServer,
) -> Result<crate::server::ConnectionLimits, ConfigError> {
    let d = crate::server::ConnectionLimits::default();
    let secs = a
        .header_read_timeout
        .or(f.header_read_timeout)
        .unwrap_or(d.header_read_timeout.as_secs());
    let max_connections = a
        .max_connections
        .or(f.max_connections)
        .unwrap_or(d.max_connections);
    if secs == 0 || max_connections == 0 {
        return Err(ConfigError::Invalid {
            field: "header_read_timeout / max_connections",
            message: "must be at least 1".into(),
        });
    }
    Ok(crate::server::ConnectionLimits {
        header_read_timeout: std::time::Duration::from_secs(secs),
        max_connections,
    })
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
    fn chat_template_from_the_flag_the_file_or_each_model() {
        let file = |t: &str| -> FileConfig { toml::from_str(t).unwrap() };
        let flag = ServeArgs {
            chat_template: Some("t.jinja".into()),
            ..Default::default()
        };
        let c = Config::resolve(&flag, file("[model]\nchat_template = \"f.jinja\"\n")).unwrap();
        assert_eq!(c.models[0].chat_template.as_deref(), Some("t.jinja"));
        let c = Config::resolve(
            &ServeArgs::default(),
            file("[model]\nchat_template = \"f.jinja\"\n"),
        )
        .unwrap();
        assert_eq!(c.models[0].chat_template.as_deref(), Some("f.jinja"));
        let two = "[[models]]\npath = \"a.gguf\"\nchat_template = \"a.jinja\"\n[[models]]\npath = \"b.gguf\"\n";
        let c = Config::resolve(&ServeArgs::default(), file(two)).unwrap();
        let templates: Vec<_> = c
            .models
            .iter()
            .map(|m| m.chat_template.as_deref())
            .collect();
        assert_eq!(templates, [Some("a.jinja"), None]);
        assert_eq!(
            Config::resolve(&flag, file(two)).unwrap_err().to_string(),
            "chat_template: --chat-template is for one model; with [[models]], give each entry its own chat_template"
        );
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
            "kv_cache_dtype: expected `auto`, `f32`, `f16`, `bf16` or `q8_0`, got `fp8`"
        );
    }

    #[test]
    fn quantize_comes_from_the_file_or_the_flag_and_is_checked() {
        use crate::models::quantize::LoadQuant;
        let none = Config::resolve(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(none.models[0].engine.quantize, None);
        let file = || -> FileConfig { toml::from_str("[engine]\nquantize = \"q4_k\"\n").unwrap() };
        let c = Config::resolve(&ServeArgs::default(), file()).unwrap();
        assert_eq!(c.models[0].engine.quantize, Some(LoadQuant::Q4K));
        let args = ServeArgs {
            quantize: Some("Q8_0".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args, file()).unwrap();
        assert_eq!(
            c.models[0].engine.quantize,
            Some(LoadQuant::Q8_0),
            "the flag wins"
        );
        let args = ServeArgs {
            quantize: Some("int4".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "quantize: expected `q8_0`, `q5_k`, `q4_k` or `q4_0`, got `int4`"
        );
    }
}
