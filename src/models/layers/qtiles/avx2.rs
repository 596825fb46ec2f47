//! The AVX2 side of the tiled matmul, for CPUs without AVX-512: the same tiles, each 16-row
//! tile as two halves of 8 rows in 256-bit registers, one half after the other (a half's
//! unpacked weights and its accumulators fit the 16 registers). Four columns of 8 rows per
//! `vpdpbusd` where the CPU has AVX-VNNI (VEX), else per `vpmaddubsw` + `vpmaddwd`. The integer
//! sums are exact either way and the float steps are the portable twin's, lane by lane, so
//! every result equals the portable twin's bit for bit.
//!
//! `vpmaddubsw` saturates its 16-bit pair sums: harmless for 4- to 6-bit weights (at most
//! 2·63·127; up to 5 bits four pair sums, at 6 two, are even added in 16 bits before they are
//! widened), but Q8_0's weights stored + 128 would overflow, so without VNNI Q8_0 multiplies
//! the signed weights' magnitudes by the activations carrying the weights' signs
//! (`vpsignb`), at most 2·128·127.

use std::arch::x86_64::*;

use super::{low_bits, Activations, TileFormat, TiledMatrix, QK, ROWS, TILE};

/// Rows per half tile.
const HALF: usize = TILE / 2;

/// Four u8 × i8 products per 32-bit lane, summed into `acc`.
#[inline(always)]
unsafe fn dot<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    } else {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// One activation row against a block's unpacked weights of at most `BITS` bits: the sums of
/// its low (columns 0..16) and high (16..32) halves; `x(w)` broadcasts the row's 4-byte word
/// `w` of the block. Without VNNI, the 16-bit pair sums of `vpmaddubsw` (at most 2·(2^BITS - 1)
/// ·127 in magnitude) are added in 16 bits while they cannot overflow — four at a time up to 5
/// bits, two at 6 — before one `vpmaddwd` widens them: exact, with fewer widening steps.
#[inline(always)]
unsafe fn block_sums<const VNNI: bool, const BITS: u32>(
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
    x: impl Fn(usize) -> __m256i,
) -> (__m256i, __m256i) {
    if VNNI || BITS > 6 {
        let mut s0 = _mm256_setzero_si256();
        let mut s1 = _mm256_setzero_si256();
        for g in 0..4 {
            s0 = dot::<VNNI>(s0, lo[g], x(g));
            s1 = dot::<VNNI>(s1, hi[g], x(4 + g));
        }
        return (s0, s1);
    }
    (
        narrow_sums::<BITS>(lo, [x(0), x(1), x(2), x(3)]),
        narrow_sums::<BITS>(hi, [x(4), x(5), x(6), x(7)]),
    )
}

/// `Σ_g w[g]·x[g]` per 32-bit lane, the `vpmaddubsw` pair sums added in 16 bits first (see
/// [`block_sums`]).
#[inline(always)]
unsafe fn narrow_sums<const BITS: u32>(w: &[__m256i; 4], x: [__m256i; 4]) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let a = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[0], x[0]),
        _mm256_maddubs_epi16(w[1], x[1]),
    );
    let b = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[2], x[2]),
        _mm256_maddubs_epi16(w[3], x[3]),
    );
    if BITS <= 5 {
        _mm256_madd_epi16(_mm256_add_epi16(a, b), ones)
    } else {
        _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones))
    }
}

/// Half `h` (rows 8h..8h + 8) of a 4-bit block's weights from its nibbles at `nibbles`;
/// columns `4g..4g + 4` in `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_four(nibbles: *const u8, h: usize) -> ([__m256i; 4], [__m256i; 4]) {
    let low = _mm256_set1_epi8(0x0f);
    let mut lo = [_mm256_setzero_si256(); 4];
    let mut hi = [_mm256_setzero_si256(); 4];
    for g in 0..4 {
        let v = _mm256_load_si256(nibbles.add(64 * g + 32 * h) as *const __m256i);
        lo[g] = _mm256_and_si256(v, low);
        hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    }
    (lo, hi)
}

/// The bytes of a bit plane (see `gguf::pack_plane`) with bit `s` moved to bit `to` and the
/// rest cleared (`to - s` in -5..=5). (16-bit shifts by at most 5: bit `to` of each byte
/// comes from its own byte.)
#[inline(always)]
unsafe fn plane_bits(plane: __m256i, s: usize, to: usize) -> __m256i {
    debug_assert!((-5..=5).contains(&(to as isize - s as isize)));
    let v = match to as isize - s as isize {
        5 => _mm256_slli_epi16::<5>(plane),
        4 => _mm256_slli_epi16::<4>(plane),
        3 => _mm256_slli_epi16::<3>(plane),
        2 => _mm256_slli_epi16::<2>(plane),
        1 => _mm256_slli_epi16::<1>(plane),
        0 => plane,
        -1 => _mm256_srli_epi16::<1>(plane),
        -2 => _mm256_srli_epi16::<2>(plane),
        -3 => _mm256_srli_epi16::<3>(plane),
        -4 => _mm256_srli_epi16::<4>(plane),
        _ => _mm256_srli_epi16::<5>(plane),
    };
    _mm256_and_si256(v, _mm256_set1_epi8(1 << to))
}

/// Half `h` (rows 8h..8h + 8) of a 5-bit block's weights (0..32): the fifth bits in the plane
/// at `plane`, the nibbles after it; columns `4g..4g + 4` in `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_five(plane: *const u8, h: usize) -> ([__m256i; 4], [__m256i; 4]) {
    let (mut lo, mut hi) = unpack_four(plane.add(64), h);
    let fifth = _mm256_load_si256(plane.add(32 * h) as *const __m256i);
    for g in 0..4 {
        lo[g] = _mm256_or_si256(lo[g], plane_bits(fifth, g, 4));
        hi[g] = _mm256_or_si256(hi[g], plane_bits(fifth, 4 + g, 4));
    }
    (lo, hi)
}

/// Half `h` (rows 8h..8h + 8) of a block's two-bit weights from its two lines at `at` (see
/// `super::crumb`); columns `4g..4g + 4` in `lo[g]`, `16 + 4g..` in `hi[g]`.
#[inline(always)]
unsafe fn unpack_two(at: *const u8, h: usize) -> ([__m256i; 4], [__m256i; 4]) {
    let three = _mm256_set1_epi8(3);
    let v0 = _mm256_load_si256(at.add(32 * h) as *const __m256i);
    let v1 = _mm256_load_si256(at.add(64 + 32 * h) as *const __m256i);
    (crumbs(v0, three), crumbs(v1, three))
}

/// The four two-bit fields of each byte of `v`, each in its own vector. (16-bit shifts: bits
/// 0 and 1 of each byte come from its own byte.)
#[inline(always)]
unsafe fn crumbs(v: __m256i, three: __m256i) -> [__m256i; 4] {
    [
        _mm256_and_si256(v, three),
        _mm256_and_si256(_mm256_srli_epi16::<2>(v), three),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), three),
        _mm256_and_si256(_mm256_srli_epi16::<6>(v), three),
    ]
}

/// The eight rows' integer scales of a Q3_K/Q2_K block from its 16 scale bytes at `p`, as
/// 16-bit pairs `(lo, hi)` per row, and for Q2_K (`q3` false) the minimums likewise.
#[inline(always)]
unsafe fn low_bit_scales(p: *const u8, q3: bool) -> (__m256i, __m256i) {
    let raw = _mm_loadu_si128(p as *const __m128i);
    if q3 {
        (_mm256_cvtepi8_epi16(raw), _mm256_setzero_si256())
    } else {
        let v = _mm256_cvtepu8_epi16(raw);
        (
            _mm256_and_si256(v, _mm256_set1_epi16(15)),
            _mm256_srli_epi16::<4>(v),
        )
    }
}

/// Per-row `(lo, hi)` 16-bit pairs into `(lo, lo)` and `(hi, hi)`: the `vpmaddwd` operands
/// that scale each half's pair sums.
#[inline(always)]
unsafe fn halves(pairs: __m256i) -> (__m256i, __m256i) {
    let lo = _mm256_setr_epi8(
        0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12,
        13, 12, 13,
    );
    let hi = _mm256_add_epi8(lo, _mm256_set1_epi8(2));
    (
        _mm256_shuffle_epi8(pairs, lo),
        _mm256_shuffle_epi8(pairs, hi),
    )
}

/// `acc + Σ_g w[g]·x(first + g)` per 32-bit lane times `scale` (16-bit pairs): the
/// `vpmaddubsw` pair sums of ≤ 3-bit weights (at most 2·7·127) added in 16 bits, then one
/// `vpmaddwd` (`vpdpwssd` with VNNI) by the scales — exact.
#[inline(always)]
unsafe fn scaled_sums<const VNNI: bool>(
    acc: __m256i,
    w: &[__m256i; 4],
    scale: __m256i,
    first: usize,
    x: &impl Fn(usize) -> __m256i,
) -> __m256i {
    let a = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[0], x(first)),
        _mm256_maddubs_epi16(w[1], x(first + 1)),
    );
    let b = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[2], x(first + 2)),
        _mm256_maddubs_epi16(w[3], x(first + 3)),
    );
    let sums = _mm256_add_epi16(a, b);
    if VNNI {
        _mm256_dpwssd_avx_epi32(acc, sums, scale)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(sums, scale))
    }
}

/// Eight f16 scales at `p`, widened.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline(always)]
unsafe fn f32x8(p: *const u8) -> __m256 {
    _mm256_loadu_ps(p as *const f32)
}

/// [`super::x86::tile`]'s contract, on AVX2 (+ AVX-VNNI when `VNNI`).
#[inline(always)]
unsafe fn tile_body<const R: usize, const VNNI: bool>(
    w: &TiledMatrix,
    t: usize,
    first: usize,
    act: &Activations,
    out: &mut [[f32; TILE]; ROWS],
) {
    let nb = w.k / QK;
    let rec_bytes = w.format.record();
    let base = w.tile_ptr(t);
    let xq = |row: usize, b: usize, word: usize| -> __m256i {
        let p = act.q.as_ptr().add(row * w.k + b * QK + 4 * word) as *const i32;
        _mm256_set1_epi32(p.read_unaligned())
    };
    for h in 0..2 {
        // Half `h` of each 64-byte weight group: rows 8h..8h + 8.
        let wgt =
            |rec: *const u8, at: usize| _mm256_load_si256(rec.add(at + 32 * h) as *const __m256i);
        let mut acc = [_mm256_setzero_ps(); R];
        match w.format {
            TileFormat::Q4_1 | TileFormat::Q4K | TileFormat::Q5K => {
                for b in 0..nb {
                    let rec = base.add(b * rec_bytes);
                    let (d, m, (lo, hi)) = match w.format {
                        TileFormat::Q4_1 => (
                            f16x8(rec.add(16 * h)),
                            f16x8(rec.add(32 + 16 * h)),
                            unpack_four(rec.add(64), h),
                        ),
                        TileFormat::Q4K => (
                            f32x8(rec.add(32 * h)),
                            f32x8(rec.add(64 + 32 * h)),
                            unpack_four(rec.add(128), h),
                        ),
                        _ => (
                            f32x8(rec.add(32 * h)),
                            f32x8(rec.add(64 + 32 * h)),
                            unpack_five(rec.add(128), h),
                        ),
                    };
                    for (j, a) in acc.iter_mut().enumerate() {
                        let row = first + j;
                        let (s0, s1) = block_sums::<VNNI, 5>(&lo, &hi, |w| xq(row, b, w));
                        let isum = _mm256_add_epi32(s0, s1);
                        let i = row * nb + b;
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*act.d.get_unchecked(i)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *a);
                        *a = _mm256_fmadd_ps(m, _mm256_set1_ps(*act.s.get_unchecked(i)), *a);
                    }
                }
            }
            TileFormat::Q5_0 => {
                for b in 0..nb {
                    let rec = base.add(b * rec_bytes);
                    let d = f16x8(rec.add(16 * h));
                    let (lo, hi) = unpack_five(rec.add(64), h);
                    for (j, a) in acc.iter_mut().enumerate() {
                        let row = first + j;
                        let (s0, s1) = block_sums::<VNNI, 5>(&lo, &hi, |w| xq(row, b, w));
                        // the weights are stored + 16
                        let i = row * nb + b;
                        let bias = _mm256_set1_epi32(16 * *act.sum.get_unchecked(i));
                        let isum = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), bias);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*act.d.get_unchecked(i)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *a);
                    }
                }
            }
            TileFormat::Q6K => {
                for b in 0..nb {
                    let rec = base.add(b * rec_bytes);
                    let d_lo = f32x8(rec.add(32 * h));
                    let d_hi = f32x8(rec.add(64 + 32 * h));
                    let (mut lo, mut hi) = unpack_four(rec.add(256), h);
                    let fifth = wgt(rec, 128);
                    let sixth = wgt(rec, 192);
                    for g in 0..4 {
                        let (l5, h5) = (plane_bits(fifth, g, 4), plane_bits(fifth, 4 + g, 4));
                        let (l6, h6) = (plane_bits(sixth, g, 5), plane_bits(sixth, 4 + g, 5));
                        lo[g] = _mm256_or_si256(lo[g], _mm256_or_si256(l5, l6));
                        hi[g] = _mm256_or_si256(hi[g], _mm256_or_si256(h5, h6));
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let row = first + j;
                        let (s0, s1) = block_sums::<VNNI, 6>(&lo, &hi, |w| xq(row, b, w));
                        // the weights are stored + 32; each half block has its own scale
                        let i = row * nb + b;
                        let (sum, sum_lo) =
                            (*act.sum.get_unchecked(i), *act.sum_lo.get_unchecked(i));
                        let isum_lo = _mm256_sub_epi32(s0, _mm256_set1_epi32(32 * sum_lo));
                        let isum_hi = _mm256_sub_epi32(s1, _mm256_set1_epi32(32 * (sum - sum_lo)));
                        let dx = _mm256_set1_ps(*act.d.get_unchecked(i));
                        let scale_lo = _mm256_mul_ps(d_lo, dx);
                        let scale_hi = _mm256_mul_ps(d_hi, dx);
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum_lo), scale_lo, *a);
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum_hi), scale_hi, *a);
                    }
                }
            }
            TileFormat::Q8_0 => {
                let flip = _mm256_set1_epi8(-128);
                for b in 0..nb {
                    let rec = base.add(b * rec_bytes);
                    let d = f32x8(rec.add(32 * h));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let row = first + j;
                        let mut s0 = _mm256_setzero_si256();
                        let mut s1 = _mm256_setzero_si256();
                        for g in 0..4 {
                            let w0 = wgt(rec, 64 + 128 * g);
                            let w1 = wgt(rec, 128 + 128 * g);
                            let (x0, x1) = (xq(row, b, 2 * g), xq(row, b, 2 * g + 1));
                            if VNNI {
                                s0 = dot::<true>(s0, w0, x0);
                                s1 = dot::<true>(s1, w1, x1);
                            } else {
                                // |w| against x with w's sign: no 16-bit saturation
                                let (v0, v1) =
                                    (_mm256_xor_si256(w0, flip), _mm256_xor_si256(w1, flip));
                                let a0 = _mm256_sign_epi8(x0, v0);
                                let a1 = _mm256_sign_epi8(x1, v1);
                                s0 = dot::<false>(s0, _mm256_abs_epi8(v0), a0);
                                s1 = dot::<false>(s1, _mm256_abs_epi8(v1), a1);
                            }
                        }
                        let i = row * nb + b;
                        let mut isum = _mm256_add_epi32(s0, s1);
                        if VNNI {
                            // the weights were stored + 128
                            let bias = _mm256_set1_epi32(128 * *act.sum.get_unchecked(i));
                            isum = _mm256_sub_epi32(isum, bias);
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*act.d.get_unchecked(i)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *a);
                    }
                }
            }
            TileFormat::Q3K | TileFormat::Q2K => {
                let q3 = w.format == TileFormat::Q3K;
                for b in 0..nb {
                    let (rec, j) = (base.add(b / 8 * rec_bytes), b % 8);
                    let d = f16x8(rec.add(low_bits::D + 16 * h));
                    let (scales, mins) = low_bit_scales(rec.add(low_bits::scales(j) + 16 * h), q3);
                    let (sc_lo, sc_hi) = halves(scales);
                    let nd = f16x8(rec.add(low_bits::NEG_DMIN + 16 * h));
                    let (mut lo, mut hi) = unpack_two(rec.add(low_bits::weights(w.format, j)), h);
                    if q3 {
                        let third = wgt(rec, low_bits::plane(j));
                        for g in 0..4 {
                            lo[g] = _mm256_or_si256(lo[g], plane_bits(third, g, 2));
                            hi[g] = _mm256_or_si256(hi[g], plane_bits(third, 4 + g, 2));
                        }
                    }
                    for (jj, a) in acc.iter_mut().enumerate() {
                        let row = first + jj;
                        let x = |g: usize| xq(row, b, g);
                        let s = scaled_sums::<VNNI>(_mm256_setzero_si256(), &lo, sc_lo, 0, &x);
                        let isum = scaled_sums::<VNNI>(s, &hi, sc_hi, 4, &x);
                        let i = row * nb + b;
                        let sums = _mm256_set1_epi32(*act.pair.get_unchecked(i));
                        let dx = _mm256_set1_ps(*act.d.get_unchecked(i));
                        if q3 {
                            // the weights are stored + 4: less 4·(sc_lo·sum_lo + sc_hi·sum_hi)
                            let bias = _mm256_slli_epi32::<2>(_mm256_madd_epi16(scales, sums));
                            let isum = _mm256_sub_epi32(isum, bias);
                            *a =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, dx), *a);
                        } else {
                            let imin = _mm256_madd_epi16(mins, sums);
                            *a =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, dx), *a);
                            *a = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(imin),
                                _mm256_mul_ps(nd, dx),
                                *a,
                            );
                        }
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm256_storeu_ps(o.as_mut_ptr().add(HALF * h), a);
        }
    }
}

/// SAFETY: AVX2, FMA, F16C present; `t` a tile of `w`, rows `first..first + R` in `act`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize>(
    w: &TiledMatrix,
    t: usize,
    first: usize,
    act: &Activations,
    out: &mut [[f32; TILE]; ROWS],
) {
    tile_body::<R, false>(w, t, first, act, out)
}

/// SAFETY: as [`tile`], and AVX-VNNI present.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn tile_vnni<const R: usize>(
    w: &TiledMatrix,
    t: usize,
    first: usize,
    act: &Activations,
    out: &mut [[f32; TILE]; ROWS],
) {
    tile_body::<R, true>(w, t, first, act, out)
}

/// Horizontal sum of eight i32.
#[inline(always)]
unsafe fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// [`super::quantize_block`] in four 8-lane registers, bit for bit.
/// SAFETY: AVX2 present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32, i32) {
    debug_assert!(xs.len() == QK && qs.len() == QK);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let x = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(xs.as_ptr().add(i)));
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(x[0], abs), _mm256_and_ps(x[1], abs)),
        _mm256_max_ps(_mm256_and_ps(x[2], abs), _mm256_and_ps(x[3], abs)),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<0b01>(m2, m2));
    let amax = _mm_cvtss_f32(m1);
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // cvtps2dq rounds to nearest, ties to even (the default MXCSR mode)
    let q = x.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
    // |q| <= 127: the packs never saturate; they interleave 128-bit lanes, the permute undoes it
    let w16a = _mm256_packs_epi32(q[0], q[1]);
    let w16b = _mm256_packs_epi32(q[2], q[3]);
    let w8 = _mm256_packs_epi16(w16a, w16b);
    let ordered = _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
    let sum_lo = hsum(_mm256_add_epi32(q[0], q[1]));
    (d, sum_lo + hsum(_mm256_add_epi32(q[2], q[3])), sum_lo)
}
