//! The x86 lanes of the paged-attention kernel: AVX2 (8 lanes), and AVX-512 (16 lanes: the K
//! row loaded once for all heads of a chunk, a vectorised exp, the values summed in registers
//! 16 output dimensions at a time, K/V rows prefetched a few keys ahead).

use super::{Item, Lanes, RowLanes, Scratch, Store};

/// 8-lane AVX2 FMA; only reached through [`item_avx2`].
struct Avx2;

impl RowLanes for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only called from `item_avx2`, which requires AVX2 and FMA.
        unsafe { dot_avx2(a, b) }
    }

    #[inline(always)]
    fn axpy(o: &mut [f32], p: f32, v: &[f32]) {
        // SAFETY: as above.
        unsafe { axpy_avx2(o, p, v) }
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn item_avx2<S: Store>(
    it: &Item<S>,
    idx: usize,
    o: &mut [f32],
    scratch: &mut Scratch,
) {
    it.run::<Avx2>(idx, o, scratch);
}

/// 16-lane AVX-512: scores with the K row loaded once for all heads of the chunk, a
/// vectorised exp, and the values summed in registers 16 output dimensions at a time.
struct Avx512;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn item_avx512<S: Store>(
    it: &Item<S>,
    idx: usize,
    o: &mut [f32],
    scratch: &mut Scratch,
) {
    it.run::<Avx512>(idx, o, scratch);
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
    ) {
        // SAFETY: only called from `item_avx512`, which requires AVX-512 F/BW/VL and FMA; every
        // K row `k_offs[j]..+hd` is inside `keys` (slots of the cache).
        unsafe { scores_avx512(q, hd, keys, k_offs, scale, scores) }
    }

    #[inline(always)]
    fn softmax_numerators(row: &mut [f32]) -> f32 {
        // SAFETY: as above.
        unsafe { softmax_numerators_avx512(row) }
    }

    #[inline(always)]
    fn weighted_values<S: Store>(
        o: &mut [f32],
        vd: usize,
        p: &[f32],
        values: S,
        v_offs: &[usize],
        inv: &[f32],
    ) {
        // SAFETY: as above; every V row `v_offs[j]..+vd` is inside `values`.
        unsafe {
            match inv.len() {
                1 => weighted_values_avx512::<S, 1>(o, vd, p, values, v_offs, inv),
                2 => weighted_values_avx512::<S, 2>(o, vd, p, values, v_offs, inv),
                3 => weighted_values_avx512::<S, 3>(o, vd, p, values, v_offs, inv),
                4 => weighted_values_avx512::<S, 4>(o, vd, p, values, v_offs, inv),
                5 => weighted_values_avx512::<S, 5>(o, vd, p, values, v_offs, inv),
                6 => weighted_values_avx512::<S, 6>(o, vd, p, values, v_offs, inv),
                7 => weighted_values_avx512::<S, 7>(o, vd, p, values, v_offs, inv),
                _ => weighted_values_avx512::<S, 8>(o, vd, p, values, v_offs, inv),
            }
        }
    }
}

/// How many keys ahead the AVX-512 loops prefetch K/V rows.
const PREFETCH_AHEAD: usize = 4;

/// Prefetch the cache lines of `bytes` bytes from `p` into L1.
#[inline(always)]
pub(super) unsafe fn prefetch_bytes(p: *const u8, bytes: usize) {
    use std::arch::x86_64::*;
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[inline]
unsafe fn scores_avx512<S: Store>(
    q: &[f32],
    hd: usize,
    keys: S,
    k_offs: &[usize],
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = k_offs.len();
    let chunk = q.len() / hd;
    for (j, &off) in k_offs.iter().enumerate() {
        // rows of one KV head are strided across slots: fetch a few keys ahead
        if let Some(&ahead) = k_offs.get(j + PREFETCH_AHEAD) {
            keys.prefetch(ahead, hd);
        }
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i < hd {
            let m = lane_mask(hd - i);
            let k = keys.load16(off + i, m);
            for (c, a) in acc.iter_mut().enumerate().take(chunk) {
                let qv = _mm512_maskz_loadu_ps(m, q.as_ptr().add(c * hd + i));
                *a = _mm512_fmadd_ps(qv, k, *a);
            }
            i += 16;
        }
        for (c, a) in acc.iter().enumerate().take(chunk) {
            *scores.get_unchecked_mut(c * n + j) = _mm512_reduce_add_ps(*a) * scale;
        }
    }
}

/// `exp(x)` for 16 lanes with `x <= 0` (scores minus their maximum): Cephes' polynomial on the
/// reduced argument, scaled by `2^n`; within 2 ulp of `f32::exp`, 0 below -87.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(super) unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(e, n)
}

#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn softmax_numerators_avx512(row: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let m = lane_mask(n - i);
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(i)));
        i += 16;
    }
    let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let m = lane_mask(n - i);
        let e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mx));
        _mm512_mask_storeu_ps(p.add(i), m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
        i += 16;
    }
    _mm512_reduce_add_ps(sum)
}

/// Sixteen output dimensions at a time, the `C` heads' sums kept in registers over all keys.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[inline]
unsafe fn weighted_values_avx512<S: Store, const C: usize>(
    o: &mut [f32],
    vd: usize,
    p: &[f32],
    values: S,
    v_offs: &[usize],
    inv: &[f32],
) {
    use std::arch::x86_64::*;
    let n = v_offs.len();
    let mut i = 0;
    while i < vd {
        let m = lane_mask(vd - i);
        let mut acc = [_mm512_setzero_ps(); C];
        for (j, &off) in v_offs.iter().enumerate() {
            if let Some(&ahead) = v_offs.get(j + PREFETCH_AHEAD) {
                values.prefetch(ahead + i, 16.min(vd - i));
            }
            let v = values.load16(off + i, m);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*p.get_unchecked(c * n + j)), v, *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            let r = _mm512_mul_ps(*a, _mm512_set1_ps(inv[c]));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(c * vd + i), m, r);
        }
        i += 16;
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i + 8)),
            _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            acc1,
        );
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc0,
        );
        i += 8;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let mut s = _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
    while i < n {
        s = a[i].mul_add(b[i], s);
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn axpy_avx2(o: &mut [f32], p: f32, v: &[f32]) {
    use std::arch::x86_64::*;
    let n = o.len().min(v.len());
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        let r = _mm256_fmadd_ps(
            pv,
            _mm256_loadu_ps(v.as_ptr().add(i)),
            _mm256_loadu_ps(o.as_ptr().add(i)),
        );
        _mm256_storeu_ps(o.as_mut_ptr().add(i), r);
        i += 8;
    }
    while i < n {
        o[i] = p.mul_add(v[i], o[i]);
        i += 1;
    }
}
