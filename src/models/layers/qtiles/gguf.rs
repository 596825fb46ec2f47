//! GGUF blocks into tile records: each supported type's decoder (one 32-value block at a
//! time) and the packing of one row of a record in its tile format.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{crumb_pos, f16_at, low_bits, TileFormat, QK, TILE};

/// A block of 32 weights decoded from its GGUF bytes: 4-bit (`w = d·q + m`), 5-bit
/// (`w = d·(q - 16)` or `d·q + m`), 6-bit or 8-bit (`w = d·q`).
pub(super) enum Decoded {
    Four {
        q: [u8; QK],
        d: f32,
        m: f32,
    },
    Five {
        q: [u8; QK],
        d: f16,
    },
    /// `w = d·q + m`, `q` in 0..32.
    FiveMin {
        q: [u8; QK],
        d: f32,
        m: f32,
    },
    /// `w = d_lo·(q - 32)` for columns 0..16, `d_hi·(q - 32)` for 16..32.
    Six {
        q: [u8; QK],
        d_lo: f32,
        d_hi: f32,
    },
    Eight {
        q: [i8; QK],
        d: f32,
    },
    /// Q3_K (`w = d·sc[h]·(q - 4)`, `q` in 0..8, `sc` signed) or Q2_K (`w = d·sc[h]·q -
    /// dmin·m[h]`, `q` in 0..4), `h` the half (columns 0..16, 16..32).
    Low {
        q: [u8; QK],
        d: f16,
        dmin: f16,
        sc: [i8; 2],
        m: [u8; 2],
    },
}

/// Decodes 32-value sub-block `sub` of one GGUF block.
pub(super) type Decoder = fn(&[u8], usize) -> Decoded;

/// A GGUF type the tiles take: values and bytes per GGUF block, the tile format, the decoder.
/// Q4_0 becomes Q4_1 with `m = -8d`, exactly.
pub(super) struct GgufBlock {
    pub values: usize,
    pub bytes: usize,
    pub format: TileFormat,
    pub decode: Decoder,
}

pub(super) fn gguf_block(dtype: GgmlDType) -> Option<GgufBlock> {
    fn q4_0(b: &[u8], _: usize) -> Decoded {
        let d = f16_at(b, 0);
        let mut q = [0u8; QK];
        for j in 0..16 {
            q[j] = b[2 + j] & 0x0f;
            q[j + 16] = b[2 + j] >> 4;
        }
        Decoded::Four {
            q,
            d: d.to_f32(),
            m: f16::from_f32(-8.0 * d.to_f32()).to_f32(),
        }
    }
    fn q4_1(b: &[u8], _: usize) -> Decoded {
        let mut q = [0u8; QK];
        for j in 0..16 {
            q[j] = b[4 + j] & 0x0f;
            q[j + 16] = b[4 + j] >> 4;
        }
        Decoded::Four {
            q,
            d: f16_at(b, 0).to_f32(),
            m: f16_at(b, 2).to_f32(),
        }
    }
    /// The 6-bit scale and minimum of sub-block `sub` in a K-quant's 12 scale bytes.
    fn k_scale_min(sc: &[u8], sub: usize) -> (u8, u8) {
        if sub < 4 {
            (sc[sub] & 63, sc[sub + 4] & 63)
        } else {
            (
                (sc[sub + 4] & 0x0f) | ((sc[sub - 4] >> 6) << 4),
                (sc[sub + 4] >> 4) | ((sc[sub] >> 6) << 4),
            )
        }
    }
    /// Sub-block `sub`'s low nibbles: 32-byte chunks whose low nibbles are sub-block 2c and
    /// high nibbles sub-block 2c + 1.
    fn k_nibbles(qs: &[u8], sub: usize) -> [u8; QK] {
        let chunk = &qs[32 * (sub / 2)..][..32];
        let mut q = [0u8; QK];
        for (v, &x) in q.iter_mut().zip(chunk) {
            *v = if sub.is_multiple_of(2) {
                x & 0x0f
            } else {
                x >> 4
            };
        }
        q
    }
    fn q4k(b: &[u8], sub: usize) -> Decoded {
        // d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        let (d, dmin) = (f16_at(b, 0).to_f32(), f16_at(b, 2).to_f32());
        let (scale, min) = k_scale_min(&b[4..16], sub);
        Decoded::Four {
            q: k_nibbles(&b[16..], sub),
            d: d * scale as f32,
            m: -(dmin * min as f32),
        }
    }
    fn q5k(b: &[u8], sub: usize) -> Decoded {
        // as Q4_K, with 32 bytes of fifth bits before the nibbles: bit `sub` of byte l
        let (d, dmin) = (f16_at(b, 0).to_f32(), f16_at(b, 2).to_f32());
        let (scale, min) = k_scale_min(&b[4..16], sub);
        let mut q = k_nibbles(&b[48..], sub);
        for (v, &h) in q.iter_mut().zip(&b[16..48]) {
            *v |= ((h >> sub) & 1) << 4;
        }
        Decoded::FiveMin {
            q,
            d: d * scale as f32,
            m: -(dmin * min as f32),
        }
    }
    fn q6k(b: &[u8], sub: usize) -> Decoded {
        // 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales, f16 d; each half
        // of 128 values: ql[l] / ql[l + 32] low then high nibbles, qh[l] bit pairs 0..4
        let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208).to_f32();
        let (half, quarter) = (sub / 4, sub % 4);
        let mut q = [0u8; QK];
        for (l, v) in q.iter_mut().enumerate() {
            let low = ql[64 * half + l + 32 * (quarter % 2)];
            let low = if quarter < 2 { low & 0x0f } else { low >> 4 };
            let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
            *v = low | (high << 4);
        }
        let scale = |i: usize| d * sc[8 * half + i + 2 * quarter] as i8 as f32;
        Decoded::Six {
            q,
            d_lo: scale(0),
            d_hi: scale(1),
        }
    }
    /// Q5_0/Q5_1's 32 values from `b`: 4 bytes of fifth bits (bit j for value j), then 16
    /// bytes whose low nibbles are values 0..16 and high nibbles 16..32.
    fn five_bits(b: &[u8]) -> [u8; QK] {
        let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut q = [0u8; QK];
        for j in 0..16 {
            q[j] = (b[4 + j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
            q[j + 16] = (b[4 + j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
        }
        q
    }
    fn q5_0(b: &[u8], _: usize) -> Decoded {
        Decoded::Five {
            q: five_bits(&b[2..]),
            d: f16_at(b, 0),
        }
    }
    fn q5_1(b: &[u8], _: usize) -> Decoded {
        Decoded::FiveMin {
            q: five_bits(&b[4..]),
            d: f16_at(b, 0).to_f32(),
            m: f16_at(b, 2).to_f32(),
        }
    }
    /// Sub-block `sub`'s two-bit values in a Q2_K/Q3_K block's 64 bytes: each 128 values take
    /// 32 bytes, value l of their 32-value sub-block j in bits 2j, 2j + 1 of byte l.
    fn crumbs(qs: &[u8], sub: usize) -> [u8; QK] {
        let mut q = [0u8; QK];
        for (v, &x) in q.iter_mut().zip(&qs[32 * (sub / 4)..][..32]) {
            *v = (x >> (2 * (sub % 4))) & 3;
        }
        q
    }
    fn q2k(b: &[u8], sub: usize) -> Decoded {
        // 16 bytes of `scale | min << 4` (one per 16 values), 64 of two-bit values, d, dmin
        let at = |h: usize| b[2 * sub + h];
        Decoded::Low {
            q: crumbs(&b[16..80], sub),
            d: f16_at(b, 80),
            dmin: f16_at(b, 82),
            sc: [(at(0) & 15) as i8, (at(1) & 15) as i8],
            m: [at(0) >> 4, at(1) >> 4],
        }
    }
    fn q3k(b: &[u8], sub: usize) -> Decoded {
        // 32 bytes of third bits (bit `sub` of byte l), 64 of two-bit values, 12 bytes of
        // sixteen 6-bit scales (+ 32), d: the weight is `q - 4` where the third bit is clear
        let (hmask, qs, sc) = (&b[..32], &b[32..96], &b[96..108]);
        let mut q = crumbs(qs, sub);
        for (v, &h) in q.iter_mut().zip(hmask) {
            *v |= ((h >> sub) & 1) << 2;
        }
        // scale i: low nibble from byte i (i < 8) or the high one of byte i - 8, top two bits
        // from byte 8 + i % 4 at bit 2·(i / 4)
        let scale = |i: usize| {
            let low = if i < 8 { sc[i] & 15 } else { sc[i - 8] >> 4 };
            let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
            (low | (high << 4)) as i8 - 32
        };
        Decoded::Low {
            q,
            d: f16_at(b, 108),
            dmin: f16::ZERO,
            sc: [scale(2 * sub), scale(2 * sub + 1)],
            m: [0; 2],
        }
    }
    fn q8_0(b: &[u8], _: usize) -> Decoded {
        let mut q = [0i8; QK];
        for (v, &x) in q.iter_mut().zip(&b[2..2 + QK]) {
            *v = x as i8;
        }
        Decoded::Eight {
            q,
            d: f16_at(b, 0).to_f32(),
        }
    }
    let (values, bytes, format, decode): (usize, usize, TileFormat, Decoder) = match dtype {
        GgmlDType::Q4_0 => (QK, 18, TileFormat::Q4_1, q4_0),
        GgmlDType::Q4_1 => (QK, 20, TileFormat::Q4_1, q4_1),
        GgmlDType::Q4K => (256, 144, TileFormat::Q4K, q4k),
        GgmlDType::Q5_0 => (QK, 22, TileFormat::Q5_0, q5_0),
        GgmlDType::Q5_1 => (QK, 24, TileFormat::Q5K, q5_1),
        GgmlDType::Q5K => (256, 176, TileFormat::Q5K, q5k),
        GgmlDType::Q6K => (256, 210, TileFormat::Q6K, q6k),
        GgmlDType::Q8_0 => (QK, 34, TileFormat::Q8_0, q8_0),
        GgmlDType::Q3K => (256, 110, TileFormat::Q3K, q3k),
        GgmlDType::Q2K => (256, 84, TileFormat::Q2K, q2k),
        _ => return None,
    };
    Some(GgufBlock {
        values,
        bytes,
        format,
        decode,
    })
}

/// Row `r` of a tile's record, block `j` of it (0 but for Q2_K/Q3_K): its scales, and its
/// weights in the format's layout.
pub(super) fn pack(format: TileFormat, rec: &mut [u8], r: usize, j: usize, decoded: Decoded) {
    match decoded {
        Decoded::Four { q, d, m } => {
            let nibbles = if format == TileFormat::Q4K {
                rec[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
                rec[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&m.to_le_bytes());
                128
            } else {
                // from f16 values: exact
                rec[2 * r..2 * r + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                rec[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&f16::from_f32(m).to_le_bytes());
                64
            };
            // group g, bytes j: columns 4g+j (low nibble) and 16+4g+j (high)
            for g in 0..4 {
                for j in 0..4 {
                    rec[nibbles + (g * TILE + r) * 4 + j] = q[4 * g + j] | (q[16 + 4 * g + j] << 4);
                }
            }
        }
        Decoded::Five { q, d } => {
            rec[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
            pack_five(rec, 64, r, &q);
        }
        Decoded::FiveMin { q, d, m } => {
            rec[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
            rec[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&m.to_le_bytes());
            pack_five(rec, 128, r, &q);
        }
        Decoded::Six { q, d_lo, d_hi } => {
            rec[4 * r..4 * r + 4].copy_from_slice(&d_lo.to_le_bytes());
            rec[64 + 4 * r..64 + 4 * r + 4].copy_from_slice(&d_hi.to_le_bytes());
            pack_nibbles(rec, 256, r, &q);
            pack_plane(rec, 128, r, &q, 4);
            pack_plane(rec, 192, r, &q, 5);
        }
        Decoded::Eight { q, d } => {
            rec[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
            for g in 0..8 {
                for j in 0..4 {
                    rec[64 + (g * TILE + r) * 4 + j] = (q[4 * g + j] as u8) ^ 0x80;
                }
            }
        }
        Decoded::Low { q, d, dmin, sc, m } => {
            // the super-block's d (and -dmin) are the same for each of its blocks
            rec[low_bits::D + 2 * r..][..2].copy_from_slice(&d.to_le_bytes());
            rec[low_bits::NEG_DMIN + 2 * r..][..2].copy_from_slice(&(-dmin).to_le_bytes());
            for h in 0..2 {
                rec[low_bits::scales(j) + 2 * r + h] = if format == TileFormat::Q3K {
                    sc[h] as u8
                } else {
                    sc[h] as u8 | (m[h] << 4)
                };
            }
            let at = low_bits::weights(format, j);
            for (c, v) in q.iter().enumerate() {
                let (byte, shift) = crumb_pos(at, r, c);
                rec[byte] |= (v & 3) << shift;
            }
            if format == TileFormat::Q3K {
                pack_plane(rec, low_bits::plane(j), r, &q, 2);
            }
        }
    }
}

/// Row `r`'s 5-bit weights: the fifth bits in the bit plane at `plane`, the low nibbles at
/// `plane + 64`.
fn pack_five(rec: &mut [u8], plane: usize, r: usize, q: &[u8; QK]) {
    pack_nibbles(rec, plane + 64, r, q);
    pack_plane(rec, plane, r, q, 4);
}

/// Row `r`'s low nibbles at `nibbles`: group g, bytes j hold columns 4g+j (low nibble) and
/// 16+4g+j (high).
fn pack_nibbles(rec: &mut [u8], nibbles: usize, r: usize, q: &[u8; QK]) {
    for g in 0..4 {
        for j in 0..4 {
            rec[nibbles + (g * TILE + r) * 4 + j] =
                (q[4 * g + j] & 0x0f) | ((q[16 + 4 * g + j] & 0x0f) << 4);
        }
    }
}

/// Bit `bit` of row `r`'s weights into the 64-byte bit plane at `plane`: byte `4r + j` (the
/// lane of row r, column 4g + j in every unpacked weight vector) holds in bit `s` the bit of
/// the column of vector `s` — `4s + j` for s < 4, `16 + 4(s - 4) + j` after — so one load of
/// the plane serves the block's eight weight vectors.
fn pack_plane(rec: &mut [u8], plane: usize, r: usize, q: &[u8; QK], bit: u32) {
    for (c, v) in q.iter().enumerate() {
        rec[plane + 4 * r + c % 4] |= ((v >> bit) & 1) << plane_shift(c);
    }
}

/// The bit of column `c` in its plane byte: the index of its unpacked weight vector.
pub(super) fn plane_shift(c: usize) -> usize {
    (c % 16) / 4 + 4 * (c / 16)
}
