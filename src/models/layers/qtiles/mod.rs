//! inferd's own CPU matmul for GGUF weights in 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! and the 32-value blocks of Q2_K, Q3_K, Q4_K, Q5_K and Q6_K):
//! the weights repacked at load into tiles of 16 output rows, multiplied with AVX-512 VNNI
//! (`x86`), or AVX2 with or without AVX-VNNI (`avx2`), as [`KernelPath::active`] says.
//!
//! Why not candle's kernels: its Q4_1/Q5_0 dot products are scalar loops, and its SIMD Q8_0
//! kernel wants rows of a multiple of 256 (SmolLM2's 576 and Qwen2.5's 896 pad to 768 and
//! 1024). Here 4-bit weights stay 4-bit (Q4_1 reads 5 bits per weight, not Q8_0's 8.5 padded
//! by a third; Q5_0 reads 6 bits, not 8.5), and any row length that is a multiple of 32 runs
//! without padding.
//!
//! Layout: for each tile of 16 rows and each 32-column block, one record on a 64-byte line
//! boundary: the 16 rows' scales (and for 4-bit, minimums), then the weights grouped by four
//! columns — `[group][row][4 bytes]` — so that one 64-byte load feeds one `vpdpbusd` computing
//! 4 columns of all 16 rows. Q2_K and Q3_K, whose scales are small integers per 16 columns
//! under one f16 `d` per 256, keep one record per 256 columns (eight blocks: see
//! [`TileFormat::Q3K`]) so that they stay near their GGUF size. Activations are quantized per
//! 32-block to 8 bits (scale `d`, integer sum, and `s = d × sum`), like llama.cpp's Q8_1.
//!
//! Each output is `Σ_blocks fma(isum, d_w·d_x, acc)` (then `+ m_w·s_x` for 4-bit), blocks in
//! order, whatever the batch: a row's result does not depend on the rows beside it (batch
//! invariance), and the portable twin (`matmul_with` on [`KernelPath::Portable`]) gives the same bits.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

use super::pool::{self, SyncPtr};
use super::simd::KernelPath;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod gguf;
#[cfg(target_arch = "x86_64")]
mod x86;

use gguf::{gguf_block, pack, GgufBlock};

/// Output rows per tile (one 512-bit register of f32).
pub const TILE: usize = 16;
/// Columns per block.
const QK: usize = 32;
/// Activation rows sharing one unpacked weight block, at most (see [`TileFormat::rows`]).
const ROWS: usize = 8;
/// Activation rows per work item when the batch is large (their quantized blocks stay in L2).
const ROW_BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileFormat {
    /// `w = d·q + m`, `q` in 0..16: per row f16 `d` and `m` (64 bytes), 256 bytes of nibbles.
    Q4_1,
    /// Q4_K's 32-value sub-blocks as Q4_1 with f32 `d = d·scale` and `m = -dmin·min` (exact
    /// products; 128 bytes), then 256 bytes of nibbles.
    Q4K,
    /// Q6_K's 32-value blocks: `w = d_half·(q - 32)`, `q` in 0..64, one f32 scale per 16
    /// columns (`d·scale`, exact; 128 bytes), the fifth and sixth bits as two bit planes (128
    /// bytes), 256 bytes of low nibbles — 8 bits a weight.
    Q6K,
    /// `w = d·(q - 16)`, `q` in 0..32: per row f16 `d` (64 bytes with padding), the fifth
    /// bits as a bit plane (64 bytes, see `gguf::pack_plane`), 256 bytes of low nibbles — 6
    /// bits a weight.
    Q5_0,
    /// `w = d·q + m`, `q` in 0..32 (Q5_1, and Q5_K's 32-value sub-blocks with `d = d·scale`,
    /// `m = -dmin·min`, exact): per row f32 `d` and `m` (128 bytes), then Q5_0's fifth-bit
    /// plane and nibbles — 7 bits a weight.
    Q5K,
    /// `w = d·q`, `q` in -128..128 stored as `q + 128`: per row f32 `d` (64 bytes), 512 bytes.
    Q8_0,
    /// Q3_K: `w = d·sc·(q - 4)`, `q` in 0..8, `sc` a signed 6-bit integer per 16 columns, `d`
    /// f16 per row and 256 columns. One record per 256 columns: the rows' f16 `d` (64 bytes
    /// with padding), each block's scales as bytes (`[block][row][half]`, 8 × 32 bytes), each
    /// block's third bits as a bit plane (8 × 64), each block's low two bits (8 × 128: see
    /// [`crumb`]) — 3.625 bits a weight. The sub-scales are applied as integers (`vpmaddwd`
    /// on 16-bit sums), so one float step per block, as for Q4_0.
    Q3K,
    /// Q2_K: `w = d·sc·q - dmin·m`, `q` in 0..4, `sc` and `m` 4-bit integers per 16 columns,
    /// `d`, `dmin` f16 per row and 256 columns. One record per 256 columns: f16 `d` and
    /// `-dmin` (64 bytes), each block's `sc | m << 4` bytes (8 × 32), each block's two-bit
    /// weights (8 × 128) — 2.625 bits a weight, as in the GGUF.
    Q2K,
}

impl TileFormat {
    /// Bytes of one tile's block record (a multiple of 64).
    const fn record(self) -> usize {
        match self {
            Self::Q4_1 => 64 + TILE * QK / 2,
            Self::Q4K => 128 + TILE * QK / 2,
            Self::Q6K => 256 + TILE * QK / 2,
            Self::Q5_0 => 128 + TILE * QK / 2,
            Self::Q5K => 192 + TILE * QK / 2,
            Self::Q8_0 => 64 + TILE * QK,
            Self::Q3K => low_bits::weights(Self::Q3K, 8),
            Self::Q2K => low_bits::weights(Self::Q2K, 8),
        }
    }

    /// Activation rows each unpacked block serves on `path`, at most: eight for the formats
    /// whose unpacking costs most (a bit plane or two-bit fields), four for plain nibbles, where
    /// eight rows' accumulators beside the weights outgrow AVX2's sixteen registers. (qmatmul
    /// bench at 16 rows, 8 against 4, Xeon `avx2`: Q3_K/Q2_K +25%, Q6_K +11%, Q5_0/Q5_1/Q5_K +5%,
    /// Q4_K -7%, Q4_0/Q4_1 -3%.) Q8_0's bytes need no unpacking, but without VNNI each weight
    /// vector's sign and magnitude are taken once per block for all its rows: eight there
    /// (AMD EPYC Zen 3, `avx2`, eight alternating runs: median 125 -> 144 GFLOP/s), four on
    /// the VNNI paths, where nothing is shared but the loads. AVX-512, with 32 registers and
    /// `vptestmb` for the bit planes, gains less: eight only for Q6_K, Q3_K and Q2_K (Xeon,
    /// qmatmul at 16 rows, 8 against 4 alternating: Q2_K +6% in 4 of 4 runs, Q6_K +3-9% in 8
    /// of 9, Q3_K +3% in 7 of 9), four for the rest (Q5_0/Q5_1/Q5_K -3% to +1%).
    const fn rows(self, path: KernelPath) -> usize {
        match self {
            Self::Q6K | Self::Q3K | Self::Q2K => ROWS,
            _ if matches!(path, KernelPath::Avx512) => 4,
            Self::Q4_1 | Self::Q4K => 4,
            Self::Q8_0 if !matches!(path, KernelPath::Avx2) => 4,
            _ => ROWS,
        }
    }

    /// Blocks of 32 columns per record.
    const fn blocks(self) -> usize {
        match self {
            Self::Q3K | Self::Q2K => 8,
            _ => 1,
        }
    }
}

/// Offsets in a Q3_K/Q2_K record (eight blocks; see [`TileFormat::Q3K`]).
pub(super) mod low_bits {
    use super::{TileFormat, QK, TILE};

    /// The rows' f16 `d`.
    pub const D: usize = 0;
    /// The rows' f16 `-dmin` (Q2_K).
    pub const NEG_DMIN: usize = 32;

    /// Block `j`'s scale bytes: `[row][half]`.
    pub const fn scales(j: usize) -> usize {
        64 + 2 * TILE * j
    }

    /// Block `j`'s third-bit plane (Q3_K).
    pub const fn plane(j: usize) -> usize {
        scales(8) + 64 * j
    }

    /// Block `j`'s two-bit weights: two 64-byte lines, columns 0..16 then 16..32.
    pub const fn weights(format: TileFormat, j: usize) -> usize {
        let first = match format {
            TileFormat::Q3K => plane(8),
            _ => scales(8),
        };
        first + TILE * QK / 4 * j
    }
}

/// One cache line; records are made of these so their loads are aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// An `[n, k]` weight matrix in tiles (`k` a multiple of 32; the last tile's missing rows are
/// zeros).
pub struct TiledMatrix {
    format: TileFormat,
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for TiledMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TiledMatrix({:?}, {}x{})", self.format, self.n, self.k)
    }
}

/// Whether quantized matmuls run on the tiles (on x86: AVX-512 VNNI, AVX-VNNI, AVX2, or the
/// portable twin when forced); elsewhere the loader keeps candle's kernels.
pub fn available() -> bool {
    KernelPath::active().tiles()
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

impl TiledMatrix {
    /// A 2-D CPU tensor of a supported type, repacked; `None` for other types and devices.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if !t.device().is_cpu() || !k.is_multiple_of(QK) {
            return Ok(None);
        }
        Ok(Self::from_gguf(t.dtype(), n, k, &t.data()?))
    }

    /// From the GGUF bytes of an `[n, k]` tensor of type `dtype`.
    pub fn from_gguf(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Option<Self> {
        let GgufBlock {
            values,
            bytes,
            format,
            decode,
        } = gguf_block(dtype)?;
        let nb = k / QK;
        if !k.is_multiple_of(values) || data.len() != n * (k / values) * bytes {
            return None;
        }
        let tiles = n.div_ceil(TILE);
        let (rec_lines, per) = (format.record() / 64, format.blocks());
        let mut lines = vec![Line([0; 64]); tiles * nb / per * rec_lines];
        lines
            .chunks_mut(nb / per * rec_lines)
            .enumerate()
            .for_each(|(t, tile)| {
                for r in 0..TILE.min(n - t * TILE) {
                    let row = t * TILE + r;
                    for b in 0..nb {
                        let value = row * k + b * QK;
                        let src = &data[value / values * bytes..][..bytes];
                        let first = b / per * rec_lines;
                        let rec = as_bytes_mut(&mut tile[first..first + rec_lines]);
                        pack(format, rec, r, b % per, decode(src, value % values / QK));
                    }
                }
            });
        Some(Self {
            format,
            n,
            k,
            lines,
        })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held (for the memory report).
    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Records per tile: one per `format.blocks()` blocks of the `k` columns.
    fn tile_records(&self) -> usize {
        self.k / QK / self.format.blocks()
    }

    /// The record holding block `block` of tile `tile` (for Q2_K/Q3_K, its 256 columns').
    fn record(&self, tile: usize, block: usize) -> &[u8] {
        let rec_lines = self.format.record() / 64;
        let first = (tile * self.tile_records() + block / self.format.blocks()) * rec_lines;
        as_bytes(&self.lines[first..first + rec_lines])
    }

    /// The first record of tile `t` (the kernels' base pointer); records follow at
    /// `format.record()` bytes, each holding `format.blocks()` blocks.
    fn tile_ptr(&self, t: usize) -> *const u8 {
        let bytes = self.tile_records() * self.format.record();
        // SAFETY: in bounds: `lines` holds every tile's records.
        unsafe { (self.lines.as_ptr() as *const u8).add(t * bytes) }
    }

    /// Row `row` of the weights, dequantized into `out` (`k` values): embedding lookups.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (t, r) = (row / TILE, row % TILE);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let rec = self.record(t, b);
            match self.format {
                TileFormat::Q4_1 | TileFormat::Q4K => {
                    let (d, m, base) = four_bit_row(self.format, rec, r);
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = (nibble(rec, base, r, c) as f32).mul_add(d, m);
                    }
                }
                TileFormat::Q5_0 => {
                    let d = f16_at(rec, 2 * r).to_f32();
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = (quint(rec, 64, r, c) as i32 - 16) as f32 * d;
                    }
                }
                TileFormat::Q5K => {
                    let (d, m) = (f32_at(rec, 4 * r), f32_at(rec, 64 + 4 * r));
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = (quint(rec, 128, r, c) as f32).mul_add(d, m);
                    }
                }
                TileFormat::Q6K => {
                    let (d_lo, d_hi) = (f32_at(rec, 4 * r), f32_at(rec, 64 + 4 * r));
                    for (c, v) in o.iter_mut().enumerate() {
                        let d = if c < 16 { d_lo } else { d_hi };
                        *v = (sext(rec, r, c) as i32 - 32) as f32 * d;
                    }
                }
                TileFormat::Q8_0 => {
                    let d = f32_at(rec, 4 * r);
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = byte8(rec, r, c) as f32 * d;
                    }
                }
                TileFormat::Q3K | TileFormat::Q2K => {
                    // as candle: (d·sc)·q, and for Q2_K minus dmin·m
                    let j = b % 8;
                    let (sc, m) = low_bit_scales(self.format, rec, j, r);
                    let d = f16_at(rec, low_bits::D + 2 * r).to_f32();
                    let nd = f16_at(rec, low_bits::NEG_DMIN + 2 * r).to_f32();
                    for (c, v) in o.iter_mut().enumerate() {
                        let dl = d * sc[c / 16] as f32;
                        *v = if self.format == TileFormat::Q3K {
                            dl * (low_bit(self.format, rec, j, r, c) as i32 - 4) as f32
                        } else {
                            dl * low_bit(self.format, rec, j, r, c) as f32 + nd * m[c / 16] as f32
                        };
                    }
                }
            }
        }
    }

    /// `x` `[m, k]` row-major → `[m, n]`, on candle's CPU thread pool, on the active path.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(KernelPath::active(), x, m)
    }

    /// [`Self::matmul`] on `path` (which this CPU must support).
    pub fn matmul_with(&self, path: KernelPath, x: &[f32], m: usize) -> Vec<f32> {
        assert!(path.supported(), "{path:?} on this CPU");
        let act = Activations::quantize(x, m, self.k, path);
        let mut out = vec![0f32; m * self.n];
        let tiles = self.n.div_ceil(TILE);
        let row_blocks = m.div_ceil(ROW_BLOCK);
        let items = tiles * row_blocks;
        let dst = SyncPtr(out.as_mut_ptr());
        pool::for_each_range(items, |range| {
            for item in range {
                let (rb, t) = (item / tiles, item % tiles);
                let rows = rb * ROW_BLOCK..m.min((rb + 1) * ROW_BLOCK);
                // SAFETY: `out` is `[m, n]`; item (rb, t) writes only rows `rows` × columns of
                // tile `t`, which no other item touches.
                unsafe { self.tile_rows(t, rows, &act, dst, path) };
            }
        });
        out
    }

    /// Outputs of tile `t` for activation rows `rows`, written into `dst` (`[m, n]`), on
    /// `path` (supported by this CPU).
    unsafe fn tile_rows(
        &self,
        t: usize,
        rows: std::ops::Range<usize>,
        act: &Activations,
        dst: SyncPtr<f32>,
        path: KernelPath,
    ) {
        let lanes = TILE.min(self.n - t * TILE);
        let mut acc = [[0f32; TILE]; ROWS];
        let most = self.format.rows(path);
        let mut i = rows.start;
        while i < rows.end {
            let r = if rows.end - i >= most {
                most
            } else {
                4.min(rows.end - i)
            };
            #[cfg(target_arch = "x86_64")]
            {
                macro_rules! rows {
                    ($($kernel:ident)::+) => {
                        match r {
                            8 => $($kernel)::+::<8>(self, t, i, act, &mut acc),
                            4 => $($kernel)::+::<4>(self, t, i, act, &mut acc),
                            3 => $($kernel)::+::<3>(self, t, i, act, &mut acc),
                            2 => $($kernel)::+::<2>(self, t, i, act, &mut acc),
                            _ => $($kernel)::+::<1>(self, t, i, act, &mut acc),
                        }
                    };
                }
                match path {
                    KernelPath::Avx512 => rows!(x86::tile),
                    KernelPath::AvxVnni => rows!(avx2::tile_vnni),
                    KernelPath::Avx2 => rows!(avx2::tile),
                    KernelPath::Portable => self.tile_portable(t, i, r, act, &mut acc),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = path;
                self.tile_portable(t, i, r, act, &mut acc);
            }
            for (j, a) in acc.iter().take(r).enumerate() {
                let out = dst.0.add((i + j) * self.n + t * TILE);
                std::ptr::copy_nonoverlapping(a.as_ptr(), out, lanes);
            }
            i += r;
        }
    }

    /// The arithmetic of the SIMD path, one lane at a time.
    fn tile_portable(
        &self,
        t: usize,
        first: usize,
        r: usize,
        act: &Activations,
        acc: &mut [[f32; TILE]; ROWS],
    ) {
        let nb = self.k / QK;
        for (j, a) in acc.iter_mut().take(r).enumerate() {
            let row = first + j;
            *a = [0.0; TILE];
            for b in 0..nb {
                let rec = self.record(t, b);
                let xq = &act.q[row * self.k + b * QK..][..QK];
                let (dx, sx) = (act.d[row * nb + b], act.s[row * nb + b]);
                for (lane, out) in a.iter_mut().enumerate() {
                    match self.format {
                        TileFormat::Q4_1 | TileFormat::Q4K => {
                            let (d, m, base) = four_bit_row(self.format, rec, lane);
                            let isum: i32 = (0..QK)
                                .map(|c| nibble(rec, base, lane, c) as i32 * xq[c] as i32)
                                .sum();
                            *out = (isum as f32).mul_add(d * dx, *out);
                            *out = m.mul_add(sx, *out);
                        }
                        TileFormat::Q5_0 => {
                            let isum: i32 = (0..QK)
                                .map(|c| (quint(rec, 64, lane, c) as i32 - 16) * xq[c] as i32)
                                .sum();
                            let d = f16_at(rec, 2 * lane).to_f32();
                            *out = (isum as f32).mul_add(d * dx, *out);
                        }
                        TileFormat::Q5K => {
                            let isum: i32 = (0..QK)
                                .map(|c| quint(rec, 128, lane, c) as i32 * xq[c] as i32)
                                .sum();
                            let (d, m) = (f32_at(rec, 4 * lane), f32_at(rec, 64 + 4 * lane));
                            *out = (isum as f32).mul_add(d * dx, *out);
                            *out = m.mul_add(sx, *out);
                        }
                        TileFormat::Q6K => {
                            let half = |cols: std::ops::Range<usize>| -> i32 {
                                cols.map(|c| (sext(rec, lane, c) as i32 - 32) * xq[c] as i32)
                                    .sum()
                            };
                            let d_lo = f32_at(rec, 4 * lane);
                            let d_hi = f32_at(rec, 64 + 4 * lane);
                            *out = (half(0..16) as f32).mul_add(d_lo * dx, *out);
                            *out = (half(16..32) as f32).mul_add(d_hi * dx, *out);
                        }
                        TileFormat::Q8_0 => {
                            let isum: i32 = (0..QK)
                                .map(|c| byte8(rec, lane, c) as i32 * xq[c] as i32)
                                .sum();
                            let d = f32_at(rec, 4 * lane);
                            *out = (isum as f32).mul_add(d * dx, *out);
                        }
                        TileFormat::Q3K | TileFormat::Q2K => {
                            // integer sub-scales on each half's integer sum; Q3_K's weights
                            // are stored + 4, Q2_K's minimum is `m·(sum of the half)`
                            let j = b % 8;
                            let (sc, m) = low_bit_scales(self.format, rec, j, lane);
                            let half = |h: usize| -> i32 {
                                (16 * h..16 * h + 16)
                                    .map(|c| {
                                        low_bit(self.format, rec, j, lane, c) as i32 * xq[c] as i32
                                    })
                                    .sum()
                            };
                            let sum_lo = act.sum_lo[row * nb + b];
                            let sums = [sum_lo, act.sum[row * nb + b] - sum_lo];
                            let isum = sc[0] * half(0) + sc[1] * half(1);
                            let d = f16_at(rec, low_bits::D + 2 * lane).to_f32();
                            if self.format == TileFormat::Q3K {
                                let bias = 4 * (sc[0] * sums[0] + sc[1] * sums[1]);
                                *out = ((isum - bias) as f32).mul_add(d * dx, *out);
                            } else {
                                let imin = m[0] * sums[0] + m[1] * sums[1];
                                let nd = f16_at(rec, low_bits::NEG_DMIN + 2 * lane).to_f32();
                                *out = (isum as f32).mul_add(d * dx, *out);
                                *out = (imin as f32).mul_add(nd * dx, *out);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Row `r`'s scale and minimum in a 4-bit record, and where its nibbles start.
fn four_bit_row(format: TileFormat, rec: &[u8], r: usize) -> (f32, f32, usize) {
    match format {
        TileFormat::Q4K => (f32_at(rec, 4 * r), f32_at(rec, 64 + 4 * r), 128),
        _ => (
            f16_at(rec, 2 * r).to_f32(),
            f16_at(rec, 32 + 2 * r).to_f32(),
            64,
        ),
    }
}

/// 4-bit weight (or low nibble) of tile row `r`, column `c` of a record whose nibbles start
/// at `base`.
fn nibble(rec: &[u8], base: usize, r: usize, c: usize) -> u8 {
    let (g, j, high) = ((c % 16) / 4, c % 4, c >= 16);
    let byte = rec[base + (g * TILE + r) * 4 + j];
    if high {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// 5-bit weight (0..32) of tile row `r`, column `c` of a record whose fifth bits are in the
/// bit plane at `plane` and nibbles follow it.
fn quint(rec: &[u8], plane: usize, r: usize, c: usize) -> u8 {
    nibble(rec, plane + 64, r, c) | (plane_bit(rec, plane, r, c) << 4)
}

/// 6-bit weight (0..64, stored +32) of tile row `r`, column `c` of a Q6_K record.
fn sext(rec: &[u8], r: usize, c: usize) -> u8 {
    nibble(rec, 256, r, c) | (plane_bit(rec, 128, r, c) << 4) | (plane_bit(rec, 192, r, c) << 5)
}

/// Tile row `r`, column `c`'s bit in the bit plane at `plane` (see `gguf::pack_plane`).
fn plane_bit(rec: &[u8], plane: usize, r: usize, c: usize) -> u8 {
    (rec[plane + 4 * r + c % 4] >> gguf::plane_shift(c)) & 1
}

/// Row `r`'s integer scales (and for Q2_K minimums) of columns 0..16 and 16..32 of block `j`
/// in a Q3_K/Q2_K record.
fn low_bit_scales(format: TileFormat, rec: &[u8], j: usize, r: usize) -> ([i32; 2], [i32; 2]) {
    let at = |h: usize| rec[low_bits::scales(j) + 2 * r + h];
    if format == TileFormat::Q3K {
        ([at(0) as i8 as i32, at(1) as i8 as i32], [0; 2])
    } else {
        (
            [(at(0) & 15) as i32, (at(1) & 15) as i32],
            [(at(0) >> 4) as i32, (at(1) >> 4) as i32],
        )
    }
}

/// The weight (Q3_K: stored + 4) of row `r`, column `c` of block `j` in a Q3_K/Q2_K record.
fn low_bit(format: TileFormat, rec: &[u8], j: usize, r: usize, c: usize) -> u8 {
    let two = crumb(rec, low_bits::weights(format, j), r, c);
    if format == TileFormat::Q3K {
        two | (plane_bit(rec, low_bits::plane(j), r, c) << 2)
    } else {
        two
    }
}

/// The two low bits of row `r`, column `c` in the two lines at `at`: line `c / 16`, byte
/// `4r + c % 4`, bits `2g` and `2g + 1` for the column's group `g = (c % 16) / 4` — so that
/// shifting the line by `2g` and masking gives group g's weights for all 16 rows.
fn crumb(rec: &[u8], at: usize, r: usize, c: usize) -> u8 {
    let (byte, shift) = crumb_pos(at, r, c);
    (rec[byte] >> shift) & 3
}

/// Where [`crumb`] keeps row `r`, column `c`: its byte in the record and its bit shift.
fn crumb_pos(at: usize, r: usize, c: usize) -> (usize, u32) {
    (
        at + 64 * (c / 16) + 4 * r + c % 4,
        2 * ((c % 16) / 4) as u32,
    )
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// 8-bit weight of tile row `r`, column `c` of a record.
fn byte8(rec: &[u8], r: usize, c: usize) -> i8 {
    (rec[64 + ((c / 4) * TILE + r) * 4 + c % 4] ^ 0x80) as i8
}

fn as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u8, lines.len() * 64) }
}

fn as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

/// Activation rows quantized per 32-block: `q` `[m, k]`, and per block the scale `d`, the
/// integer sum, and `s = d × sum`.
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
    /// The sum of each block's first 16 values (Q6_K scales its halves apart).
    sum_lo: Vec<i32>,
    s: Vec<f32>,
    /// The sums of each block's halves as two i16 (low, high) in one i32: the operand of the
    /// `vpmaddwd` that applies Q2_K's minimums and Q3_K's offset.
    pair: Vec<i32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize, path: KernelPath) -> Self {
        debug_assert_eq!(x.len(), m * k);
        let blocks = m * k / QK;
        let mut act = Self {
            q: vec![0; m * k],
            d: vec![0.0; blocks],
            sum: vec![0; blocks],
            sum_lo: vec![0; blocks],
            s: vec![0.0; blocks],
            pair: vec![0; blocks],
        };
        for (b, (xs, qs)) in x
            .chunks_exact(QK)
            .zip(act.q.chunks_exact_mut(QK))
            .enumerate()
        {
            let (d, sum, sum_lo) = quantize_block_on(path, xs, qs);
            act.d[b] = d;
            act.sum[b] = sum;
            act.sum_lo[b] = sum_lo;
            act.s[b] = d * sum as f32;
            // |sum of 16| <= 16·127: each fits in 16 bits
            act.pair[b] = (sum_lo as u16 as i32) | ((sum - sum_lo) << 16);
        }
        act
    }
}

/// [`quantize_block`] on `path` (supported by this CPU).
fn quantize_block_on(path: KernelPath, xs: &[f32], qs: &mut [i8]) -> (f32, i32, i32) {
    match path {
        // SAFETY: the path is supported, so are its features; both slices are one block long.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => unsafe { x86::quantize_block(xs, qs) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::AvxVnni | KernelPath::Avx2 => unsafe { avx2::quantize_block(xs, qs) },
        _ => quantize_block(xs, qs),
    }
}

/// One block of 32 activations to 8 bits: `q = round(x / d)` (ties to even), `d = max|x| /
/// 127`. Returns `d`, the sum of `q`, and the sum of its first 16.
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (mut sum, mut sum_lo) = (0i32, 0i32);
    for (i, (q, &v)) in qs.iter_mut().zip(xs).enumerate() {
        let r = (v * inv).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
        if i == 15 {
            sum_lo = sum;
        }
    }
    (d, sum, sum_lo)
}

/// `x W^T` as a candle op: `x` `[.., k]` f32, contiguous → `[.., n]`.
impl CustomOp1 for TiledMatrix {
    fn name(&self) -> &'static str {
        "tiled-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("tiled matmul takes f32 input")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("tiled matmul takes a contiguous input")
        };
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("tiled matmul: input {dims:?} against weights {:?}", self)
        }
        let m = (end - start) / self.k;
        let out = self.matmul(&data[start..end], m);
        if let Some(last) = dims.last_mut() {
            *last = self.n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Against the dequantized weights times the 8-bit activations in f64 (the activation
    /// quantization is the only approximation); a row alone gives the bits it gives in a batch;
    /// the SIMD path gives the portable path's bits; rows dequantize as candle does.
    fn check(dtype: GgmlDType, n: usize, k: usize, m: usize) {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo(n * k, 1), (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let deq = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let tiled = TiledMatrix::from_qtensor(&q).unwrap().unwrap();
        let x = pseudo(m * k, 7);
        let got = tiled.matmul_with(KernelPath::Portable, &x, m);
        let act = Activations::quantize(&x, m, k, KernelPath::Portable);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| {
                        let xv = act.q[i * k + c] as f64 * act.d[(i * k + c) / QK] as f64;
                        deq[j][c] as f64 * xv
                    })
                    .sum();
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{dtype:?} [{i},{j}] {g} vs {want}"
                );
            }
        }
        // Every path this CPU runs gives the portable bits, for the batch and for a row alone.
        let row = m / 2;
        for path in KernelPath::all_supported() {
            assert_eq!(tiled.matmul_with(path, &x, m), got, "{dtype:?} on {path:?}");
            assert_eq!(
                tiled.matmul_with(path, &x[row * k..(row + 1) * k], 1),
                got[row * n..(row + 1) * n],
                "{dtype:?} on {path:?}, one row"
            );
        }
        let mut r = vec![0f32; k];
        tiled.dequantize_row(n - 1, &mut r);
        assert_eq!(r, deq[n - 1]);
    }

    #[test]
    fn every_format_matches_the_dequantized_weights() {
        // n not a multiple of 16 (a partial last tile), k not a multiple of 256; batches that
        // cover whole groups of four rows, a remainder, and more than one row block.
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            check(dtype, 40, 96, 7);
        }
        check(GgmlDType::Q4_1, 33, 576, 37);
        check(GgmlDType::Q8_0, 16, 64, 1);
        check(GgmlDType::Q8_0, 33, 256, 37);
        check(GgmlDType::Q5_0, 33, 896, 5);
        check(GgmlDType::Q4K, 40, 512, 6);
        check(GgmlDType::Q6K, 40, 512, 6);
        check(GgmlDType::Q5_1, 40, 96, 7);
        check(GgmlDType::Q5_1, 33, 896, 5);
        check(GgmlDType::Q5K, 40, 512, 6);
        check(GgmlDType::Q5K, 17, 256, 37);
        check(GgmlDType::Q3K, 40, 512, 6);
        check(GgmlDType::Q3K, 17, 256, 37);
        check(GgmlDType::Q2K, 40, 512, 6);
        check(GgmlDType::Q2K, 17, 768, 37);
    }

    #[test]
    fn vector_quantization_is_the_portable_one() {
        let mut x: Vec<f32> = pseudo(32 * 50, 11).iter().map(|v| v * 3.0).collect();
        x[..32].fill(0.0); // an all-zero block
                           // a block with d = 1 and ties: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0
        x[32..64].fill(0.0);
        x[32..36].copy_from_slice(&[127.0, 2.5, -3.5, 0.5]);
        for xs in x.chunks_exact(QK) {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let want = quantize_block(xs, &mut a);
            if xs[0] == 127.0 {
                assert_eq!((want.0, &a[..4]), (1.0, &[127, 2, -4, 0][..]));
            }
            for path in KernelPath::all_supported() {
                let got = quantize_block_on(path, xs, &mut b);
                assert_eq!((got, b), (want, a), "{path:?}");
            }
        }
    }

    #[test]
    fn candle_op_keeps_leading_dims() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo(48 * 64, 3), (48, 64), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let tiled = TiledMatrix::from_qtensor(&q).unwrap().unwrap();
        let x = Tensor::from_vec(pseudo(6 * 64, 5), (2, 3, 64), &dev).unwrap();
        let y = x.apply_op1_no_bwd(&tiled).unwrap();
        assert_eq!(y.dims(), &[2, 3, 48]);
        let flat = tiled.matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 6);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);
        assert!(x
            .narrow(2, 0, 32)
            .unwrap()
            .apply_op1_no_bwd(&tiled)
            .is_err());
    }
}
