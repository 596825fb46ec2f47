//! SwiGLU's elementwise step on the CPU, `silu(g)·u = g / (1 + e^-g) · u`, in one pass over
//! the gate and up values (candle runs it as three: an exp per value through libm, a division,
//! a product, each writing a fresh tensor). The exponential is attention's polynomial
//! (`attention::exp_poly`) and its vector twins, operation for operation, and the division is
//! IEEE-exact, so every kernel path gives the portable one's bits, and a value's result never
//! depends on the batch around it.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::attention::exp_poly;
use super::pool::{self, SyncPtr};
use super::simd::KernelPath;
use crate::models::Result;

/// Values per work item on the pool.
const CHUNK: usize = 2048;
/// `e^-g` saturates here (e^88 is still finite in f32): silu(g) ≈ 0 below g = -88.
const NEG_LIMIT: f32 = 88.0;

/// `silu(gate) * up` for `[tokens, n]` tensors (row-major rows, possibly narrowed views of one
/// `[gate | up]` projection); candle's ops on other devices.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == candle_core::DType::F32 {
        return Ok(gate.apply_op2_no_bwd(up, &SiluMul(KernelPath::active()))?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// One value: the portable twin of the vector lanes.
#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_poly((-g).min(NEG_LIMIT))) * u
}

/// [`silu_mul`] as a candle op on a kernel path.
struct SiluMul(KernelPath);

/// Where a `[tokens, n]` operand's rows start in its storage, if each row is contiguous.
fn rows_of(layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (tokens, n) = layout.shape().dims2()?;
    let stride = layout.stride();
    if n > 1 && stride[1] != 1 {
        candle_core::bail!("silu_mul: rows must be contiguous, got strides {stride:?}")
    }
    Ok((tokens, n, layout.start_offset(), stride[0]))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (s1, s2) else {
            candle_core::bail!("silu_mul takes f32 gate and up values")
        };
        let (tokens, n, g0, gs) = rows_of(l1)?;
        let (tokens_u, n_u, u0, us) = rows_of(l2)?;
        if (tokens, n) != (tokens_u, n_u) {
            candle_core::bail!("silu_mul: gate {tokens}x{n} against up {tokens_u}x{n_u}")
        }
        let chunks = n.div_ceil(CHUNK);
        let mut out = vec![0f32; tokens * n];
        let dst = SyncPtr(out.as_mut_ptr());
        let path = self.0;
        pool::for_each_range(tokens * chunks, |items| {
            for item in items {
                let (t, c) = (item / chunks, item % chunks);
                let cols = c * CHUNK..n.min((c + 1) * CHUNK);
                let gr = &g[g0 + t * gs + cols.start..g0 + t * gs + cols.end];
                let ur = &u[u0 + t * us + cols.start..u0 + t * us + cols.end];
                // SAFETY: item (t, c) writes only row t's columns `cols` of `out`.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(t * n + cols.start), cols.len())
                };
                silu_mul_on(path, gr, ur, o);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((tokens, n))))
    }
}

/// `o = silu(g) * u` on `path` (supported by this CPU); the slices are of one length.
fn silu_mul_on(path: KernelPath, g: &[f32], u: &[f32], o: &mut [f32]) {
    match path {
        // SAFETY: the path is supported, so are its features.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => unsafe { x86::silu_mul_avx512(g, u, o) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::AvxVnni | KernelPath::Avx2 => unsafe { x86::silu_mul_avx2(g, u, o) },
        _ => {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu_mul_one(g, u);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::attention::{exp_avx2, exp_avx512};
    use super::{silu_mul_one, NEG_LIMIT};

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
        let whole = g.len() / 16 * 16;
        let (limit, one) = (_mm512_set1_ps(NEG_LIMIT), _mm512_set1_ps(1.0));
        let neg = _mm512_set1_ps(-0.0);
        for i in (0..whole).step_by(16) {
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let uv = _mm512_loadu_ps(u.as_ptr().add(i));
            let e = exp_avx512(_mm512_min_ps(_mm512_xor_ps(gv, neg), limit));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o.as_mut_ptr().add(i), _mm512_mul_ps(s, uv));
        }
        for i in whole..g.len() {
            o[i] = silu_mul_one(g[i], u[i]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
        let whole = g.len() / 8 * 8;
        let (limit, one) = (_mm256_set1_ps(NEG_LIMIT), _mm256_set1_ps(1.0));
        let neg = _mm256_set1_ps(-0.0);
        for i in (0..whole).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let e = exp_avx2(_mm256_min_ps(_mm256_xor_ps(gv, neg), limit));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
        }
        for i in whole..g.len() {
            o[i] = silu_mul_one(g[i], u[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every path gives the portable bits — for whole rows, ragged tails, and the narrowed
    /// halves of a fused projection — close to candle's `silu(g) * u`, with no NaN or
    /// infinity at the extremes.
    #[test]
    fn every_path_gives_the_portable_bits_near_candles() {
        let dev = Device::Cpu;
        let (t, n) = (3, 2 * CHUNK + 37);
        let vals: Vec<f32> = (0..t * 2 * n)
            .map(|i| ((i * 7919 % 4001) as f32 - 2000.0) / 40.0)
            .collect();
        let mut vals = vals;
        vals[..4].copy_from_slice(&[-200.0, 200.0, -88.5, 0.0]);
        let y = Tensor::from_vec(vals, (t, 2 * n), &dev).unwrap();
        let (g, u) = (y.narrow(1, 0, n).unwrap(), y.narrow(1, n, n).unwrap());
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let run = |path: KernelPath, g: &Tensor, u: &Tensor| -> Vec<f32> {
            g.apply_op2_no_bwd(u, &SiluMul(path))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let portable = run(KernelPath::Portable, &g, &u);
        for (i, (a, b)) in portable.iter().zip(&want).enumerate() {
            assert!(a.is_finite(), "[{i}] {a}");
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "[{i}] {a} vs {b}");
        }
        let (gc, uc) = (g.contiguous().unwrap(), u.contiguous().unwrap());
        for path in KernelPath::all_supported() {
            assert_eq!(run(path, &g, &u), portable, "{path:?}");
            assert_eq!(run(path, &gc, &uc), portable, "{path:?}, contiguous");
            let one = run(
                path,
                &g.narrow(0, 1, 1).unwrap(),
                &u.narrow(0, 1, 1).unwrap(),
            );
            assert_eq!(one, portable[n..2 * n], "{path:?}, one row");
        }
    }
}
