//! AVX2 + FMA path of [`super::Stream::fill_normal`]: eight Philox4x32-10 calls side by side
//! and the table transform of [`super::normal`] on eight words at a time. Every value equals
//! the scalar path's bit for bit: Philox is integer arithmetic, the transform's integer steps are
//! the same operations lane by lane, and its one fused multiply-add rounds once like
//! `f32::mul_add`. It exists for speed alone: an analog forward draws one normal per output of
//! every MVM, and the scalar path (one Philox call per four words, a libm `fmaf` per word on
//! targets built without FMA) took a fifth of the CPU analog forward.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::normal::{NormalTable, SEGMENTS, SEGMENT_BITS};
use super::{Stream, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1};

/// Normals per vector step: 8 Philox calls × 4 words.
pub(super) const BLOCK: usize = 32;

/// Whether this CPU runs [`fill_calls`] (checked once per process by std's feature cache).
#[inline]
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Normals of Philox calls `first_call ..` into `out` (a multiple of [`BLOCK`] long): word `w`
/// of call `first_call + c` goes to `out[4c + w]`, as the scalar path orders them.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn fill_calls(
    stream: &Stream,
    first_call: u64,
    mvm_id: u32,
    attempt: u8,
    table: &NormalTable,
    out: &mut [f32],
) {
    debug_assert!(out.len().is_multiple_of(BLOCK));
    let word3_base = ((stream.purpose as u32) << 24) | (u32::from(attempt) << 16);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let tensor = _mm256_set1_epi32(stream.tensor_id as i32);
    let mvm = _mm256_set1_epi32(mvm_id as i32);
    let mut keys = [[0u32; 2]; 10];
    let mut k = stream.key;
    for (round, key) in keys.iter_mut().enumerate() {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        *key = k;
    }
    for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
        let call = first_call + (b * 8) as u64;
        // Counter words 0 and 3 per lane; word 3 holds bits 47..32 of the call index, which
        // change inside the group when it straddles a multiple of 2³².
        let (c0, c3) = if (call as u32).checked_add(7).is_some() {
            let hi = word3_base | ((call >> 32) as u32 & 0xFFFF);
            (
                _mm256_add_epi32(_mm256_set1_epi32(call as u32 as i32), lane),
                _mm256_set1_epi32(hi as i32),
            )
        } else {
            let mut lo = [0u32; 8];
            let mut hi = [0u32; 8];
            for l in 0..8 {
                let c = call + l as u64;
                lo[l] = c as u32;
                hi[l] = word3_base | ((c >> 32) as u32 & 0xFFFF);
            }
            (
                _mm256_loadu_si256(lo.as_ptr().cast()),
                _mm256_loadu_si256(hi.as_ptr().cast()),
            )
        };
        let [w0, w1, w2, w3] = philox8(c0, tensor, mvm, c3, &keys);
        // Transpose the 4 word vectors (lane = call) into call-major order.
        let t0 = _mm256_unpacklo_epi32(w0, w1);
        let t1 = _mm256_unpackhi_epi32(w0, w1);
        let t2 = _mm256_unpacklo_epi32(w2, w3);
        let t3 = _mm256_unpackhi_epi32(w2, w3);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let words = [
            _mm256_permute2x128_si256(u0, u1, 0x20),
            _mm256_permute2x128_si256(u2, u3, 0x20),
            _mm256_permute2x128_si256(u0, u1, 0x31),
            _mm256_permute2x128_si256(u2, u3, 0x31),
        ];
        for (q, w) in words.into_iter().enumerate() {
            let z = normal8(w, table);
            _mm256_storeu_ps(chunk.as_mut_ptr().add(8 * q), z);
        }
    }
}

/// Philox4x32-10 on 8 counters (lane l of each word vector is call l).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn philox8(
    mut c0: __m256i,
    mut c1: __m256i,
    mut c2: __m256i,
    mut c3: __m256i,
    keys: &[[u32; 2]; 10],
) -> [__m256i; 4] {
    let m0 = _mm256_set1_epi64x(i64::from(PHILOX_M0));
    let m1 = _mm256_set1_epi64x(i64::from(PHILOX_M1));
    for key in keys {
        // 32×32 → 64-bit products of the even lanes, then of the odd lanes moved down.
        let p0e = _mm256_mul_epu32(c0, m0);
        let p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        let p1e = _mm256_mul_epu32(c2, m1);
        let p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        let lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0b1010_1010);
        let hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0b1010_1010);
        let lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0b1010_1010);
        let hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0b1010_1010);
        let k0 = _mm256_set1_epi32(key[0] as i32);
        let k1 = _mm256_set1_epi32(key[1] as i32);
        let n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
        let n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
        (c0, c1, c2, c3) = (n0, lo1, n2, lo0);
    }
    [c0, c1, c2, c3]
}

/// [`NormalTable::normal`] on 8 words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normal8(word: __m256i, table: &NormalTable) -> __m256 {
    let m = _mm256_and_si256(word, _mm256_set1_epi32(0x7FFF_FFFF));
    // Position p of the leading one of m from the f32 exponent of m & !(m >> 1): that value
    // keeps the leading one and clears the bit below it, so rounding to 24 bits cannot carry
    // into the next power of two. m = 0 gives exponent field 0, hence e ≥ 30 below.
    let lead = _mm256_andnot_si256(_mm256_srli_epi32(m, 1), m);
    let biased = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(lead)), 23);
    // e = min(leading zeros of m − 1, 30) = min(30 − p, 30) = min(157 − biased, 30).
    let e = _mm256_min_epu32(
        _mm256_sub_epi32(_mm256_set1_epi32(157), biased),
        _mm256_set1_epi32(30),
    );
    let t = _mm256_sllv_epi32(m, _mm256_add_epi32(e, _mm256_set1_epi32(1)));
    let seg = _mm256_and_si256(
        _mm256_srli_epi32(t, 31 - SEGMENT_BITS as i32),
        _mm256_set1_epi32(SEGMENTS as i32 - 1),
    );
    let mant = _mm256_srli_epi32(
        _mm256_slli_epi32(t, SEGMENT_BITS as i32 + 1),
        32 - super::normal::FRAC_BITS as i32,
    );
    let frac = _mm256_sub_ps(
        _mm256_castsi256_ps(_mm256_or_si256(mant, _mm256_set1_epi32(0x3F80_0000))),
        _mm256_set1_ps(1.0),
    );
    let i = _mm256_add_epi32(_mm256_slli_epi32(e, SEGMENT_BITS as i32), seg);
    let a = _mm256_i32gather_ps::<4>(table.a.as_ptr(), i);
    let b = _mm256_i32gather_ps::<4>(table.b.as_ptr(), i);
    let z = _mm256_fmadd_ps(frac, b, a);
    let sign = _mm256_and_si256(word, _mm256_set1_epi32(i32::MIN));
    _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(z), sign))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{normal_from_word, philox4x32_10, Purpose};

    /// Every word class of the transform (each octave, both ends of every segment, m = 0 and 1,
    /// both signs) through the vector transform equals the scalar one.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_transform_equals_scalar_on_every_octave_and_segment() {
        if !available() {
            return;
        }
        let mut words = vec![
            0u32,
            1,
            2,
            3,
            0x7FFF_FFFF,
            0x8000_0000,
            0x8000_0001,
            u32::MAX,
        ];
        for p in 0..31u32 {
            for off in [0u32, 1, 2, 0x55] {
                let m = (1u32 << p) | (off & ((1u32 << p) - 1));
                let top = (1u32 << p) | ((1u32 << p) - 1);
                words.extend([m, top, m | 0x8000_0000, top | 0x8000_0000]);
            }
        }
        while !words.len().is_multiple_of(8) {
            words.push(12345);
        }
        let table = NormalTable::get();
        for w8 in words.chunks(8) {
            let mut got = [0.0f32; 8];
            unsafe {
                let v = _mm256_loadu_si256(w8.as_ptr().cast());
                _mm256_storeu_ps(got.as_mut_ptr(), normal8(v, table));
            }
            for (g, &w) in got.iter().zip(w8) {
                assert_eq!(g.to_bits(), normal_from_word(w).to_bits(), "word {w:#x}");
            }
        }
    }

    /// The 8-lane Philox equals the scalar one, also across a 2³² call boundary.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_philox_equals_scalar_across_the_high_call_word() {
        if !available() {
            return;
        }
        let s = Stream::new(0x0123_4567_89ab_cdef, Purpose::OutputNoise, 0xdead_beef);
        let table = NormalTable::get();
        for first in [
            0u64,
            5,
            (1u64 << 32) - 3,
            (7u64 << 32) - 8,
            (1u64 << 40) + 1,
        ] {
            let mut out = vec![0.0f32; 2 * BLOCK];
            unsafe { fill_calls(&s, first, 77, 3, table, &mut out) };
            for (c, w4) in out.chunks(4).enumerate() {
                let call = first + c as u64;
                let word3 = (Purpose::OutputNoise as u32) << 24 | 3 << 16 | (call >> 32) as u32;
                let r = philox4x32_10([call as u32, 0xdead_beef, 77, word3], s.key);
                for (g, &w) in w4.iter().zip(&r) {
                    assert_eq!(g.to_bits(), normal_from_word(w).to_bits(), "call {call}");
                }
            }
        }
    }
}
