//! Which CPU kernel runs a GGUF matrix. On x86 CPUs with AVX2 (the AVX-512 VNNI, AVX-VNNI and
//! AVX2 paths of `layers::simd`), Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and
//! Q6_K go to inferd's own tiles (`layers::qtiles`), at about their size. Elsewhere, and for
//! the other types, candle's kernels run them: types whose candle dot product
//! is a scalar loop (Q5_0, Q4_1) are repacked to Q8_0 at load (Q5_0 exactly, Q4_1 by
//! re-quantizing, near exact), and Q8_0 rows whose length is not a multiple of 256 are padded
//! with zero blocks up to one: candle only uses its repacked (AVX-512 VNNI / AVX2) Q8_0 kernels
//! for such lengths, and falls back to a per-element loop ~9x slower otherwise (Qwen2.5-0.5B's
//! hidden size is 896). Devices other than the CPU take tensors as they are.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::Tensor;

use super::layers::qtiles::{self, TiledMatrix};
use super::layers::Linear;
use super::Result;

/// The CPU kernel for a GGUF weight: inferd's tiles where the CPU and type allow, else
/// candle's (scalar-kernel types repacked, Q8_0 rows padded).
pub fn gguf_linear(q: QTensor, bias: Option<Tensor>) -> Result<Linear> {
    if let Some(t) = tiled(&q)? {
        return Ok(Linear::tiled(Arc::new(t), bias));
    }
    let (q, k_pad) = pad_q8_0_rows(repack_for_cpu(q)?)?;
    Ok(Linear::with_k_pad(QMatMul::from_qtensor(q)?, bias, k_pad))
}

/// `q` in inferd's CPU tiles, when this CPU runs them and they take its type.
pub fn tiled(q: &QTensor) -> Result<Option<TiledMatrix>> {
    if !qtiles::available() {
        return Ok(None);
    }
    Ok(TiledMatrix::from_qtensor(q)?)
}

/// Swap quantized types whose CPU kernels are scalar for Q8_0, which has SIMD kernels.
pub fn repack_for_cpu(t: QTensor) -> Result<QTensor> {
    if !t.device().is_cpu() {
        return Ok(t);
    }
    match t.dtype() {
        GgmlDType::Q5_0 => {
            let q8 = q5_0_to_q8_0(&t.data()?);
            let storage = QStorage::from_data(Cow::Owned(q8), &t.device(), GgmlDType::Q8_0)?;
            Ok(QTensor::new(storage, t.shape().clone())?)
        }
        GgmlDType::Q4_1 => {
            let dense = t.dequantize(&t.device())?;
            Ok(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
        }
        _ => Ok(t),
    }
}

/// The row length candle's repacked CPU kernels need.
const REPACK_K: usize = 256;

/// Pad the rows of a 2-D Q8_0 tensor with zero blocks to a multiple of 256 columns (exact:
/// zero weights add nothing). Returns the tensor and the number of columns added.
pub fn pad_q8_0_rows(t: QTensor) -> Result<(QTensor, usize)> {
    let dims = t.shape().dims().to_vec();
    if t.dtype() != GgmlDType::Q8_0
        || dims.len() != 2
        || dims[1].is_multiple_of(REPACK_K)
        || !t.device().is_cpu()
    {
        return Ok((t, 0));
    }
    let (n, k) = (dims[0], dims[1]);
    let k_new = k.next_multiple_of(REPACK_K);
    let (row, row_new) = (k / 32 * Q8_0_BLOCK, k_new / 32 * Q8_0_BLOCK);
    let data = t.data()?;
    let mut out = vec![0u8; n * row_new];
    for (src, dst) in data.chunks_exact(row).zip(out.chunks_exact_mut(row_new)) {
        dst[..row].copy_from_slice(src);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &t.device(), GgmlDType::Q8_0)?;
    Ok((QTensor::new(storage, (n, k_new))?, k_new - k))
}

const Q5_0_BLOCK: usize = 22; // f16 scale, 4 bytes of high bits, 16 bytes of nibbles
const Q8_0_BLOCK: usize = 34; // f16 scale, 32 signed bytes

/// Exact Q5_0 → Q8_0: keep each block's scale, widen its 5-bit values (minus 16) to i8.
pub fn q5_0_to_q8_0(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / Q5_0_BLOCK * Q8_0_BLOCK);
    for b in src.chunks_exact(Q5_0_BLOCK) {
        out.extend_from_slice(&b[0..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut vals = [0i8; 32];
        for j in 0..16 {
            let xh0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
            vals[j] = (((qs[j] & 0x0f) | xh0) as i8) - 16;
            vals[j + 16] = (((qs[j] >> 4) | xh1) as i8) - 16;
        }
        out.extend(vals.iter().map(|&v| v as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn padded_q8_0_matmul_equals_unpadded() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..64 * 96)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let w = Tensor::from_vec(w, (64, 96), &dev).unwrap();
        let x: Vec<f32> = (0..3 * 96)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
            .collect();
        let x = Tensor::from_vec(x, (3, 96), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let want = q
            .dequantize(&dev)
            .unwrap()
            .matmul(&x.t().unwrap())
            .unwrap()
            .t()
            .unwrap();
        let (padded, k_pad) = pad_q8_0_rows(q).unwrap();
        assert_eq!((padded.shape().dims2().unwrap(), k_pad), ((64, 256), 160));
        let lin = Linear::with_k_pad(QMatMul::from_qtensor(padded).unwrap(), None, k_pad);
        let got = lin.forward(&x).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // The kernel quantizes activations to 8 bits; the weights themselves are exact.
        assert!(diff < 0.05, "{diff}");
    }

    #[test]
    fn q5_0_repack_is_exact() {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let t = Tensor::from_vec(x, (4, 64), &dev).unwrap();
        let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let want = q5
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let q8 = repack_for_cpu(q5).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        let got = q8
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }
}
