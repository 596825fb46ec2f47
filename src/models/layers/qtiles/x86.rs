//! The AVX-512 VNNI side of the tiled matmul: the block kernel (16 rows × 4 columns per
//! `vpdpbusd`, each block's weights loaded or unpacked once for up to four activation rows)
//! and the activation quantizer.
//!
//! The formats keep their own loops: folding them into one generic driver (each format giving
//! its record's load and block epilogue) measured 3-7% slower single-stream on SmolLM2.

use std::arch::x86_64::*;

use super::{low_bits, Activations, TileFormat, TiledMatrix, QK, ROWS, TILE};

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
    let base = w.tile_ptr(t);
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
        TileFormat::Q3K | TileFormat::Q2K => {
            let q3 = w.format == TileFormat::Q3K;
            let four = _mm512_set1_epi8(4);
            for b in 0..nb {
                let (rec, j) = (base.add(b / 8 * rec_bytes), b % 8);
                let d = _mm512_cvtph_ps(_mm256_load_si256(rec.add(low_bits::D) as *const __m256i));
                let (scales, mins) = low_bit_scales(rec.add(low_bits::scales(j)), q3);
                let (sc_lo, sc_hi) = halves(scales);
                let (mut lo, mut hi) = unpack_two(rec.add(low_bits::weights(w.format, j)));
                if q3 {
                    let third = _mm512_load_si512(rec.add(low_bits::plane(j)) as *const __m512i);
                    for g in 0..4 {
                        lo[g] = plane_add(lo[g], third, g, four);
                        hi[g] = plane_add(hi[g], third, 4 + g, four);
                    }
                }
                for (jj, a) in acc.iter_mut().enumerate() {
                    let row = first + jj;
                    let x = |g: usize| xq(row, b, g);
                    let s = scaled_sums(_mm512_setzero_si512(), &lo, sc_lo, 0, &x);
                    let isum = scaled_sums(s, &hi, sc_hi, 4, &x);
                    let i = row * nb + b;
                    let sums = _mm512_set1_epi32(*act.pair.get_unchecked(i));
                    let dx = _mm512_set1_ps(*act.d.get_unchecked(i));
                    if q3 {
                        // the weights are stored + 4: less 4·(sc_lo·sum_lo + sc_hi·sum_hi)
                        let bias = _mm512_slli_epi32::<2>(_mm512_madd_epi16(scales, sums));
                        let isum = _mm512_sub_epi32(isum, bias);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), *a);
                    } else {
                        let nd = _mm256_load_si256(rec.add(low_bits::NEG_DMIN) as *const __m256i);
                        let imin = _mm512_madd_epi16(mins, sums);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), *a);
                        let nd = _mm512_mul_ps(_mm512_cvtph_ps(nd), dx);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin), nd, *a);
                    }
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

/// A block's two-bit weights for 16 rows from its two lines at `at` (see `super::crumb`);
/// columns `4g..4g + 4` in `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_two(at: *const u8) -> ([__m512i; 4], [__m512i; 4]) {
    let three = _mm512_set1_epi8(3);
    let v0 = _mm512_load_si512(at as *const __m512i);
    let v1 = _mm512_load_si512(at.add(64) as *const __m512i);
    (crumbs(v0, three), crumbs(v1, three))
}

/// The four two-bit fields of each byte of `v`, each in its own vector. (16-bit shifts: bits
/// 0 and 1 of each byte come from its own byte.)
#[inline(always)]
unsafe fn crumbs(v: __m512i, three: __m512i) -> [__m512i; 4] {
    [
        _mm512_and_si512(v, three),
        _mm512_and_si512(_mm512_srli_epi16::<2>(v), three),
        _mm512_and_si512(_mm512_srli_epi16::<4>(v), three),
        _mm512_and_si512(_mm512_srli_epi16::<6>(v), three),
    ]
}

/// The 16 rows' integer scales of a Q3_K/Q2_K block from its 32 scale bytes at `p`, as
/// 16-bit pairs `(lo, hi)` per row, and for Q2_K (`q3` false) the minimums likewise.
#[inline(always)]
unsafe fn low_bit_scales(p: *const u8, q3: bool) -> (__m512i, __m512i) {
    let raw = _mm256_load_si256(p as *const __m256i);
    if q3 {
        (_mm512_cvtepi8_epi16(raw), _mm512_setzero_si512())
    } else {
        let v = _mm512_cvtepu8_epi16(raw);
        (
            _mm512_and_si512(v, _mm512_set1_epi16(15)),
            _mm512_srli_epi16::<4>(v),
        )
    }
}

/// Per-row `(lo, hi)` 16-bit pairs into `(lo, lo)` and `(hi, hi)`: the `vpdpwssd` operands
/// that scale each half's pair sums.
#[inline(always)]
unsafe fn halves(pairs: __m512i) -> (__m512i, __m512i) {
    let lo = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13,
    ));
    let hi = _mm512_add_epi8(lo, _mm512_set1_epi8(2));
    (
        _mm512_shuffle_epi8(pairs, lo),
        _mm512_shuffle_epi8(pairs, hi),
    )
}

/// `acc + Σ_g w[g]·x(first + g)` per 32-bit lane times `scale` (16-bit pairs): the
/// `vpmaddubsw` pair sums of ≤ 3-bit weights (at most 2·7·127) added in 16 bits, then one
/// `vpdpwssd` by the scales — exact.
#[inline(always)]
unsafe fn scaled_sums(
    acc: __m512i,
    w: &[__m512i; 4],
    scale: __m512i,
    first: usize,
    x: &impl Fn(usize) -> __m512i,
) -> __m512i {
    let a = _mm512_add_epi16(
        _mm512_maddubs_epi16(w[0], x(first)),
        _mm512_maddubs_epi16(w[1], x(first + 1)),
    );
    let b = _mm512_add_epi16(
        _mm512_maddubs_epi16(w[2], x(first + 2)),
        _mm512_maddubs_epi16(w[3], x(first + 3)),
    );
    _mm512_dpwssd_epi32(acc, _mm512_add_epi16(a, b), scale)
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
