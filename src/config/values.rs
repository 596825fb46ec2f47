//! Setting values parsed from text: where a model runs, and its KV cache's element type.

use super::ConfigError;

/// The KV cache's element type as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// f16 on the CPU, the model's dtype on an accelerator.
    Auto,
    F32,
    F16,
    Bf16,
    /// int8 values with an f16 scale per 32 (llama.cpp's `q8_0`), on the CPU.
    Q8_0,
}

impl KvCacheDtype {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "q8_0" => Ok(Self::Q8_0),
            _ => Err(ConfigError::Invalid {
                field: "kv_cache_dtype",
                message: format!("expected `auto`, `f32`, `f16`, `bf16` or `q8_0`, got `{s}`"),
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
            Self::Q8_0 => crate::models::kv_cache::KV_Q8_0,
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
