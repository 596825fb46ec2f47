//! Paged attention on the CPU: each query token attends, causally, over its sequence's K/V read
//! in place from the cache blocks — no gather into a contiguous copy. GQA maps query head `h` to
//! KV head `h / (num_heads / num_kv_heads)`. K/V are stored f32, f16 or Q8_0 (`LayerKv`), read
//! through [`Store`]; the work runs on candle's compute pool (`layers::pool`); the x86 vector
//! lanes live in `x86`.
//!
//! The arithmetic is fixed per (token, head), whatever the batch, the work split or the
//! machine's vector width:
//! - keys are taken in segments of [`SEGMENT`]; in each, a score is `scale` times a chain of
//!   FMAs over the dimensions in order, the segment's softmax numerators are `exp(s - max)`
//!   (one polynomial, [`exp_poly`]), their sum is kept in 16 lanes (key `j` in lane `j % 16`)
//!   added in a fixed tree, and the weighted values are FMA chains over the keys in order;
//! - the segments' partial results `(max, sum, values)` are folded left to right in key order
//!   (flash attention's rescaling), then divided by the sum.
//!
//! So the portable, AVX2 and AVX-512 lanes give the same bits (tested), and the work can be
//! split any way without changing a result: query rows are tiled (several tokens and the query
//! heads of one KV head per tile, so a K block is transposed once for all of them and scored
//! 16 keys per vector with no horizontal sums), and when tiles are fewer than the threads —
//! one long decode — each segment is its own work item whose partial result is folded
//! afterwards in the same order (flash-decoding).

mod store;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{exp_avx2, exp_avx512};

use self::store::{Elem, Q8Rows, Store};
use crate::models::kv_cache::{HostKv, HostQ8, LayerKv};
use crate::models::layers::pool::{self, SyncPtr};
use crate::models::ForwardBatch;

/// Keys per softmax segment: the unit of the fold, and of the split of one long sequence
/// over the threads. A multiple of [`KEY_BLOCK`].
pub const SEGMENT: usize = 256;

/// Keys scored per block: K rows transposed so each vector holds one dimension of 16 keys.
const KEY_BLOCK: usize = 16;

/// Query rows (tokens × heads) a tile aims for: enough to share each transposed K block, few
/// enough that their scores stay in L1/L2.
const TILE_ROWS: usize = 32;

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
    let plan = Plan::new(batch, d, pool::threads());
    attend(q, cache, batch, d, &plan, Simd::active())
}

/// Query rows attended together: `tokens` consecutive tokens of one sequence (flat batch
/// indices from `t0`) × `chunk` query heads from `h0` (all of one KV head). Row `r` is token
/// `t0 + r / chunk`, head `h0 + r % chunk`, and sees keys `0..first_keys + r / chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tile {
    t0: usize,
    tokens: usize,
    h0: usize,
    seq: usize,
    first_keys: usize,
}

impl Tile {
    /// Keys its last token sees (the most of any row).
    fn keys(&self) -> usize {
        self.first_keys + self.tokens - 1
    }

    fn segments(&self) -> usize {
        self.keys().div_ceil(SEGMENT)
    }
}

/// How one call's work is cut: the tiles, and whether each (tile, segment) is its own work
/// item (partial results folded afterwards) or each tile one item.
#[derive(Debug)]
struct Plan {
    chunk: usize,
    tiles: Vec<Tile>,
    split: bool,
}

impl Plan {
    /// Tiles of all the query heads of a KV head (at most 8) and about [`TILE_ROWS`] rows;
    /// split into segments when that leaves fewer than four tiles per thread; one head per
    /// tile when even the segments are too few (short contexts).
    fn new(batch: &ForwardBatch, d: AttnDims, threads: usize) -> Self {
        let group = d.num_heads / d.num_kv_heads;
        let chunk = (1..=group.min(8))
            .rev()
            .find(|c| group.is_multiple_of(*c))
            .unwrap_or(1);
        let plan = Self::build(batch, d, chunk, (TILE_ROWS / chunk).max(1), false);
        if plan.tiles.len() >= 4 * threads {
            return plan;
        }
        let segments: usize = plan.tiles.iter().map(Tile::segments).sum();
        if segments >= 2 * threads {
            return Self {
                split: true,
                ..plan
            };
        }
        Self::build(batch, d, 1, 1, true)
    }

    /// Tiles of `chunk` heads (a divisor of the group size) and up to `tokens` tokens.
    fn build(batch: &ForwardBatch, d: AttnDims, chunk: usize, tokens: usize, split: bool) -> Self {
        let mut tiles = Vec::new();
        for s in 0..batch.num_seqs() {
            let (lo, hi) = (batch.cu_seqlens_q[s], batch.cu_seqlens_q[s + 1]);
            // The token at offset i of a sequence whose context after this step is L (n new
            // tokens) sees keys 0..=L-n+i.
            let first = batch.seq_lens[s] - (hi - lo);
            let mut t0 = lo;
            while t0 < hi {
                let n = tokens.min(hi - t0);
                for h0 in (0..d.num_heads).step_by(chunk) {
                    tiles.push(Tile {
                        t0,
                        tokens: n,
                        h0,
                        seq: s,
                        first_keys: first + (t0 - lo) + 1,
                    });
                }
                t0 += n;
            }
        }
        Self {
            chunk,
            tiles,
            split,
        }
    }

    fn rows(&self, tile: &Tile) -> usize {
        tile.tokens * self.chunk
    }
}

/// Attention of every tile of `plan` with the `simd` lanes.
fn attend(
    q: &[f32],
    cache: &LayerKv,
    batch: &ForwardBatch,
    d: AttnDims,
    plan: &Plan,
    simd: Simd,
) -> Vec<f32> {
    match cache {
        LayerKv::F32(c) => attend_typed(q, float_rows(c, d), batch, d, plan, simd),
        LayerKv::F16(c) => attend_typed(q, float_rows(c, d), batch, d, plan, simd),
        LayerKv::Q8(c) => attend_typed(q, q8_rows(c, d), batch, d, plan, simd),
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
    plan: &Plan,
    simd: Simd,
) -> Vec<f32> {
    let it = Item {
        q,
        keys,
        values,
        batch,
        d,
        chunk: plan.chunk,
    };
    let mut out = vec![0f32; q.len() / d.head_dim * d.v_head_dim];
    let dst = SyncPtr(out.as_mut_ptr());
    let part_w = d.v_head_dim + 2;
    if !plan.split {
        pool::for_each_range(plan.tiles.len(), |range| {
            SCRATCH.with_borrow_mut(|sc| {
                for tile in &plan.tiles[range] {
                    let rows = plan.rows(tile);
                    empty_rows(&mut sc.state, rows, part_w);
                    let (mut part, mut state) =
                        (std::mem::take(&mut sc.part), std::mem::take(&mut sc.state));
                    part.resize(rows * part_w, 0.0);
                    for g in 0..tile.segments() {
                        run_segment(simd, &it, tile, g, &mut part, sc, Some(&mut state));
                    }
                    (sc.part, sc.state) = (part, state);
                    // SAFETY: each tile alone writes its rows of `out`.
                    unsafe { it.write_rows(tile, &sc.state, dst) };
                }
            })
        });
        return out;
    }
    // Flash-decoding: (tile, segment) items write partial results, folded per tile after.
    let mut items = Vec::new();
    let mut at = Vec::with_capacity(plan.tiles.len() + 1);
    let mut len = 0;
    for (i, tile) in plan.tiles.iter().enumerate() {
        at.push(len);
        for g in 0..tile.segments() {
            items.push((i, g, len));
            len += plan.rows(tile) * part_w;
        }
    }
    at.push(len);
    let mut parts = vec![0f32; len];
    let pdst = SyncPtr(parts.as_mut_ptr());
    pool::for_each_range(items.len(), |range| {
        SCRATCH.with_borrow_mut(|sc| {
            for &(i, g, off) in &items[range] {
                let tile = &plan.tiles[i];
                let n = plan.rows(tile) * part_w;
                // SAFETY: item (i, g) alone writes `parts[off..off + n]`.
                let part = unsafe { std::slice::from_raw_parts_mut(pdst.get().add(off), n) };
                run_segment(simd, &it, tile, g, part, sc, None);
            }
        })
    });
    pool::for_each_range(plan.tiles.len(), |range| {
        SCRATCH.with_borrow_mut(|sc| {
            for i in range {
                let tile = &plan.tiles[i];
                let rows = plan.rows(tile);
                empty_rows(&mut sc.state, rows, part_w);
                for part in parts[at[i]..at[i + 1]].chunks(rows * part_w) {
                    for (st, p) in sc.state.chunks_mut(part_w).zip(part.chunks(part_w)) {
                        fold(st, p);
                    }
                }
                // SAFETY: each tile alone writes its rows of `out`.
                unsafe { it.write_rows(tile, &sc.state, dst) };
            }
        })
    });
    out
}

/// One segment of one tile with the `simd` lanes; folded into `state` when given.
fn run_segment<S: Store>(
    simd: Simd,
    it: &Item<S>,
    tile: &Tile,
    g: usize,
    part: &mut [f32],
    sc: &mut Scratch,
    state: Option<&mut [f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the CPU has the features (`Simd::detect`).
        Simd::Avx512 => unsafe { x86::segment_avx512(it, tile, g, part, sc, state) },
        Simd::Avx2 => unsafe { x86::segment_avx2(it, tile, g, part, sc, state) },
        Simd::None => it.segment::<Portable>(tile, g, part, sc, state),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = simd;
        it.segment::<Portable>(tile, g, part, sc, state);
    }
}

/// `rows` running rows of width `w` that have seen no key yet (max `-inf`).
fn empty_rows(state: &mut Vec<f32>, rows: usize, w: usize) {
    state.clear();
    state.resize(rows * w, 0.0);
    state.chunks_mut(w).for_each(|s| s[0] = f32::NEG_INFINITY);
}

/// Fold a segment's partial row `p` (`[max, sum, values...]`; max `-inf`: it saw no key)
/// into the running row `st`: both rescaled to the larger maximum (flash attention).
#[inline(always)]
fn fold(st: &mut [f32], p: &[f32]) {
    let (mb, ma) = (p[0], st[0]);
    if mb == f32::NEG_INFINITY {
        return;
    }
    if ma == f32::NEG_INFINITY {
        st.copy_from_slice(p);
        return;
    }
    let m = ma.max(mb);
    let (a, b) = ((ma - m).exp(), (mb - m).exp());
    st[0] = m;
    for (x, &y) in st[1..].iter_mut().zip(&p[1..]) {
        *x = x.mul_add(a, y * b);
    }
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
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::None
    }
}

/// Per-thread buffers reused across work items.
#[derive(Default)]
struct Scratch {
    /// The tile's query rows, contiguous.
    q: Vec<f32>,
    /// `rows × SEGMENT` scores, then softmax numerators.
    scores: Vec<f32>,
    /// A transposed K block (dimension `i` of key `j` at `i * KEY_BLOCK + j`), then the
    /// tile's query rows in groups of 8, dimension-major (row `8g + r`, dimension `i` at
    /// `8g * hd + 8i + r`).
    kt: Vec<f32>,
    /// Where each key's K row starts in the layer's K storage.
    k_offs: Vec<usize>,
    /// Where each key's V row starts (in V storage, or in K storage for MLA).
    v_offs: Vec<usize>,
    /// Keys of the segment each row sees.
    vis: Vec<usize>,
    /// A segment's partial rows, and the running fold (`[max, sum, values...]` per row).
    part: Vec<f32>,
    state: Vec<f32>,
}

/// Everything a work item reads.
struct Item<'a, S> {
    q: &'a [f32],
    keys: S,
    /// V storage, or the K storage for MLA.
    values: S,
    batch: &'a ForwardBatch,
    d: AttnDims,
    chunk: usize,
}

impl<S: Store> Item<'_, S> {
    /// Segment `g` of `tile`: per row, `[max, sum, Σ numerator × value]` into `part`
    /// (max `-inf` for a row that sees none of its keys), then folded into `state` if given.
    #[inline(always)]
    fn segment<L: Lanes>(
        &self,
        tile: &Tile,
        g: usize,
        part: &mut [f32],
        sc: &mut Scratch,
        state: Option<&mut [f32]>,
    ) {
        let d = self.d;
        let (hd, vd) = (d.head_dim, d.v_head_dim);
        let group = d.num_heads / d.num_kv_heads;
        let (slot_w, v_slot_w) = (d.num_kv_heads * hd, d.num_kv_heads * vd);
        let bs = self.batch.block_size;
        let table = &self.batch.block_tables[tile.seq];
        let kvh = tile.h0 / group;
        let (kv_off, v_off) = (kvh * hd, kvh * vd);
        let rows = tile.tokens * self.chunk;
        let k0 = g * SEGMENT;
        let k1 = (k0 + SEGMENT).min(tile.keys());
        let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
        sc.k_offs.clear();
        sc.k_offs
            .extend((k0..k1).map(|j| slot(j) * slot_w + kv_off));
        let v_offs = if d.values_in_keys {
            &sc.k_offs
        } else {
            sc.v_offs.clear();
            sc.v_offs
                .extend((k0..k1).map(|j| slot(j) * v_slot_w + v_off));
            &sc.v_offs
        };
        sc.vis.clear();
        sc.vis.extend((0..rows).map(|r| {
            let lim = tile.first_keys + r / self.chunk;
            lim.min(k1).saturating_sub(k0)
        }));
        sc.q.clear();
        for t in tile.t0..tile.t0 + tile.tokens {
            let at = (t * d.num_heads + tile.h0) * hd;
            sc.q.extend_from_slice(&self.q[at..at + self.chunk * hd]);
        }
        sc.scores.resize(rows * SEGMENT, 0.0);
        sc.kt.resize(
            hd.next_multiple_of(KEY_BLOCK) * KEY_BLOCK + rows.next_multiple_of(8) * hd,
            0.0,
        );
        L::scores(
            &sc.q,
            hd,
            self.keys,
            &sc.k_offs,
            d.scale,
            &mut sc.scores,
            &mut sc.kt,
        );
        let w = vd + 2;
        for (r, p) in part.chunks_mut(w).enumerate().take(rows) {
            let n = sc.vis[r];
            if n == 0 {
                p[0] = f32::NEG_INFINITY;
                continue;
            }
            let (m, l) = L::softmax(&mut sc.scores[r * SEGMENT..r * SEGMENT + n]);
            p[0] = m;
            p[1] = l;
        }
        L::weighted_values(part, w, vd, &sc.scores, self.values, v_offs, &sc.vis);
        if let Some(state) = state {
            for (st, p) in state.chunks_mut(w).zip(part.chunks(w)) {
                fold(st, p);
            }
        }
    }

    /// Divide each folded row of `tile` by its sum into the output.
    /// SAFETY: `dst` is the output buffer; no other item writes these rows.
    unsafe fn write_rows(&self, tile: &Tile, state: &[f32], dst: SyncPtr<f32>) {
        let d = self.d;
        let vd = d.v_head_dim;
        for (r, st) in state.chunks(vd + 2).enumerate() {
            let (t, h) = (tile.t0 + r / self.chunk, tile.h0 + r % self.chunk);
            let o = std::slice::from_raw_parts_mut(dst.get().add((t * d.num_heads + h) * vd), vd);
            let inv = 1.0 / st[1];
            for (o, &x) in o.iter_mut().zip(&st[2..]) {
                *o = x * inv;
            }
        }
    }
}

/// `exp(x)` for `x <= 0` (scores minus their maximum): Cephes' polynomial on the reduced
/// argument, scaled by `2^n`; within 2 ulp of `f32::exp`, `exp(-87)` below -87. The vector
/// lanes compute exactly these operations, so every path has the same numerators.
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(EXP_LN2_HI, x);
    let r = (-n).mul_add(EXP_LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// ln 2 split in two for the argument reduction.
const EXP_LN2_HI: f32 = 0.693_359_4;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial's coefficients, highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The sum of 16 lanes in the kernels' fixed tree: lane `i` plus lane `i + 8`, then `+ 4`,
/// `+ 2`, `+ 1` (what the vector lanes' halving reductions do).
#[inline(always)]
fn lane_tree(mut l: [f32; 16]) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            l[i] += l[i + w];
        }
    }
    l[0]
}

/// The vector operations of a segment; one implementation is chosen per machine, and all
/// give the same bits. `q` holds the tile's rows of `hd`; key and value `j` start at
/// `keys[k_offs[j]]` and `values[v_offs[j]]` (`j < SEGMENT`).
trait Lanes {
    /// `scores[r * SEGMENT + j] = scale * Σ_i q_r[i] key_j[i]`, an FMA chain over `i` in order
    /// (entries up to the next multiple of 16 keys may be written too). `kt`: room for a
    /// transposed K block (`hd` rounded up to 16, × 16) and the rows of `q` transposed in
    /// groups of 8 (rounded up to 8, × `hd`).
    fn scores<S: Store>(
        q: &[f32],
        hd: usize,
        keys: S,
        k_offs: &[usize],
        scale: f32,
        scores: &mut [f32],
        kt: &mut [f32],
    );

    /// `row[j] = exp_poly(row[j] - m)` for the maximum `m` of `row`; returns `m` and the sum
    /// of the numerators (in 16 lanes, then [`lane_tree`]).
    fn softmax(row: &mut [f32]) -> (f32, f32);

    /// For each row `r` with `vis[r] > 0`: `o[r * os + 2 + i] = Σ_{j < vis[r]} p[r * SEGMENT
    /// + j] * value_j[i]`, an FMA chain over `j` in order.
    fn weighted_values<S: Store>(
        o: &mut [f32],
        os: usize,
        vd: usize,
        p: &[f32],
        values: S,
        v_offs: &[usize],
        vis: &[usize],
    );
}

/// Plain loops, the reference of the arithmetic above.
struct Portable;

impl Lanes for Portable {
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
        for (j, &off) in k_offs.iter().enumerate() {
            let krow = keys.row(off, hd, kt);
            for (r, qrow) in q.chunks_exact(hd).enumerate() {
                let mut s = 0f32;
                for (a, b) in qrow.iter().zip(krow) {
                    s = a.mul_add(*b, s);
                }
                scores[r * SEGMENT + j] = s * scale;
            }
        }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) -> (f32, f32) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; 16];
        for (j, x) in row.iter_mut().enumerate() {
            *x = exp_poly(*x - m);
            lanes[j % 16] += *x;
        }
        (m, lane_tree(lanes))
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
        let mut buf = vec![0f32; vd];
        for (r, &n) in vis.iter().enumerate() {
            if n > 0 {
                o[r * os + 2..r * os + 2 + vd].fill(0.0);
            }
        }
        for (j, &off) in v_offs.iter().enumerate() {
            let vrow = values.row(off, vd, &mut buf);
            for (r, &n) in vis.iter().enumerate() {
                if j < n {
                    let e = p[r * SEGMENT + j];
                    for (a, &x) in o[r * os + 2..r * os + 2 + vd].iter_mut().zip(vrow) {
                        *a = e.mul_add(x, *a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::kv_cache::{quantize_q8, CacheSpec, KvCache, KV_Q8_0, Q8_GROUP};
    use half::f16;

    /// Naive causal attention of the last `n` of a sequence's tokens over contiguous K/V (values
    /// the first `v_head_dim` of each K row for MLA), for comparison.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, d: AttnDims, first: usize) -> Vec<f32> {
        let (hd, vd) = (d.head_dim, d.v_head_dim);
        let group = d.num_heads / d.num_kv_heads;
        let mut out = vec![0f32; n * d.num_heads * vd];
        for t in 0..n {
            for h in 0..d.num_heads {
                let qr = &q[(t * d.num_heads + h) * hd..][..hd];
                let kvh = h / group;
                let keys = first + t + 1;
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let kr = &k[(j * d.num_kv_heads + kvh) * hd..][..hd];
                        let dot: f64 = qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * d.scale as f64
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vr = if d.values_in_keys {
                        &k[(j * d.num_kv_heads + kvh) * hd..][..vd]
                    } else {
                        &v[(j * d.num_kv_heads + kvh) * vd..][..vd]
                    };
                    for i in 0..vd {
                        out[(t * d.num_heads + h) * vd + i] += (w / z * vr[i] as f64) as f32;
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

    /// What the cache returns for `x` stored as `dtype`.
    fn stored(dtype: candle_core::DType, x: &[f32]) -> Vec<f32> {
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
    }

    /// Sequences as (context after the step, new tokens): a prefill chunk whose tokens
    /// straddle a segment boundary, a decode past two segments, a short decode.
    const SEQS: [(usize, usize); 3] = [(530, 40), (300, 1), (9, 1)];

    /// The cache and batch of [`SEQS`] in scattered blocks of 16, with the queries and
    /// each sequence's contiguous (stored-precision) K and V (values seeded by the context
    /// length, so a sequence is the same in any batch).
    struct Case {
        cache: KvCache,
        batch: ForwardBatch,
        q: Vec<f32>,
        kv: Vec<(Vec<f32>, Vec<f32>)>,
    }

    fn case(dtype: candle_core::DType, d: AttnDims, seqs: &[(usize, usize)]) -> Case {
        let bs = 16;
        let blocks: usize = seqs.iter().map(|s| s.0.div_ceil(bs)).sum();
        let spec = CacheSpec {
            num_layers: 1,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            dtype,
            values_in_keys: d.values_in_keys.then_some(d.v_head_dim),
        };
        let mut cache = KvCache::new(spec, blocks, bs);
        // block ids handed out in a scattered order
        let mut free: Vec<u32> = (0..blocks as u32)
            .map(|b| (b * 7) % blocks as u32)
            .collect();
        let mut batch = ForwardBatch::new(bs);
        let (kw, vw) = (d.num_kv_heads * d.head_dim, d.num_kv_heads * d.v_head_dim);
        let mut kv = Vec::new();
        let mut q = Vec::new();
        for &(n_ctx, new) in seqs {
            let table: Vec<u32> = free.drain(..n_ctx.div_ceil(bs)).collect();
            let k = pseudo(n_ctx * kw, 10 + n_ctx as u32);
            let v = pseudo(n_ctx * vw, 20 + n_ctx as u32);
            let slots: Vec<usize> = (0..n_ctx)
                .map(|p| table[p / bs] as usize * bs + p % bs)
                .collect();
            cache.write(0, &k, &v, &slots);
            let ids = vec![0u32; new];
            batch.push_sequence(&ids, n_ctx - new, &table);
            q.extend(pseudo(new * d.num_heads * d.head_dim, 30 + n_ctx as u32));
            kv.push((stored(dtype, &k), stored(dtype, &v)));
        }
        batch.validate(cache.num_slots()).unwrap();
        Case {
            cache,
            batch,
            q,
            kv,
        }
    }

    /// Every lane set this machine runs, the portable one first.
    fn lane_sets() -> Vec<Simd> {
        let mut sets = vec![Simd::None];
        #[cfg(target_arch = "x86_64")]
        {
            if Simd::detect() != Simd::None {
                sets.push(Simd::Avx2);
            }
            if Simd::detect() == Simd::Avx512 {
                sets.push(Simd::Avx512);
            }
        }
        sets
    }

    /// Against the f64 reference on the stored values, and the same bits from every lane set
    /// and every cut of the work: tiles of 1 or 3 tokens and 1, 2 or all heads, whole or
    /// split into segments, and each sequence alone.
    fn check(dtype: candle_core::DType, d: AttnDims) {
        let c = case(dtype, d, &SEQS);
        let layer = c.cache.host_layer(0).unwrap();
        let got = paged_attention(&c.q, layer, &c.batch, d);
        let (qw, ow) = (d.num_heads * d.head_dim, d.num_heads * d.v_head_dim);
        let mut t = 0;
        for (s, &(n_ctx, new)) in SEQS.iter().enumerate() {
            let (k, v) = &c.kv[s];
            let want = reference(&c.q[t * qw..(t + new) * qw], k, v, new, d, n_ctx - new);
            for (a, b) in got[t * ow..(t + new) * ow].iter().zip(&want) {
                assert!((a - b).abs() < 2e-5, "sequence {s}: {a} vs {b}");
            }
            t += new;
        }
        let group = d.num_heads / d.num_kv_heads;
        for simd in lane_sets() {
            for chunk in [1, 2, group] {
                for tokens in [1, 3] {
                    for split in [false, true] {
                        if !group.is_multiple_of(chunk) {
                            continue;
                        }
                        let plan = Plan::build(&c.batch, d, chunk, tokens, split);
                        let other = attend(&c.q, layer, &c.batch, d, &plan, simd);
                        assert!(
                            other == got,
                            "{simd:?}, {chunk} heads × {tokens} tokens, split {split}"
                        );
                    }
                }
            }
        }
        // The short decode alone: its bits do not depend on the rest of the batch.
        let alone = case(dtype, d, &SEQS[2..]);
        let a = paged_attention(
            &alone.q,
            alone.cache.host_layer(0).unwrap(),
            &alone.batch,
            d,
        );
        assert_eq!(a[..], got[got.len() - ow..]);
    }

    fn gqa(hd: usize) -> AttnDims {
        AttnDims {
            scale: 0.35,
            ..AttnDims::mha(4, 2, hd)
        }
    }

    #[test]
    fn f32_cache_matches_the_reference_with_scattered_blocks_and_gqa() {
        check(candle_core::DType::F32, gqa(8));
        // A head of 28: a partial last vector in every lane set.
        check(candle_core::DType::F32, gqa(28));
        check(candle_core::DType::F32, gqa(64));
    }

    /// The f16 cache against the reference on the f16-rounded K/V: the kernels add no error
    /// of their own beyond the storage's rounding.
    #[test]
    fn f16_cache_matches_the_reference_on_rounded_values() {
        check(candle_core::DType::F16, gqa(64));
        // Qwen2.5-0.5B's shape: 7 query heads per KV head.
        check(
            candle_core::DType::F16,
            AttnDims {
                scale: 0.3,
                ..AttnDims::mha(14, 2, 64)
            },
        );
    }

    /// The Q8_0 cache likewise, on the quantized values (heads of 32 and 64: one and two
    /// groups of 32 per row).
    #[test]
    fn q8_0_cache_matches_the_reference_on_quantized_values() {
        check(KV_Q8_0, gqa(32));
        check(KV_Q8_0, gqa(64));
    }

    /// MLA: one KV head whose rows hold the values in their first dimensions.
    #[test]
    fn values_read_from_the_keys_for_mla() {
        let d = AttnDims {
            num_heads: 8,
            num_kv_heads: 1,
            head_dim: 48,
            v_head_dim: 32,
            values_in_keys: true,
            scale: 0.2,
        };
        check(candle_core::DType::F32, d);
        check(candle_core::DType::F16, d);
    }

    /// One long decode is split over the threads; a big prefill is not.
    #[test]
    fn plans_split_a_lone_long_decode_and_keep_prefill_tiles_whole() {
        let d = AttnDims::mha(14, 2, 64);
        let mut decode = ForwardBatch::new(16);
        decode.push_sequence(&[0], 4095, &vec![0; 256]);
        let p = Plan::new(&decode, d, 2);
        assert!(p.split);
        assert_eq!((p.chunk, p.tiles.len()), (7, 2));
        let mut prefill = ForwardBatch::new(16);
        prefill.push_sequence(&[0; 512], 3584, &vec![0; 256]);
        let p = Plan::new(&prefill, d, 2);
        assert!(!p.split);
        // 4 tokens × 7 heads per tile
        assert_eq!((p.chunk, p.tiles.len()), (7, 128 * 2));
        assert_eq!(p.tiles[2].t0, 4);
        assert_eq!(p.tiles[2].first_keys, 3589);
        // a short decode: one head per tile, split (one segment each)
        let mut short = ForwardBatch::new(16);
        short.push_sequence(&[0], 20, &[0, 1]);
        let p = Plan::new(&short, d, 2);
        assert_eq!((p.chunk, p.tiles.len(), p.split), (1, 14, true));
    }

    #[test]
    fn exp_polynomial_is_within_two_ulp() {
        for i in 0..16 * 700 {
            let x = -(i as f32) * 0.0125;
            let (g, want) = (exp_poly(x), x.exp());
            let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || (want < 1e-37 && g < 1e-37),
                "exp({x}) = {g}, want {want}"
            );
        }
        assert_eq!(exp_poly(0.0), 1.0);
    }

    /// The vector exps are the scalar polynomial, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exps_equal_the_scalar_polynomial() {
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..16 * 800)
            .map(|i| -(i as f32) * 0.0113 - (i % 7) as f32 * 1e-3)
            .chain(
                [
                    0.0,
                    -87.0,
                    -87.5,
                    -90.0,
                    -1e-30,
                    -1e-3,
                    -0.5,
                    f32::NEG_INFINITY,
                ]
                .repeat(2),
            )
            .collect();
        let want: Vec<f32> = xs.iter().map(|&x| exp_poly(x)).collect();
        fn agree<const N: usize>(xs: &[f32], want: &[f32], f: impl Fn(&[f32]) -> [f32; N]) {
            for (block, w) in xs.chunks_exact(N).zip(want.chunks_exact(N)) {
                assert_eq!(f(block)[..], w[..], "{block:?}");
            }
        }
        if Simd::detect() != Simd::None {
            // SAFETY: AVX2 and FMA detected.
            agree::<8>(&xs, &want, |b| unsafe {
                let mut got = [0f32; 8];
                _mm256_storeu_ps(got.as_mut_ptr(), x86::exp_avx2(_mm256_loadu_ps(b.as_ptr())));
                got
            });
        }
        if Simd::detect() == Simd::Avx512 {
            // SAFETY: AVX-512F and FMA detected.
            agree::<16>(&xs, &want, |b| unsafe {
                let mut got = [0f32; 16];
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    x86::exp_avx512(_mm512_loadu_ps(b.as_ptr())),
                );
                got
            });
        }
    }
}
