//! How the attention kernels read K/V storage: f32 and f16 slices and Q8_0 rows, as f32 rows
//! (portable), 8 lanes (AVX2 + F16C) or 16 (AVX-512), with prefetch hints.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::models::kv_cache::{KvElem, Q8_GROUP};

/// K or V storage as the kernels read it, indexed by value (a row of one KV head starts at
/// `slot * slot_width + head * head_dim`): f32 or f16 slices, or Q8_0 rows.
pub(super) trait Store: Copy + Send + Sync {
    /// Values `off..off + len` as f32: in place, or converted into `buf`.
    fn row<'a>(self, off: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32]
    where
        Self: 'a;

    /// Values `index..index + 16` (lanes `mask`), widened to f32.
    /// SAFETY: AVX-512 F/BW/VL; the masked values exist; for Q8_0, the 16 lanes lie in one
    /// group of 32 (`index` a multiple of 16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(self, index: usize, mask: u16) -> std::arch::x86_64::__m512;

    /// Values `index..index + len` (`len <= 8`) widened to f32, zeros past `len`.
    /// SAFETY: AVX2, FMA and F16C; the values exist; for Q8_0, the 8 lanes lie in one group
    /// of 32 (`index` a multiple of 8).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(self, index: usize, len: usize) -> std::arch::x86_64::__m256;

    /// Prefetch values `index..index + len` into L1.
    /// SAFETY: the values exist.
    #[cfg(target_arch = "x86_64")]
    unsafe fn prefetch(self, index: usize, len: usize);
}

/// Lanes `0..len` of 8 values read one at a time (a row's last, partial block).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load8_tail<S: Store>(s: S, index: usize, len: usize) -> std::arch::x86_64::__m256 {
    let mut buf = [0f32; 8];
    let mut tmp = [0f32; 8];
    buf[..len].copy_from_slice(s.row(index, len, &mut tmp));
    std::arch::x86_64::_mm256_loadu_ps(buf.as_ptr())
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
    unsafe fn load8(self, index: usize, len: usize) -> std::arch::x86_64::__m256 {
        if len < 8 {
            return load8_tail(self, index, len);
        }
        E::load8(self.as_ptr().add(index))
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
pub(super) struct Q8Rows<'a> {
    pub(super) qs: &'a [i8],
    pub(super) scales: &'a [f16],
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
    unsafe fn load8(self, index: usize, len: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        if len < 8 {
            return load8_tail(self, index, len);
        }
        let q = _mm_loadl_epi64(self.qs.as_ptr().add(index) as *const __m128i);
        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        let d = self.scales.get_unchecked(index / Q8_GROUP).to_f32();
        _mm256_mul_ps(f, _mm256_set1_ps(d))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(self, index: usize, len: usize) {
        x86::prefetch_bytes(self.qs.as_ptr().add(index) as *const u8, len);
    }
}

/// A host K/V element as the kernels read it.
pub(super) trait Elem: KvElem {
    /// `row` as f32: itself, or converted into `buf`.
    fn row<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// Up to 16 lanes (`mask`) from `p`, widened to f32.
    /// SAFETY: AVX-512 F/BW/VL; the masked lanes readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;

    /// 8 values from `p`, widened to f32.
    /// SAFETY: AVX2 and F16C; 8 values readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
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

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
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

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}
