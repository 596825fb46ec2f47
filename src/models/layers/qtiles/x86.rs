//! The AVX-512 VNNI side of the tiled matmul: one driver for every tile format (a block
//! record's weights as bytes for `vpdpbusd`, 16 rows × 4 columns per instruction, shared by up
//! to `ROWS` activation rows), each format giving only how its record loads and how a block's
//! integer sums scale into the outputs; and the activation quantizer.

use std::arch::x86_64::*;

use super::{Activations, TileFormat, TiledMatrix, QK, ROWS, TILE};

/// How one format's block record feeds the driver. `load` gives the weights as unsigned bytes:
/// `lo[g]` columns `4g..4g + 4` and `hi[g]` columns `16 + 4g..` of the 16 rows, and the
/// block's scales; `accumulate` adds a block to `acc` from the integer sums over columns
/// 0..16 (`s0`) and 16..32 (`s1`) against activation block `i`.
trait BlockKernel {
    type Scales: Copy;
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales);
    unsafe fn accumulate(
        scales: Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512;
}

/// The low and high nibbles of the four 64-byte groups at `p`.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> ([__m512i; 4], [__m512i; 4]) {
    let low = _mm512_set1_epi8(0x0f);
    let mut lo = [_mm512_setzero_si512(); 4];
    let mut hi = [_mm512_setzero_si512(); 4];
    for g in 0..4 {
        let w = _mm512_load_si512(p.add(64 * g) as *const __m512i);
        lo[g] = _mm512_and_si512(w, low);
        hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
    }
    (lo, hi)
}

/// `value` added to the bytes of `lo[g]` / `hi[g]` whose bits are set in the 64-bit masks at
/// `masks + 16g` / `masks + 16g + 8` (a weight's fifth or sixth bit).
#[inline(always)]
unsafe fn add_bits(lo: &mut [__m512i; 4], hi: &mut [__m512i; 4], masks: *const u8, value: i8) {
    let v = _mm512_set1_epi8(value);
    for g in 0..4 {
        let m = masks.add(16 * g) as *const u64;
        lo[g] = _mm512_mask_add_epi8(lo[g], m.read_unaligned(), lo[g], v);
        hi[g] = _mm512_mask_add_epi8(hi[g], m.add(1).read_unaligned(), hi[g], v);
    }
}

/// `acc + isum · (d · d_x)`.
#[inline(always)]
unsafe fn add_scaled(acc: __m512, isum: __m512i, d: __m512, act: &Activations, i: usize) -> __m512 {
    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*act.d.get_unchecked(i)));
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc)
}

/// `acc + m · s_x` (the 4-bit formats' minimum times the activation block's sum).
#[inline(always)]
unsafe fn add_min(acc: __m512, m: __m512, act: &Activations, i: usize) -> __m512 {
    _mm512_fmadd_ps(m, _mm512_set1_ps(*act.s.get_unchecked(i)), acc)
}

/// `s0 + s1 - offset · Σx`: the sum for weights stored `+ offset`.
#[inline(always)]
unsafe fn unbiased(s0: __m512i, s1: __m512i, offset: i32, act: &Activations, i: usize) -> __m512i {
    let bias = _mm512_set1_epi32(offset * *act.sum.get_unchecked(i));
    _mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias)
}

struct Q4_1;
impl BlockKernel for Q4_1 {
    type Scales = (__m512, __m512);
    #[inline(always)]
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales) {
        let d = _mm512_cvtph_ps(_mm256_load_si256(rec as *const __m256i));
        let m = _mm512_cvtph_ps(_mm256_load_si256(rec.add(32) as *const __m256i));
        let (lo, hi) = nibbles(rec.add(64));
        (lo, hi, (d, m))
    }
    #[inline(always)]
    unsafe fn accumulate(
        (d, m): Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512 {
        let acc = add_scaled(acc, _mm512_add_epi32(s0, s1), d, act, i);
        add_min(acc, m, act, i)
    }
}

struct Q4K;
impl BlockKernel for Q4K {
    type Scales = (__m512, __m512);
    #[inline(always)]
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales) {
        let d = _mm512_load_ps(rec as *const f32);
        let m = _mm512_load_ps(rec.add(64) as *const f32);
        let (lo, hi) = nibbles(rec.add(128));
        (lo, hi, (d, m))
    }
    #[inline(always)]
    unsafe fn accumulate(
        scales: Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512 {
        Q4_1::accumulate(scales, s0, s1, act, i, acc)
    }
}

struct Q5_0;
impl BlockKernel for Q5_0 {
    type Scales = __m512;
    #[inline(always)]
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales) {
        let d = _mm512_cvtph_ps(_mm256_load_si256(rec as *const __m256i));
        let (mut lo, mut hi) = nibbles(rec.add(128));
        add_bits(&mut lo, &mut hi, rec.add(64), 16);
        (lo, hi, d)
    }
    #[inline(always)]
    unsafe fn accumulate(
        d: Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512 {
        // the weights are stored + 16
        add_scaled(acc, unbiased(s0, s1, 16, act, i), d, act, i)
    }
}

struct Q6K;
impl BlockKernel for Q6K {
    type Scales = (__m512, __m512);
    #[inline(always)]
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales) {
        let d_lo = _mm512_load_ps(rec as *const f32);
        let d_hi = _mm512_load_ps(rec.add(64) as *const f32);
        let (mut lo, mut hi) = nibbles(rec.add(256));
        add_bits(&mut lo, &mut hi, rec.add(128), 16);
        add_bits(&mut lo, &mut hi, rec.add(192), 32);
        (lo, hi, (d_lo, d_hi))
    }
    #[inline(always)]
    unsafe fn accumulate(
        (d_lo, d_hi): Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512 {
        // the weights are stored + 32; each half has its own scale
        let (sum, sum_lo) = (*act.sum.get_unchecked(i), *act.sum_lo.get_unchecked(i));
        let isum_lo = _mm512_sub_epi32(s0, _mm512_set1_epi32(32 * sum_lo));
        let isum_hi = _mm512_sub_epi32(s1, _mm512_set1_epi32(32 * (sum - sum_lo)));
        let acc = add_scaled(acc, isum_lo, d_lo, act, i);
        add_scaled(acc, isum_hi, d_hi, act, i)
    }
}

struct Q8_0;
impl BlockKernel for Q8_0 {
    type Scales = __m512;
    #[inline(always)]
    unsafe fn load(rec: *const u8) -> ([__m512i; 4], [__m512i; 4], Self::Scales) {
        let d = _mm512_load_ps(rec as *const f32);
        let group = |g: usize| _mm512_load_si512(rec.add(64 + 64 * g) as *const __m512i);
        (
            [group(0), group(1), group(2), group(3)],
            [group(4), group(5), group(6), group(7)],
            d,
        )
    }
    #[inline(always)]
    unsafe fn accumulate(
        d: Self::Scales,
        s0: __m512i,
        s1: __m512i,
        act: &Activations,
        i: usize,
        acc: __m512,
    ) -> __m512 {
        // the weights are stored + 128
        add_scaled(acc, unbiased(s0, s1, 128, act, i), d, act, i)
    }
}

/// `R` activation rows from `first` against tile `t` of `w`, into `out[..R]`.
/// SAFETY: AVX-512 F/BW/VNNI present; `t` a tile of `w`, rows `first..first + R` in `act`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const R: usize>(
    w: &TiledMatrix,
    t: usize,
    first: usize,
    act: &Activations,
    out: &mut [[f32; TILE]; ROWS],
) {
    match w.format {
        TileFormat::Q4_1 => blocks::<Q4_1, R>(w, t, first, act, out),
        TileFormat::Q4K => blocks::<Q4K, R>(w, t, first, act, out),
        TileFormat::Q5_0 => blocks::<Q5_0, R>(w, t, first, act, out),
        TileFormat::Q6K => blocks::<Q6K, R>(w, t, first, act, out),
        TileFormat::Q8_0 => blocks::<Q8_0, R>(w, t, first, act, out),
    }
}

/// Each weight block is loaded (and unpacked) once for all `R` rows.
#[inline(always)]
unsafe fn blocks<K: BlockKernel, const R: usize>(
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
    for b in 0..nb {
        let (lo, hi, scales) = K::load(base.add(b * rec_bytes));
        for (j, a) in acc.iter_mut().enumerate() {
            let row = first + j;
            let x = act.q.as_ptr().add(row * w.k + b * QK) as *const i32;
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for g in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, lo[g], _mm512_set1_epi32(x.add(g).read_unaligned()));
                s1 = _mm512_dpbusd_epi32(
                    s1,
                    hi[g],
                    _mm512_set1_epi32(x.add(4 + g).read_unaligned()),
                );
            }
            *a = K::accumulate(scales, s0, s1, act, row * nb + b, *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
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
