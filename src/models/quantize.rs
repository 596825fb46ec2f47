//! Quantizing a dense checkpoint's weight matrices as they load (`--quantize`), so a bf16 or
//! f32 Hugging Face directory runs on the quantized CPU kernels that GGUF files use, in a
//! fraction of the memory.
//!
//! The types follow what llama.cpp's `llama-quantize` picks for the same request: the output
//! head (and a tied embedding table, which is the head too) one step finer — Q6_K below
//! 8 bits, where its rows allow — and the k-quant fallbacks for rows that are not a whole
//! number of 256-element super-blocks (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0). A matrix whose rows are
//! not a whole number of 32-element blocks stays dense. Norms, biases and the small tensors
//! models read densely (MoE routers, MLA's absorbed `kv_b_proj`) are never quantized.
//! Rows are quantized in parallel on the compute pool; the bytes are the same as one thread's.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::layers::pool::{for_each_range, SyncPtr};
use super::Result;

/// A `--quantize` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadQuant {
    Q8_0,
    Q5K,
    Q4K,
    Q4_0,
}

/// What a matrix is to the model, which decides its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The output head (or the embedding table it is tied to).
    Output,
    /// Every other matrix.
    Other,
}

impl LoadQuant {
    pub const NAMES: &'static str = "`q8_0`, `q5_k`, `q4_k` or `q4_0`";

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" => Some(Self::Q8_0),
            "q5_k" | "q5_k_s" => Some(Self::Q5K),
            "q4_k" | "q4_k_s" => Some(Self::Q4K),
            "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q5K => "q5_k",
            Self::Q4K => "q4_k",
            Self::Q4_0 => "q4_0",
        }
    }

    /// The type of a `role` matrix whose rows hold `cols` values; `None` keeps it dense.
    pub fn type_for(self, role: Role, cols: usize) -> Option<GgmlDType> {
        let wanted = match (self, role) {
            (Self::Q8_0, _) => GgmlDType::Q8_0,
            (_, Role::Output) => GgmlDType::Q6K,
            (Self::Q5K, Role::Other) => GgmlDType::Q5K,
            (Self::Q4K, Role::Other) => GgmlDType::Q4K,
            (Self::Q4_0, Role::Other) => GgmlDType::Q4_0,
        };
        let fallback = match wanted {
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
        [wanted, fallback]
            .into_iter()
            .find(|t| cols > 0 && cols.is_multiple_of(t.block_size()))
    }
}

/// `values` (`rows × cols`, row-major) as a `dtype` matrix on `device`. `cols` must be a
/// multiple of the type's block size ([`LoadQuant::type_for`] sees to it).
pub fn quantize_rows(
    values: &[f32],
    (rows, cols): (usize, usize),
    dtype: GgmlDType,
    device: &Device,
) -> Result<QTensor> {
    debug_assert_eq!(values.len(), rows * cols);
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let mut out = vec![0u8; rows * row_bytes];
    let dst = SyncPtr(out.as_mut_ptr());
    let failed = std::sync::Mutex::new(None);
    for_each_range(rows, |range| {
        let part = || -> Result<()> {
            let src = &values[range.start * cols..range.end * cols];
            let t = Tensor::from_slice(src, (range.len(), cols), &Device::Cpu)?;
            let q = QTensor::quantize(&t, dtype)?;
            let bytes = q.data()?;
            // SAFETY: each range writes only its own rows of `out`, which outlives the pool's
            // work (for_each_range returns when every range is done).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    dst.get().add(range.start * row_bytes),
                    range.len() * row_bytes,
                )
            };
            dst.copy_from_slice(&bytes);
            Ok(())
        };
        if let Err(e) = part() {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_llama_cpp_with_its_fallbacks() {
        use GgmlDType as T;
        let q4k = LoadQuant::Q4K;
        assert_eq!(q4k.type_for(Role::Other, 4096), Some(T::Q4K));
        assert_eq!(q4k.type_for(Role::Other, 896), Some(T::Q5_0));
        assert_eq!(q4k.type_for(Role::Output, 4096), Some(T::Q6K));
        assert_eq!(q4k.type_for(Role::Output, 896), Some(T::Q8_0));
        assert_eq!(q4k.type_for(Role::Other, 100), None);
        let q5k = LoadQuant::Q5K;
        assert_eq!(q5k.type_for(Role::Other, 4864), Some(T::Q5K));
        assert_eq!(q5k.type_for(Role::Other, 896), Some(T::Q5_1));
        assert_eq!(q5k.type_for(Role::Output, 896), Some(T::Q8_0));
        assert_eq!(LoadQuant::Q4_0.type_for(Role::Other, 64), Some(T::Q4_0));
        assert_eq!(LoadQuant::Q4_0.type_for(Role::Output, 512), Some(T::Q6K));
        assert_eq!(LoadQuant::Q8_0.type_for(Role::Output, 4096), Some(T::Q8_0));
        assert_eq!(LoadQuant::Q8_0.type_for(Role::Other, 0), None);
        for name in ["q8_0", "q5_k", "Q4_K", "q4_0"] {
            let q = LoadQuant::parse(name).unwrap();
            assert_eq!(q.name(), name.to_ascii_lowercase());
        }
        assert_eq!(LoadQuant::parse("q3_k"), None);
    }

    /// The pool's row ranges give the bytes of one quantization of the whole matrix.
    #[test]
    fn parallel_rows_equal_one_pass() {
        let (rows, cols) = (37, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0)
            .collect();
        let whole = Tensor::from_slice(&values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q4_0,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
            GgmlDType::Q5_1,
        ] {
            let want = QTensor::quantize(&whole, dtype).unwrap();
            let got = quantize_rows(&values, (rows, cols), dtype, &Device::Cpu).unwrap();
            assert_eq!(got.shape().dims(), &[rows, cols]);
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.data().unwrap(), want.data().unwrap(), "{dtype:?}");
        }
    }
}
