//! Dense bf16 weight matrices on the CPU: a bf16 checkpoint's matrices stay bf16 (half the
//! memory of an f32 copy, half the bytes each decode step reads) and multiply f32 activations.
//!
//! candle's CPU matmul takes bf16 only with bf16 activations, and runs it 2-6× slower than
//! f32 (measured: 896×4864 at 1 row, 6.9 vs 1.6 ms). Here the pool's threads each take blocks
//! of weight rows. For a few activation rows (decode), each weight row is widened as it is
//! read (exact: bf16 is the top half of an f32) into 16-lane dot products, compiled for
//! AVX-512 or AVX2+FMA where the CPU has them: the step reads 2 bytes per weight instead of
//! f32's 4. For more rows, a block is widened into a per-thread scratch that stays in cache
//! and multiplied with the `gemm` crate's f32 kernel, single-threaded per block. As for
//! candle's dense path, results may round differently with the number of rows.

use std::cell::RefCell;

use candle_core::{DType, Tensor};

use super::pool::{for_each_range, SyncPtr};
use crate::models::{ModelError, Result};

/// Weight rows widened together: 64 rows of 4096 values are 1 MiB of f32, which stays in L2.
const BLOCK_ROWS: usize = 64;
/// Up to this many activation rows, dot products (four rows at a time); beyond, widened
/// blocks through `gemm`.
const DOT_ROWS: usize = 16;

/// A `[rows, cols]` matrix of bf16 values (their bit patterns).
#[derive(Debug)]
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    bits: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Bf16Matrix {
    /// A 2-D bf16 tensor's values.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        if t.dtype() != DType::BF16 {
            return Err(ModelError::Config(format!(
                "a bf16 matrix from a {:?} tensor",
                t.dtype()
            )));
        }
        let bits = t
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(|v| v.to_bits())
            .collect();
        Ok(Self { rows, cols, bits })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values into `out`.
    pub fn widen_row(&self, r: usize, out: &mut [f32]) {
        widen(&self.bits[r * self.cols..(r + 1) * self.cols], out);
    }

    /// `x W^T`: `x` is `[tokens, cols]` (any float dtype), the result `[tokens, rows]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            return Err(ModelError::Batch(format!(
                "input of width {k} for a bf16 matrix of {} columns",
                self.cols
            )));
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = self.rows;
        let mut out = vec![0f32; m * n];
        let dst = SyncPtr(out.as_mut_ptr());
        let blocks = n.div_ceil(BLOCK_ROWS);
        if m <= DOT_ROWS {
            let path = Dot::detect();
            for_each_range(blocks, |range| {
                let rows = range.start * BLOCK_ROWS..(range.end * BLOCK_ROWS).min(n);
                for r in rows {
                    let w = &self.bits[r * k..(r + 1) * k];
                    let mut quads = xs.chunks_exact(4 * k);
                    let mut i = 0;
                    let mut put = |v: f32| {
                        // SAFETY: row `r` of the weights writes column `r` of each output
                        // row, which no other range writes; `out` outlives the pool's work.
                        unsafe { *dst.get().add(i * n + r) = v };
                        i += 1;
                    };
                    for quad in quads.by_ref() {
                        for v in path.dot4(quad, w) {
                            put(v);
                        }
                    }
                    for x in quads.remainder().chunks_exact(k) {
                        put(path.dot(x, w));
                    }
                }
            });
            return Ok(Tensor::from_vec(out, (m, n), x.device())?);
        }
        for_each_range(blocks, |range| {
            SCRATCH.with(|s| {
                let mut scratch = s.borrow_mut();
                for b in range {
                    let first = b * BLOCK_ROWS;
                    let nb = BLOCK_ROWS.min(n - first);
                    scratch.resize(nb * k, 0.0);
                    widen(&self.bits[first * k..(first + nb) * k], &mut scratch);
                    // SAFETY: `out` is `m × n`; this block writes its columns `first..first +
                    // nb` of every row, which no other block writes, and `out` outlives the
                    // pool's work. `xs` is `m × k` and `scratch` `nb × k`, both row-major.
                    unsafe {
                        gemm::gemm(
                            m,
                            nb,
                            k,
                            dst.get().add(first),
                            1,
                            n as isize,
                            false,
                            xs.as_ptr(),
                            1,
                            k as isize,
                            scratch.as_ptr(),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
        });
        Ok(Tensor::from_vec(out, (m, n), x.device())?)
    }
}

/// How this CPU computes a dot product of f32 values with bf16 weights.
#[derive(Clone, Copy)]
enum Dot {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Dot {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                return Self::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    fn dot(self, x: &[f32], w: &[u16]) -> f32 {
        match self {
            // SAFETY: `detect` saw the features these functions are compiled for.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { dot_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { dot_avx2(x, w) },
            Self::Portable => dot_lanes::<false>(x, w),
        }
    }

    /// The dot products of four rows of `x` (`4 × w.len()`, row-major) with `w`.
    fn dot4(self, x: &[f32], w: &[u16]) -> [f32; 4] {
        match self {
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { dot4_avx512(x, w) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { dot4_avx2(x, w) },
            Self::Portable => dot4_lanes::<false, 16>(x, w),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot4_avx512(x: &[f32], w: &[u16]) -> [f32; 4] {
    dot4_lanes::<true, 32>(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(x: &[f32], w: &[u16]) -> [f32; 4] {
    dot4_lanes::<true, 16>(x, w)
}

/// Four rows' dot products with one weight row, each chunk of `L` weights widened once for
/// the four (two vector registers of accumulators per row: eight independent sums).
#[inline(always)]
fn dot4_lanes<const FMA: bool, const L: usize>(x: &[f32], w: &[u16]) -> [f32; 4] {
    let k = w.len();
    let (x0, x1, x2, x3) = (&x[..k], &x[k..2 * k], &x[2 * k..3 * k], &x[3 * k..4 * k]);
    let mut acc = [[0f32; L]; 4];
    let rows = x0
        .chunks_exact(L)
        .zip(x1.chunks_exact(L))
        .zip(x2.chunks_exact(L).zip(x3.chunks_exact(L)));
    for (wc, ((c0, c1), (c2, c3))) in w.chunks_exact(L).zip(rows) {
        let mut wv = [0f32; L];
        for (v, &b) in wv.iter_mut().zip(wc) {
            *v = widen1(b);
        }
        for (a, xs) in acc.iter_mut().zip([c0, c1, c2, c3]) {
            for ((a, &xv), &wv) in a.iter_mut().zip(xs).zip(&wv) {
                *a = if FMA {
                    xv.mul_add(wv, *a)
                } else {
                    xv * wv + *a
                };
            }
        }
    }
    let done = k / L * L;
    let mut out = [0f32; 4];
    for ((o, a), xr) in out.iter_mut().zip(&acc).zip([x0, x1, x2, x3]) {
        let tail: f32 = xr[done..]
            .iter()
            .zip(&w[done..])
            .map(|(&xv, &b)| xv * widen1(b))
            .sum();
        *o = a.iter().sum::<f32>() + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_avx512(x: &[f32], w: &[u16]) -> f32 {
    dot_lanes::<true>(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], w: &[u16]) -> f32 {
    dot_lanes::<true>(x, w)
}

/// `x · w` in 64 lanes (four independent 16-lane sums, so the adds do not wait on each
/// other; what the compiler vectorizes under each caller's target features), fused
/// multiply-adds when `FMA`.
#[inline(always)]
fn dot_lanes<const FMA: bool>(x: &[f32], w: &[u16]) -> f32 {
    const LANES: usize = 64;
    let mut acc = [0f32; LANES];
    let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let (xt, wt) = (xc.remainder(), wc.remainder());
    for (xs, ws) in xc.zip(wc) {
        for l in 0..LANES {
            let wv = widen1(ws[l]);
            acc[l] = if FMA {
                xs[l].mul_add(wv, acc[l])
            } else {
                xs[l] * wv + acc[l]
            };
        }
    }
    for (l, (&xv, &wb)) in xt.iter().zip(wt).enumerate() {
        acc[l] += xv * widen1(wb);
    }
    acc.iter().sum()
}

/// bf16 bit patterns to f32 (exact).
fn widen(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = widen1(b);
    }
}

/// One bf16 bit pattern as f32 (the top half of its bits).
#[inline(always)]
fn widen1(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The product equals the f32 product of the same (bf16-rounded) weights, for one row and
    /// for batches, with a partial last block.
    #[test]
    fn equals_the_f32_product_of_the_widened_weights() {
        let dev = Device::Cpu;
        let (n, k) = (150, 136);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let mat = Bf16Matrix::from_tensor(&w).unwrap();
        let wf = w.to_dtype(DType::F32).unwrap();
        for m in [1, 3, 4, 5, 17, 33] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 11 % 23) as f32 - 11.0) / 8.0)
                .collect();
            let x = Tensor::from_vec(x, (m, k), &dev).unwrap();
            let got = mat.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let want = x
                .matmul(&wf.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{g} vs {w} (m {m})"
                );
            }
        }
        // Every dot-product path this CPU runs gives the same sums as the portable one, to
        // rounding (they add in the same lanes; FMA rounds once).
        let x: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 7 % 19) as f32 - 9.0) / 4.0)
            .collect();
        let wrow = &mat.bits[..k];
        let want = Dot::Portable.dot4(&x, wrow);
        for (r, xr) in x.chunks_exact(k).enumerate() {
            assert!((Dot::Portable.dot(xr, wrow) - want[r]).abs() < 1e-3);
        }
        let mut paths = vec![Dot::detect()];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            paths.push(Dot::Avx2);
        }
        for path in paths {
            for (g, w) in path.dot4(&x, wrow).iter().zip(want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
            for (r, xr) in x.chunks_exact(k).enumerate() {
                let g = path.dot(xr, wrow);
                assert!((g - want[r]).abs() <= 1e-4 * (1.0 + want[r].abs()), "{g}");
            }
        }
        let mut row = vec![0f32; k];
        mat.widen_row(149, &mut row);
        assert_eq!(row, wf.get(149).unwrap().to_vec1::<f32>().unwrap());
        let bad = Tensor::zeros((2, 95), DType::F32, &dev).unwrap();
        assert!(mat.forward(&bad).is_err());
    }
}
