//! The x86 lanes of the paged-attention kernel: AVX2 (8 lanes, a 16-key block as two halves)
//! and AVX-512 (16 lanes). Both transpose each block of 16 K rows in registers so one vector
//! holds one dimension of 16 keys, score a tile's rows against it with FMA chains (no
//! horizontal sums), compute the numerators with the shared exp polynomial, and sum the values
//! 8 or 16 output dimensions at a time for up to 8 rows in registers — the portable lanes'
//! exact operations, so the same bits.

use std::arch::x86_64::*;

use super::{
    lane_tree, Item, Lanes, Scratch, Store, Tile, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, KEY_BLOCK,
    SEGMENT,
};

/// `q`'s rows of `hd` in groups of 8, dimension-major: row `8g + r`, dimension `i` to
/// `qt[8g * hd + 8i + r]`, so a row group's values of one dimension are adjacent.
#[inline(always)]
fn transpose_rows(q: &[f32], hd: usize, qt: &mut [f32]) {
    for (r, row) in q.chunks_exact(hd).enumerate() {
        let base = r / 8 * 8 * hd + r % 8;
        for (i, &x) in row.iter().enumerate() {
            qt[base + 8 * i] = x;
        }
    }
}

/// Prefetch the cache lines of `bytes` bytes from `p` into L1.
#[inline(always)]
pub(super) unsafe fn prefetch_bytes(p: *const u8, bytes: usize) {
    let mut i = 0;
    while i < bytes {
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).add(i));
        i += 64;
    }
}

/// Lanes `0..len` of a 16-lane vector (a partial last block of a row).
#[inline(always)]
fn lane_mask(len: usize) -> u16 {
    if len >= 16 {
        u16::MAX
    } else {
        (1u16 << len) - 1
    }
}

/// Run `$f::<R>($args)` for `R = $n` (1..=8 rows).
macro_rules! by_rows {
    ($n:expr, $f:ident::<$s:ty>($($arg:expr),*)) => {
        match $n {
            1 => $f::<$s, 1>($($arg),*),
            2 => $f::<$s, 2>($($arg),*),
            3 => $f::<$s, 3>($($arg),*),
            4 => $f::<$s, 4>($($arg),*),
            5 => $f::<$s, 5>($($arg),*),
            6 => $f::<$s, 6>($($arg),*),
            7 => $f::<$s, 7>($($arg),*),
            _ => $f::<$s, 8>($($arg),*),
        }
    };
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}

/// `f(o, p, vis)` for the rows of `vis` in groups of up to 8, `o` and `p` at the group's first
/// row (`os` and `SEGMENT` values per row).
#[inline(always)]
fn row_groups(
    o: &mut [f32],
    os: usize,
    p: &[f32],
    vis: &[usize],
    size: usize,
    mut f: impl FnMut(*mut f32, *const f32, &[usize]),
) {
    for (g, vis) in vis.chunks(size).enumerate() {
        let r0 = g * size;
        f(o[r0 * os..].as_mut_ptr(), p[r0 * SEGMENT..].as_ptr(), vis);
    }
}

// ---------------------------------------------------------------- AVX-512

struct Avx512;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn segment_avx512<S: Store>(
    it: &Item<S>,
    tile: &Tile,
    g: usize,
    part: &mut [f32],
    sc: &mut Scratch,
    state: Option<&mut [f32]>,
) {
    it.segment::<Avx512>(tile, g, part, sc, state);
}

impl Lanes for Avx512 {
    #[inline(always)]
    fn scores<S: Store>(
        q: &[f32],
        hd: usize,
        keys: S,
        k_offs: &[usize],
        scale: f32,
        scores: &mut [f32],
        kt: &mut [f32],
    ) {
        // SAFETY: only reached through `segment_avx512` (AVX-512 F/BW/VL, FMA); every K row
        // `k_offs[j]..+hd` is in `keys`; `kt` holds `hd` rounded up to 16 rows of 16;
        // `scores` holds `SEGMENT` per row.
        unsafe { scores_avx512(q, hd, keys, k_offs, scale, scores, kt) }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { softmax_avx512(row) }
    }

    #[inline(always)]
    fn weighted_values<S: Store>(
        o: &mut [f32],
        os: usize,
        vd: usize,
        p: &[f32],
        values: S,
        v_offs: &[usize],
        vis: &[usize],
    ) {
        // SAFETY: only reached through `segment_avx512`; every V row `v_offs[j]..+vd` is in
        // `values`, `o` holds `os` per row, `p` `SEGMENT` per row.
        row_groups(o, os, p, vis, 4, |o, p, vis| unsafe {
            by_rows!(
                vis.len(),
                values_avx512::<S>(o, os, vd, p, values, v_offs, vis)
            )
        });
    }
}

/// A 16 × 16 transpose in registers: `r[i]` lane `j` becomes `r[j]` lane `i`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let z = _mm512_setzero_ps();
    let (mut t, mut u, mut v) = ([z; 16], [z; 16], [z; 16]);
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c]: 128-bit chunk k holds column 4k + c of rows 4g..4g + 4.
    for g in 0..4 {
        let b = 4 * g;
        u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm512_shuffle_ps::<0xEE>(t[b], t[b + 2]);
        u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
    }
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
    }
    for a in 0..8 {
        r[a] = _mm512_shuffle_f32x4::<0x88>(v[a], v[a + 8]);
        r[a + 8] = _mm512_shuffle_f32x4::<0xDD>(v[a], v[a + 8]);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn scores_avx512<S: Store>(
    q: &[f32],
    hd: usize,
    keys: S,
    k_offs: &[usize],
    scale: f32,
    scores: &mut [f32],
    kt: &mut [f32],
) {
    let rows = q.len() / hd;
    let n = k_offs.len();
    let (kt, qt) = kt.split_at_mut(hd.next_multiple_of(KEY_BLOCK) * KEY_BLOCK);
    transpose_rows(q, hd, qt);
    let ktp = kt.as_mut_ptr();
    let mut b = 0;
    while b < n {
        let kb = (n - b).min(KEY_BLOCK);
        for &ahead in k_offs.iter().skip(b + KEY_BLOCK).take(KEY_BLOCK) {
            keys.prefetch(ahead, hd);
        }
        let mut d0 = 0;
        while d0 < hd {
            let m = lane_mask(hd - d0);
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, rj) in r.iter_mut().enumerate().take(kb) {
                *rj = keys.load16(*k_offs.get_unchecked(b + j) + d0, m);
            }
            transpose16(&mut r);
            for (i, ri) in r.iter().enumerate() {
                _mm512_storeu_ps(ktp.add((d0 + i) * KEY_BLOCK), *ri);
            }
            d0 += 16;
        }
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(8);
            let (qp, out) = (
                qt.as_ptr().add(r0 / 8 * 8 * hd + r0 % 8),
                scores.as_mut_ptr().add(r0 * SEGMENT + b),
            );
            by_rows!(nr, score_rows_avx512(qp, hd, ktp, scale, out));
            r0 += nr;
        }
        b += KEY_BLOCK;
    }
}

/// `R` rows' scores against one transposed block: one FMA chain per row over the dimensions
/// (`q`: the rows transposed by [`transpose_rows`], at the group's first).
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn score_rows_avx512<const R: usize>(
    q: *const f32,
    hd: usize,
    kt: *const f32,
    scale: f32,
    out: *mut f32,
) {
    let mut acc = [_mm512_setzero_ps(); R];
    for i in 0..hd {
        let k = _mm512_loadu_ps(kt.add(i * KEY_BLOCK));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(i * 8 + r)), k, *a);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(
            out.add(r * SEGMENT),
            _mm512_mul_ps(*a, _mm512_set1_ps(scale)),
        );
    }
}

/// [`super::exp_poly`] on 16 lanes, operation for operation.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn exp_avx512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let pow = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(e, _mm512_castsi512_ps(pow))
}

/// Lane `i` of the 8-lane sum tree of [`lane_tree`] from its halving steps.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn tree8(s8: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn softmax_avx512(row: &mut [f32]) -> (f32, f32) {
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let m = lane_mask(n - i);
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(i)));
        i += 16;
    }
    let m = _mm512_reduce_max_ps(mx);
    let mv = _mm512_set1_ps(m);
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let k = lane_mask(n - i);
        let e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv));
        _mm512_mask_storeu_ps(p.add(i), k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
        i += 16;
    }
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sum)));
    (m, tree8(_mm256_add_ps(_mm512_castps512_ps256(sum), hi)))
}

/// `R` (≤ 4) rows' weighted values, 64 output dimensions (4 vectors) at a time summed in
/// registers: each V row is read once per 4 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn values_avx512<S: Store, const R: usize>(
    o: *mut f32,
    os: usize,
    vd: usize,
    p: *const f32,
    values: S,
    v_offs: &[usize],
    vis: &[usize],
) {
    let lo = vis.iter().copied().min().unwrap_or(0);
    let hi = vis.iter().copied().max().unwrap_or(0);
    let mut i = 0;
    while i < vd {
        let m: [u16; 4] = std::array::from_fn(|c| lane_mask((vd - i).saturating_sub(16 * c)));
        let nc = (vd - i).div_ceil(16).min(4);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..hi {
            let off = *v_offs.get_unchecked(j) + i;
            let mut v = [_mm512_setzero_ps(); 4];
            for c in 0..nc {
                v[c] = values.load16(off + 16 * c, m[c]);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                if j < lo || j < *vis.get_unchecked(r) {
                    let e = _mm512_set1_ps(*p.add(r * SEGMENT + j));
                    for c in 0..4 {
                        a[c] = _mm512_fmadd_ps(e, v[c], a[c]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            if vis[r] > 0 {
                for c in 0..nc {
                    _mm512_mask_storeu_ps(o.add(r * os + 2 + i + 16 * c), m[c], a[c]);
                }
            }
        }
        i += 64;
    }
}

// ---------------------------------------------------------------- AVX2

struct Avx2;

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn segment_avx2<S: Store>(
    it: &Item<S>,
    tile: &Tile,
    g: usize,
    part: &mut [f32],
    sc: &mut Scratch,
    state: Option<&mut [f32]>,
) {
    it.segment::<Avx2>(tile, g, part, sc, state);
}

impl Lanes for Avx2 {
    #[inline(always)]
    fn scores<S: Store>(
        q: &[f32],
        hd: usize,
        keys: S,
        k_offs: &[usize],
        scale: f32,
        scores: &mut [f32],
        kt: &mut [f32],
    ) {
        // SAFETY: only reached through `segment_avx2` (AVX2, FMA, F16C); bounds as for AVX-512.
        unsafe { scores_avx2(q, hd, keys, k_offs, scale, scores, kt) }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { softmax_avx2(row) }
    }

    #[inline(always)]
    fn weighted_values<S: Store>(
        o: &mut [f32],
        os: usize,
        vd: usize,
        p: &[f32],
        values: S,
        v_offs: &[usize],
        vis: &[usize],
    ) {
        // SAFETY: only reached through `segment_avx2`; every V row `v_offs[j]..+vd` is in
        // `values`, `o` holds `os` per row, `p` `SEGMENT` per row.
        row_groups(o, os, p, vis, 8, |o, p, vis| unsafe {
            by_rows!(
                vis.len(),
                values_avx2::<S>(o, os, vd, p, values, v_offs, vis)
            )
        });
    }
}

/// An 8 × 8 transpose in registers.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8(r: &mut [__m256; 8]) {
    let z = _mm256_setzero_ps();
    let (mut t, mut u) = ([z; 8], [z; 8]);
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for g in 0..2 {
        let b = 4 * g;
        u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm256_shuffle_ps::<0xEE>(t[b], t[b + 2]);
        u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm256_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
    }
    for c in 0..4 {
        r[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
        r[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scores_avx2<S: Store>(
    q: &[f32],
    hd: usize,
    keys: S,
    k_offs: &[usize],
    scale: f32,
    scores: &mut [f32],
    kt: &mut [f32],
) {
    let rows = q.len() / hd;
    let n = k_offs.len();
    let (kt, qt) = kt.split_at_mut(hd.next_multiple_of(KEY_BLOCK) * KEY_BLOCK);
    transpose_rows(q, hd, qt);
    let ktp = kt.as_mut_ptr();
    let mut b = 0;
    while b < n {
        for &ahead in k_offs.iter().skip(b + KEY_BLOCK).take(KEY_BLOCK) {
            keys.prefetch(ahead, hd);
        }
        let mut d0 = 0;
        while d0 < hd {
            let len = (hd - d0).min(8);
            for half in 0..2 {
                let mut r = [_mm256_setzero_ps(); 8];
                for (j, rj) in r.iter_mut().enumerate() {
                    if let Some(&off) = k_offs.get(b + half * 8 + j) {
                        *rj = keys.load8(off + d0, len);
                    }
                }
                transpose8(&mut r);
                for (i, ri) in r.iter().enumerate() {
                    _mm256_storeu_ps(ktp.add((d0 + i) * KEY_BLOCK + half * 8), *ri);
                }
            }
            d0 += 8;
        }
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(4);
            let (qp, out) = (
                qt.as_ptr().add(r0 / 8 * 8 * hd + r0 % 8),
                scores.as_mut_ptr().add(r0 * SEGMENT + b),
            );
            by_rows!(nr, score_rows_avx2(qp, hd, ktp, scale, out));
            r0 += nr;
        }
        b += KEY_BLOCK;
    }
}

/// `R` (≤ 4) rows' scores against one transposed block, its two halves of 8 keys.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn score_rows_avx2<const R: usize>(
    q: *const f32,
    hd: usize,
    kt: *const f32,
    scale: f32,
    out: *mut f32,
) {
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for i in 0..hd {
        let kl = _mm256_loadu_ps(kt.add(i * KEY_BLOCK));
        let kh = _mm256_loadu_ps(kt.add(i * KEY_BLOCK + 8));
        for r in 0..R {
            let qv = _mm256_set1_ps(*q.add(i * 8 + r));
            lo[r] = _mm256_fmadd_ps(qv, kl, lo[r]);
            hi[r] = _mm256_fmadd_ps(qv, kh, hi[r]);
        }
    }
    let s = _mm256_set1_ps(scale);
    for r in 0..R {
        _mm256_storeu_ps(out.add(r * SEGMENT), _mm256_mul_ps(lo[r], s));
        _mm256_storeu_ps(out.add(r * SEGMENT + 8), _mm256_mul_ps(hi[r], s));
    }
}

/// [`super::exp_poly`] on 8 lanes, operation for operation.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp_avx2(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(e, _mm256_castsi256_ps(pow))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn softmax_avx2(row: &mut [f32]) -> (f32, f32) {
    let n = row.len();
    let whole = n / 16 * 16;
    let p = row.as_mut_ptr();
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < whole {
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i + 8)));
        i += 16;
    }
    let mut lanes = [0f32; 16];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
    let m = lanes[..8]
        .iter()
        .chain(&row[whole..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mv = _mm256_set1_ps(m);
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < whole {
        let el = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        let eh = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), mv));
        _mm256_storeu_ps(p.add(i), el);
        _mm256_storeu_ps(p.add(i + 8), eh);
        lo = _mm256_add_ps(lo, el);
        hi = _mm256_add_ps(hi, eh);
        i += 16;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    for (l, x) in lanes.iter_mut().zip(&mut row[whole..]) {
        *x = super::exp_poly(*x - m);
        *l += *x;
    }
    (m, lane_tree(lanes))
}

/// `R` rows' weighted values, 8 output dimensions at a time summed in registers.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn values_avx2<S: Store, const R: usize>(
    o: *mut f32,
    os: usize,
    vd: usize,
    p: *const f32,
    values: S,
    v_offs: &[usize],
    vis: &[usize],
) {
    let lo = vis.iter().copied().min().unwrap_or(0);
    let hi = vis.iter().copied().max().unwrap_or(0);
    let mut i = 0;
    while i < vd {
        let len = (vd - i).min(8);
        let mut acc = [_mm256_setzero_ps(); R];
        for j in 0..hi {
            let v = values.load8(*v_offs.get_unchecked(j) + i, len);
            for (r, a) in acc.iter_mut().enumerate() {
                if j < lo || j < *vis.get_unchecked(r) {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(r * SEGMENT + j)), v, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            if vis[r] > 0 {
                let mut buf = [0f32; 8];
                _mm256_storeu_ps(buf.as_mut_ptr(), *a);
                std::ptr::copy_nonoverlapping(buf.as_ptr(), o.add(r * os + 2 + i), len);
            }
        }
        i += 8;
    }
}
