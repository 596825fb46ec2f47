//! The config file's shape (`config/inferd.toml`): every key optional, unknown keys refused.

use std::path::PathBuf;

use serde::Deserialize;

use super::{parse_bytes, positive, ConfigError, DeviceSpec, EngineSettings, KvCacheDtype};
use crate::models::quantize::LoadQuant;

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
    pub chat_template: Option<String>,
    #[serde(default)]
    pub engine: FileEngine,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_key: Option<String>,
    pub drain_delay: Option<u64>,
    pub threads: Option<usize>,
    pub shutdown_timeout: Option<u64>,
    pub header_read_timeout: Option<u64>,
    pub max_connections: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModel {
    pub path: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub chat_template: Option<String>,
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
    pub quantize: Option<String>,
}

impl FileEngine {
    /// Each value from `self`, else from `lower`.
    pub(super) fn over(self, lower: &FileEngine) -> FileEngine {
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
            quantize: self.quantize.or_else(|| lower.quantize.clone()),
        }
    }

    pub(super) fn resolve(&self) -> Result<EngineSettings, ConfigError> {
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
            quantize: self
                .quantize
                .as_deref()
                .map(|s| {
                    LoadQuant::parse(s).ok_or_else(|| ConfigError::Invalid {
                        field: "quantize",
                        message: format!("expected {}, got `{s}`", LoadQuant::NAMES),
                    })
                })
                .transpose()?,
        })
    }
}
