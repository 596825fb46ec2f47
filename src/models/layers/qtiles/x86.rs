//! The AVX-512 VNNI side of the tiled matmul: the block kernel (16 rows × 4 columns per
//! `vpdpbusd`, each block's weights loaded or unpacked once for up to `ROWS` activation rows)
//! and the activation quantizer.
//!
//! The formats keep their own loops: folding them into one generic driver (each format giving
//! its record's load and block epilogue) measured 3-7% slower single-stream on SmolLM2.

use std::arch::x86_64::*;

use super::{Activations, TileFormat, TiledMatrix, QK, ROWS, TILE};

/// `R` activation rows from `first` against tile `t` of `w`, into `out[..R]`; each weight block
/// is loaded (and for 4-bit, unpacked) once for all `R` rows.
/// SAFETY: AVX-512 F/BW/VNNI present; `t` a tile of `w`, rows `first..first + R` in `act`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const R: usize>(
    w: &TiledMatrix,
    t: usize,
    first: usize,
    act: &Activations,
    out: &mut [[f32; TILE]; ROWS],
) {
    let nb = w.k / QK;
    let rec_bytes = w.format.record();
    let base = (w.lines.as_ptr() as *const u8).add(t * nb * rec_bytes);
    let mut acc = [_mm512_setzero_ps(); R];
    let xq = |row: usize, b: usize, word: usize| -> __m512i {
        let p = act.q.as_ptr().add(row * w.k + b * QK + 4 * word) as *const i32;
        _mm512_set1_epi32(p.read_unaligned())
    };
    match w.format {
        TileFormat::Q4_1 | TileFormat::Q4K => {
            let f32_scales = w.format == TileFormat::Q4K;
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                let (d, m, nibbles) = if f32_scales {
                    let d = _mm512_load_ps(rec as *const f32);
                    (d, _mm512_load_ps(rec.add(64) as *const f32), 128)
                } else {
                    let d = _mm512_cvtph_ps(_mm256_load_si256(rec as *const __m256i));
                    let m = _mm512_cvtph_ps(_mm256_load_si256(rec.add(32) as *const __m256i));
                    (d, m, 64)
                };
                let (lo, hi) = unpack_four(rec.add(nibbles));
                for (j, a) in acc.iter_mut().enumerate() {
                    let sums = block_sums(&lo, &hi, |g| xq(first + j, b, g));
                    with_min(a, act, nb, (first + j, b), (d, m), sums);
                }
            }
        }
        TileFormat::Q5K => {
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                let d = _mm512_load_ps(rec as *const f32);
                let m = _mm512_load_ps(rec.add(64) as *const f32);
                let (lo, hi) = unpack_five(rec.add(128));
                for (j, a) in acc.iter_mut().enumerate() {
                    let sums = block_sums(&lo, &hi, |g| xq(first + j, b, g));
                    with_min(a, act, nb, (first + j, b), (d, m), sums);
                }
            }
        }
        TileFormat::Q5_0 => {
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                let d = _mm512_cvtph_ps(_mm256_load_si256(rec as *const __m256i));
                let (lo, hi) = unpack_five(rec.add(64));
                for (j, a) in acc.iter_mut().enumerate() {
                    let row = first + j;
                    let (s0, s1) = block_sums(&lo, &hi, |g| xq(row, b, g));
                    // the weights are stored + 16
                    let i = row * nb + b;
                    let bias = _mm512_set1_epi32(16 * *act.sum.get_unchecked(i));
                    let isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*act.d.get_unchecked(i)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *a);
                }
            }
        }
        TileFormat::Q6K => {
            let (sixteen, thirty_two) = (_mm512_set1_epi8(16), _mm512_set1_epi8(32));
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                let d_lo = _mm512_load_ps(rec as *const f32);
                let d_hi = _mm512_load_ps(rec.add(64) as *const f32);
                let (mut lo, mut hi) = unpack_four(rec.add(256));
                let fifth = _mm512_load_si512(rec.add(128) as *const __m512i);
                let sixth = _mm512_load_si512(rec.add(192) as *const __m512i);
                for g in 0..4 {
                    lo[g] = plane_add(lo[g], fifth, g, sixteen);
                    lo[g] = plane_add(lo[g], sixth, g, thirty_two);
                    hi[g] = plane_add(hi[g], fifth, 4 + g, sixteen);
                    hi[g] = plane_add(hi[g], sixth, 4 + g, thirty_two);
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    let row = first + j;
                    let (s0, s1) = block_sums(&lo, &hi, |g| xq(row, b, g));
                    // the weights are stored + 32; each half has its own scale
                    let i = row * nb + b;
                    let (sum, sum_lo) = (*act.sum.get_unchecked(i), *act.sum_lo.get_unchecked(i));
                    let isum_lo = _mm512_sub_epi32(s0, _mm512_set1_epi32(32 * sum_lo));
                    let isum_hi = _mm512_sub_epi32(s1, _mm512_set1_epi32(32 * (sum - sum_lo)));
                    let dx = _mm512_set1_ps(*act.d.get_unchecked(i));
                    let scale_lo = _mm512_mul_ps(d_lo, dx);
                    let scale_hi = _mm512_mul_ps(d_hi, dx);
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum_lo), scale_lo, *a);
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum_hi), scale_hi, *a);
                }
            }
        }
        TileFormat::Q8_0 => {
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                let d = _mm512_load_ps(rec as *const f32);
                for (j, a) in acc.iter_mut().enumerate() {
                    let row = first + j;
                    let mut s0 = _mm512_setzero_si512();
                    let mut s1 = _mm512_setzero_si512();
                    for g in 0..4 {
                        let w0 = _mm512_load_si512(rec.add(64 + 128 * g) as *const __m512i);
                        let w1 = _mm512_load_si512(rec.add(128 + 128 * g) as *const __m512i);
                        s0 = _mm512_dpbusd_epi32(s0, w0, xq(row, b, 2 * g));
                        s1 = _mm512_dpbusd_epi32(s1, w1, xq(row, b, 2 * g + 1));
                    }
                    // the weights were stored + 128
                    let i = row * nb + b;
                    let bias = _mm512_set1_epi32(128 * *act.sum.get_unchecked(i));
                    let isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*act.d.get_unchecked(i)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *a);
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
}

/// The epilogue of the formats with a minimum (`w = d·q + m`): `acc += isum·(d·dx) + m·s`
/// for activation row `row`, block `b`.
#[inline(always)]
unsafe fn with_min(
    acc: &mut __m512,
    act: &Activations,
    nb: usize,
    (row, b): (usize, usize),
    (d, m): (__m512, __m512),
    (s0, s1): (__m512i, __m512i),
) {
    let i = row * nb + b;
    let isum = _mm512_add_epi32(s0, s1);
    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*act.d.get_unchecked(i)));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
    *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*act.s.get_unchecked(i)), *acc);
}

/// One activation row against a block's unpacked weights: the sums of its low (columns 0..16)
/// and high (16..32) halves; `x(w)` broadcasts the row's 4-byte word `w` of the block.
#[inline(always)]
unsafe fn block_sums(
    lo: &[__m512i; 4],
    hi: &[__m512i; 4],
    x: impl Fn(usize) -> __m512i,
) -> (__m512i, __m512i) {
    let mut s0 = _mm512_setzero_si512();
    let mut s1 = _mm512_setzero_si512();
    for g in 0..4 {
        s0 = _mm512_dpbusd_epi32(s0, lo[g], x(g));
        s1 = _mm512_dpbusd_epi32(s1, hi[g], x(4 + g));
    }
    (s0, s1)
}

/// A 4-bit block's weights for 16 rows from its nibbles at `nibbles`; columns `4g..4g + 4` in
/// `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_four(nibbles: *const u8) -> ([__m512i; 4], [__m512i; 4]) {
    let low = _mm512_set1_epi8(0x0f);
    let mut lo = [_mm512_setzero_si512(); 4];
    let mut hi = [_mm512_setzero_si512(); 4];
    for g in 0..4 {
        let w = _mm512_load_si512(nibbles.add(64 * g) as *const __m512i);
        lo[g] = _mm512_and_si512(w, low);
        hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
    }
    (lo, hi)
}

/// Adds `add` to the bytes of `v` whose bit `s` is set in `plane` (a bit plane: see
/// `gguf::pack_plane`).
#[inline(always)]
unsafe fn plane_add(v: __m512i, plane: __m512i, s: usize, add: __m512i) -> __m512i {
    let set = _mm512_test_epi8_mask(plane, _mm512_set1_epi8(1 << s));
    _mm512_mask_add_epi8(v, set, v, add)
}

/// A 5-bit block's weights (0..32) for 16 rows: the fifth bits in the plane at `plane`, the
/// nibbles after it; columns `4g..4g + 4` in `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_five(plane: *const u8) -> ([__m512i; 4], [__m512i; 4]) {
    let (mut lo, mut hi) = unpack_four(plane.add(64));
    let fifth = _mm512_load_si512(plane as *const __m512i);
    let sixteen = _mm512_set1_epi8(16);
    for g in 0..4 {
        lo[g] = plane_add(lo[g], fifth, g, sixteen);
        hi[g] = plane_add(hi[g], fifth, 4 + g, sixteen);
    }
    (lo, hi)
}

/// [`super::quantize_block`] in two 16-lane registers, bit for bit.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32, i32) {
    debug_assert!(xs.len() == QK && qs.len() == QK);
    let x0 = _mm512_loadu_ps(xs.as_ptr());
    let x1 = _mm512_loadu_ps(xs.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // cvtps2dq rounds to nearest, ties to even (the default MXCSR mode)
    let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
    let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
    _mm_storeu_si128(qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(
        qs.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(q1),
    );
    let sum_lo = _mm512_reduce_add_epi32(q0);
    (d, sum_lo + _mm512_reduce_add_epi32(q1), sum_lo)
}
