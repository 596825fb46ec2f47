//! Paged attention on the CPU: each query token attends, causally, over its sequence's K/V read
//! in place from the cache blocks — no gather into a contiguous copy. GQA maps query head `h` to
//! KV head `h / (num_heads / num_kv_heads)`; the query heads of one KV head are computed together
//! so each K/V row is read once for all of them. Two passes per work item (scores and softmax,
//! then the weighted sum of values), each item on its own data, so a token's result never
//! depends on what else is in the batch. K/V are stored f32, f16 or Q8_0 (`LayerKv`), read
//! through [`Store`]; the items run on candle's compute pool (`layers::pool`); the x86 vector
//! lanes live in `x86`.

use half::f16;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
use self::x86::{item_avx2, item_avx512};
use crate::models::kv_cache::{HostKv, HostQ8, KvElem, LayerKv, Q8_GROUP};
use crate::models::layers::pool::{self, SyncPtr};
use crate::models::ForwardBatch;

#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Query/key width per head.
    pub head_dim: usize,
    /// Value (and output) width per head.
    pub v_head_dim: usize,
    /// MLA: the values are the first `v_head_dim` dimensions of each key row.
    pub values_in_keys: bool,
    pub scale: f32,
}

impl AttnDims {
    /// Standard multi-head / grouped-query attention: values as wide as keys, stored apart.
    pub fn mha(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_heads,
            num_kv_heads,
            head_dim,
            v_head_dim: head_dim,
            values_in_keys: false,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// `q`: `[tokens, num_heads, head_dim]` (flat, RoPE applied). Returns `[tokens, num_heads,
/// v_head_dim]`.
/// The batch's K/V must already be written into `cache`.
pub fn paged_attention(q: &[f32], cache: &LayerKv, batch: &ForwardBatch, d: AttnDims) -> Vec<f32> {
    let group = d.num_heads / d.num_kv_heads;

    // Token -> (sequence, number of keys it sees). A token at query offset i of a sequence
    // whose context after this step is L (with n new tokens) sees keys 0..=L-n+i.
    let mut token_seq = Vec::with_capacity(batch.num_tokens());
    for s in 0..batch.num_seqs() {
        let (lo, hi) = (batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]);
        let first = batch.seq_lens[s] - (hi - lo);
        for i in 0..hi - lo {
            token_seq.push((s, first + i + 1));
        }
    }

    // One work item per (token, KV head, chunk of that KV head's query heads): the chunk's
    // heads share each K and V row read. With few tokens, one head per item keeps both cores
    // busy. Chunking only groups heads; each head's arithmetic is the same either way, so a
    // token's result never depends on the batch. (Measured on SmolLM2, 2 cores, contexts of
    // 100-228: one head per item is 7% faster for a single decode; chunks of 3 heads made no
    // difference at 16 decodes — K/V reuse pays only once contexts are long.)
    let items_per_head = batch.num_tokens() * d.num_kv_heads;
    let chunk = if items_per_head >= 4 * pool::threads() {
        (1..=group.min(8))
            .rev()
            .find(|c| group.is_multiple_of(*c))
            .unwrap_or(1)
    } else {
        1
    };
    attend_in_chunks(q, cache, batch, d, &token_seq, chunk)
}

/// [`paged_attention`] with `chunk` query heads (a divisor of the group size) per work item.
fn attend_in_chunks(
    q: &[f32],
    cache: &LayerKv,
    batch: &ForwardBatch,
    d: AttnDims,
    token_seq: &[(usize, usize)],
    chunk: usize,
) -> Vec<f32> {
    match cache {
        LayerKv::F32(c) => attend_typed(q, float_rows(c, d), batch, d, token_seq, chunk),
        LayerKv::F16(c) => attend_typed(q, float_rows(c, d), batch, d, token_seq, chunk),
        LayerKv::Q8(c) => attend_typed(q, q8_rows(c, d), batch, d, token_seq, chunk),
    }
}

/// The K and V stores of float host storage (V is K for MLA).
fn float_rows<E: Elem>(c: &HostKv<E>, d: AttnDims) -> (&[E], &[E]) {
    (&c.k, if d.values_in_keys { &c.k } else { &c.v })
}

/// The K and V stores of Q8_0 host storage (V is K for MLA).
fn q8_rows(c: &HostQ8, d: AttnDims) -> (Q8Rows<'_>, Q8Rows<'_>) {
    let k = Q8Rows {
        qs: &c.k,
        scales: &c.k_scales,
    };
    let v = if d.values_in_keys {
        k
    } else {
        Q8Rows {
            qs: &c.v,
            scales: &c.v_scales,
        }
    };
    (k, v)
}

fn attend_typed<S: Store>(
    q: &[f32],
    (keys, values): (S, S),
    batch: &ForwardBatch,
    d: AttnDims,
    token_seq: &[(usize, usize)],
    chunk: usize,
) -> Vec<f32> {
    let it = Item {
        q,
        keys,
        values,
        batch,
        d,
        token_seq,
        chunk,
    };
    let simd = Simd::active();
    let mut out = vec![0f32; q.len() / d.head_dim * d.v_head_dim];
    let width = chunk * d.v_head_dim;
    let dst = SyncPtr(out.as_mut_ptr());
    pool::for_each_range(out.len() / width, |range| {
        SCRATCH.with_borrow_mut(|scratch| {
            for idx in range {
                // SAFETY: item `idx` alone writes `out[idx * width..(idx + 1) * width]`.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(dst.get().add(idx * width), width) };
                #[cfg(target_arch = "x86_64")]
                match simd {
                    // SAFETY: the CPU has the features (detected above).
                    Simd::Avx512 => unsafe { item_avx512(&it, idx, o, scratch) },
                    Simd::Avx2 => unsafe { item_avx2(&it, idx, o, scratch) },
                    Simd::None => it.run::<Portable>(idx, o, scratch),
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = simd;
                    it.run::<Portable>(idx, o, scratch);
                }
            }
        })
    });
    out
}

thread_local! {
    /// Each pool thread's buffers, kept across layers and steps.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The widest vector unit this CPU has for the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    None,
}

impl Simd {
    /// The kernel of the active kernel path (`INFERD_CPU_KERNELS`), never wider than the CPU.
    fn active() -> Self {
        use super::simd::KernelPath;
        match (KernelPath::active(), Self::detect()) {
            (KernelPath::Portable, _) | (_, Self::None) => Self::None,
            (KernelPath::Avx2 | KernelPath::AvxVnni, _) => Self::Avx2,
            (KernelPath::Avx512, widest) => widest,
        }
    }

    /// The widest kernel this CPU runs.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("fma") {
                return Self::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Self::Avx2;
            }
        }
        Self::None
    }
}

/// Per-thread buffers reused across work items.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Where each key's K row starts in the layer's K storage.
    k_offs: Vec<usize>,
    /// Where each key's V row starts (in V storage, or in K storage for MLA).
    v_offs: Vec<usize>,
}

/// Everything a work item reads.
struct Item<'a, S> {
    q: &'a [f32],
    keys: S,
    /// V storage, or the K storage for MLA.
    values: S,
    batch: &'a ForwardBatch,
    d: AttnDims,
    token_seq: &'a [(usize, usize)],
    chunk: usize,
}

/// K or V storage as the kernels read it, indexed by value (a row of one KV head starts at
/// `slot * slot_width + head * head_dim`): f32 or f16 slices, or Q8_0 rows.
trait Store: Copy + Send + Sync {
    /// Values `off..off + len` as f32: in place, or converted into `buf`.
    fn row<'a>(self, off: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32]
    where
        Self: 'a;

    /// Values `index..index + 16` (lanes `mask`), widened to f32.
    /// SAFETY: AVX-512 F/BW/VL; the masked values exist; for Q8_0, the 16 lanes lie in one
    /// group of 32 (`index` a multiple of 16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(self, index: usize, mask: u16) -> std::arch::x86_64::__m512;

    /// Prefetch values `index..index + len` into L1.
    /// SAFETY: the values exist.
    #[cfg(target_arch = "x86_64")]
    unsafe fn prefetch(self, index: usize, len: usize);
}

impl<E: Elem> Store for &[E] {
    #[inline(always)]
    fn row<'a>(self, off: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32]
    where
        Self: 'a,
    {
        E::row(&self[off..off + len], buf)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(self, index: usize, mask: u16) -> std::arch::x86_64::__m512 {
        E::load16(self.as_ptr().add(index), mask)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(self, index: usize, len: usize) {
        x86::prefetch_bytes(
            self.as_ptr().add(index) as *const u8,
            len * std::mem::size_of::<E>(),
        );
    }
}

/// Q8_0 storage: int8 values and an f16 scale per 32. A value is `q * scale` in f32, the same
/// product whichever lanes compute it.
#[derive(Clone, Copy)]
struct Q8Rows<'a> {
    qs: &'a [i8],
    scales: &'a [f16],
}

impl Store for Q8Rows<'_> {
    #[inline(always)]
    fn row<'a>(self, off: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32]
    where
        Self: 'a,
    {
        let buf = &mut buf[..len];
        for (i, b) in buf.iter_mut().enumerate() {
            let at = off + i;
            *b = f32::from(self.qs[at]) * self.scales[at / Q8_GROUP].to_f32();
        }
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(self, index: usize, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let q = _mm_maskz_loadu_epi8(mask, self.qs.as_ptr().add(index));
        let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        let d = self.scales.get_unchecked(index / Q8_GROUP).to_f32();
        _mm512_mul_ps(f, _mm512_set1_ps(d))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(self, index: usize, len: usize) {
        x86::prefetch_bytes(self.qs.as_ptr().add(index) as *const u8, len);
    }
}

/// A host K/V element as the kernels read it.
trait Elem: KvElem {
    /// `row` as f32: itself, or converted into `buf`.
    fn row<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// Up to 16 lanes (`mask`) from `p`, widened to f32.
    /// SAFETY: AVX-512 F/BW/VL; the masked lanes readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn row<'a>(row: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        row
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn row<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..row.len()];
        row.convert_to_f32_slice(buf);
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

/// The vector operations of the kernel; one implementation is chosen per machine, so a
/// token's arithmetic never depends on the batch. `q` holds `chunk` query rows of `hd`; key
/// and value `j` start at `keys[k_offs[j]]` and `values[v_offs[j]]`; `p` and `scores` are
/// `chunk` rows of `n = k_offs.len()`.
trait Lanes {
    /// `scores[c * n + j] = scale * dot(q_c, key_j)`.
    fn scores<S: Store>(
        q: &[f32],
        hd: usize,
        keys: S,
        k_offs: &[usize],
        scale: f32,
        scores: &mut [f32],
    );

    /// `row[j] = exp(row[j] - max(row))` in place; returns their sum.
    fn softmax_numerators(row: &mut [f32]) -> f32;

    /// `o[c] = inv[c] * Σ_j p[c * n + j] * value_j` for each of the `inv.len()` heads.
    fn weighted_values<S: Store>(
        o: &mut [f32],
        vd: usize,
        p: &[f32],
        values: S,
        v_offs: &[usize],
        inv: &[f32],
    );
}

/// Lanes built from two row operations, a key or value row at a time (the portable and AVX2
/// lanes).
trait RowLanes {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `o += p * v`.
    fn axpy(o: &mut [f32], p: f32, v: &[f32]);
}

impl<L: RowLanes> Lanes for L {
    #[inline(always)]
    fn scores<S: Store>(
        q: &[f32],
        hd: usize,
        keys: S,
        k_offs: &[usize],
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = k_offs.len();
        let mut buf = vec![0f32; hd];
        for (j, &off) in k_offs.iter().enumerate() {
            let krow = keys.row(off, hd, &mut buf);
            for (c, qrow) in q.chunks_exact(hd).enumerate() {
                scores[c * n + j] = Self::dot(qrow, krow) * scale;
            }
        }
    }

    #[inline(always)]
    fn softmax_numerators(row: &mut [f32]) -> f32 {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        sum
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
        let n = v_offs.len();
        let mut buf = vec![0f32; vd];
        o.fill(0.0);
        for (j, &off) in v_offs.iter().enumerate() {
            let vrow = values.row(off, vd, &mut buf);
            for c in 0..inv.len() {
                Self::axpy(&mut o[c * vd..(c + 1) * vd], p[c * n + j], vrow);
            }
        }
        for (c, &w) in inv.iter().enumerate() {
            o[c * vd..(c + 1) * vd].iter_mut().for_each(|a| *a *= w);
        }
    }
}

impl<S: Store> Item<'_, S> {
    /// Work item `idx`: one token, `chunk` query heads of one KV head; writes `o`.
    #[inline(always)]
    fn run<L: Lanes>(&self, idx: usize, o: &mut [f32], scratch: &mut Scratch) {
        let (d, chunk) = (self.d, self.chunk);
        let (hd, vd) = (d.head_dim, d.v_head_dim);
        let group = d.num_heads / d.num_kv_heads;
        let (slot_w, v_slot_w) = (d.num_kv_heads * hd, d.num_kv_heads * vd);
        let bs = self.batch.block_size;
        let chunks_per_token = d.num_heads / chunk;
        let t = idx / chunks_per_token;
        let h0 = (idx % chunks_per_token) * chunk;
        let (s, n) = self.token_seq[t];
        let table = &self.batch.block_tables[s];
        let kvh = h0 / group;
        let (kv_off, v_off) = (kvh * hd, kvh * vd);
        let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
        let Scratch {
            scores,
            k_offs,
            v_offs,
        } = scratch;
        k_offs.clear();
        k_offs.extend((0..n).map(|j| slot(j) * slot_w + kv_off));
        let v_offs = if d.values_in_keys {
            &*k_offs
        } else {
            v_offs.clear();
            v_offs.extend((0..n).map(|j| slot(j) * v_slot_w + v_off));
            &*v_offs
        };

        // Scores of every key for each head of the chunk: scores[c * n + j].
        scores.clear();
        scores.resize(chunk * n, 0.0);
        let q = &self.q[(t * d.num_heads + h0) * hd..][..chunk * hd];
        L::scores(q, hd, self.keys, k_offs, d.scale, scores);
        // Softmax numerators in place; the normalisation is applied with the values.
        let mut inv = [0f32; 8];
        for c in 0..chunk {
            inv[c] = 1.0 / L::softmax_numerators(&mut scores[c * n..(c + 1) * n]);
        }
        L::weighted_values(o, vd, scores, self.values, v_offs, &inv[..chunk]);
    }
}

/// Plain loops, in the AVX2 lanes' exact order: two 8-lane FMA accumulators over blocks of 16
/// (a last block of 8 into the first), added lane by lane, reduced 8 → 4 → 2 → 1 as the AVX2
/// horizontal sum does, the tail by FMA; `axpy` by FMA. So the portable and AVX2 kernels give
/// the same bits (tested), and the `avx2`/`avxvnni` kernel paths the portable path's tokens.
struct Portable;

impl RowLanes for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = ([0f32; 8], [0f32; 8]);
        let mut i = 0;
        while i + 16 <= n {
            for l in 0..8 {
                acc0[l] = a[i + l].mul_add(b[i + l], acc0[l]);
                acc1[l] = a[i + 8 + l].mul_add(b[i + 8 + l], acc1[l]);
            }
            i += 16;
        }
        if i + 8 <= n {
            for l in 0..8 {
                acc0[l] = a[i + l].mul_add(b[i + l], acc0[l]);
            }
            i += 8;
        }
        let acc: [f32; 8] = std::array::from_fn(|l| acc0[l] + acc1[l]);
        let half: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
        let mut s = (half[0] + half[2]) + (half[1] + half[3]);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }

    #[inline(always)]
    fn axpy(o: &mut [f32], p: f32, v: &[f32]) {
        for (a, &x) in o.iter_mut().zip(v) {
            *a = p.mul_add(x, *a);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::kv_cache::{quantize_q8, CacheSpec, KvCache, KV_Q8_0};

    /// Naive causal attention over contiguous K/V for one sequence, for comparison.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, d: AttnDims, first: usize) -> Vec<f32> {
        let hd = d.head_dim;
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![0f32; q.len()];
        for t in 0..n {
            for h in 0..d.num_heads {
                let qr = &q[(t * d.num_heads + h) * hd..][..hd];
                let kvh = h / group;
                let keys = first + t + 1;
                let scores: Vec<f32> = (0..keys)
                    .map(|j| {
                        let kr = &k[(j * d.num_kv_heads + kvh) * hd..][..hd];
                        qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * d.scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vr = &v[(j * d.num_kv_heads + kvh) * hd..][..hd];
                    for i in 0..hd {
                        out[(t * d.num_heads + h) * hd + i] += w / z * vr[i];
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1) for kernel tests.
    pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn paged_matches_contiguous_with_scattered_blocks_and_gqa() {
        check_paged(candle_core::DType::F32, 8);
        // A head of 28: a block of 16, one of 8 and a tail of 4 in the lanes' dot products.
        check_paged(candle_core::DType::F32, 28);
    }

    /// The f16 cache against the reference on the f16-rounded K/V: the kernels add no error
    /// of their own beyond the storage's rounding.
    #[test]
    fn f16_cache_matches_the_reference_on_rounded_values() {
        check_paged(candle_core::DType::F16, 8);
    }

    /// The Q8_0 cache likewise, on the quantized values (heads of 32 and 64: one and two
    /// groups of 32 per row); every lane set reads the same products.
    #[test]
    fn q8_0_cache_matches_the_reference_on_quantized_values() {
        check_paged(KV_Q8_0, 32);
        check_paged(KV_Q8_0, 64);
    }

    fn check_paged(dtype: candle_core::DType, hd: usize) {
        let d = AttnDims {
            scale: 0.35,
            ..AttnDims::mha(4, 2, hd)
        };
        let spec = CacheSpec {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: hd,
            dtype,
            values_in_keys: None,
        };
        let bs = 2;
        let mut cache = KvCache::new(spec, 8, bs);
        assert_eq!(cache.spec().dtype, dtype);
        // One sequence of 7 tokens in scattered blocks [5, 1, 6, 3]; the last 3 tokens are the
        // new ones (a chunk at an offset), the first 4 were cached by an earlier step.
        let table = vec![5u32, 1, 6, 3];
        let n_ctx = 7;
        let k = pseudo(n_ctx * 2 * hd, 1);
        let v = pseudo(n_ctx * 2 * hd, 2);
        let slots: Vec<usize> = (0..n_ctx)
            .map(|p| table[p / bs] as usize * bs + p % bs)
            .collect();
        cache.write(0, &k, &v, &slots);
        let stored = |x: &[f32]| -> Vec<f32> {
            match dtype {
                candle_core::DType::F16 => x.iter().map(|&a| f16::from_f32(a).to_f32()).collect(),
                KV_Q8_0 => {
                    let mut qs = vec![0i8; x.len()];
                    let mut sc = vec![f16::ZERO; x.len() / Q8_GROUP];
                    quantize_q8(&mut qs, &mut sc, x);
                    qs.iter()
                        .enumerate()
                        .map(|(i, &v)| f32::from(v) * sc[i / Q8_GROUP].to_f32())
                        .collect()
                }
                _ => x.to_vec(),
            }
        };
        let q_all = pseudo(n_ctx * 4 * hd, 3);
        let q = &q_all[4 * 4 * hd..];
        let batch = ForwardBatch {
            input_ids: vec![0; 3],
            positions: vec![4, 5, 6],
            cu_seqlens_q: vec![0, 3],
            seq_lens: vec![7],
            block_tables: vec![table],
            slot_mapping: slots[4..].to_vec(),
            logits_indices: vec![2],
            block_size: bs,
        };
        batch.validate(cache.num_slots()).unwrap();
        let layer = cache.host_layer(0).unwrap();
        let got = paged_attention(q, layer, &batch, d);
        let want = reference(q, &stored(&k), &stored(&v), 3, d, 4);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Two query heads per work item (what larger batches use) computes the same bits.
        let token_seq = [(0, 5), (0, 6), (0, 7)];
        let chunked = attend_in_chunks(q, layer, &batch, d, &token_seq, 2);
        assert_eq!(chunked, got);
        match layer {
            LayerKv::F32(c) => other_lanes_agree(q, float_rows(c, d), &batch, d, &token_seq, &want),
            LayerKv::F16(c) => other_lanes_agree(q, float_rows(c, d), &batch, d, &token_seq, &want),
            LayerKv::Q8(c) => other_lanes_agree(q, q8_rows(c, d), &batch, d, &token_seq, &want),
        }
    }

    /// The portable lanes (machines without AVX2), and the AVX2 lanes on a machine that picks
    /// AVX-512, agree with the reference too.
    fn other_lanes_agree<S: Store>(
        q: &[f32],
        (keys, values): (S, S),
        batch: &ForwardBatch,
        d: AttnDims,
        token_seq: &[(usize, usize)],
        want: &[f32],
    ) {
        let it = Item {
            q,
            keys,
            values,
            batch,
            d,
            token_seq,
            chunk: 1,
        };
        let mut portable = vec![0f32; want.len()];
        let mut scratch = Scratch::default();
        for (idx, o) in portable.chunks_mut(d.v_head_dim).enumerate() {
            it.run::<Portable>(idx, o, &mut scratch);
        }
        for (a, b) in portable.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        #[cfg(target_arch = "x86_64")]
        if Simd::detect() != Simd::None {
            let mut avx2 = vec![0f32; want.len()];
            for (idx, o) in avx2.chunks_mut(d.v_head_dim).enumerate() {
                // SAFETY: AVX2 and FMA are present (every detected level has them).
                unsafe { item_avx2(&it, idx, o, &mut scratch) };
            }
            assert_eq!(avx2, portable, "the AVX2 lanes give the portable bits");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp() {
        if Simd::detect() != Simd::Avx512 {
            return;
        }
        use super::x86::exp_avx512;
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..16 * 700).map(|i| -(i as f32) * 0.0125).collect();
        for block in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F and FMA detected above.
            unsafe {
                let e = exp_avx512(_mm512_loadu_ps(block.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), e);
            }
            for (&x, &g) in block.iter().zip(&got) {
                let want = x.exp();
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(
                    ulp <= 2 || (want < 1e-37 && g < 1e-37),
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
    }
}
