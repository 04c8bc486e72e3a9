//! One standard normal per 32-bit random word: a piecewise-linear inverse CDF on dyadic
//! segments (docs/model.md §6; Sheridan-Methven & Giles, ACM TOMS 2023). Integer operations, one
//! table load and one fused multiply-add; no transcendental function, so the CUDA kernels
//! (`normal_from_word` in `kernels/philox.cuh`, the table from [`NormalTable::cuda_source`])
//! reproduce every normal bit for bit.
//!
//! # The transform
//!
//! ```text
//! sign = bit 31 of the word;  m = the low 31 bits;  u = (m + ½)·2⁻³¹ ∈ (0, 1)
//! e    = min(leading zeros of m in 31 bits, 30)       octave: u ∈ [2^−(e+1), 2^−e) (e < 30)
//! t    = m << (e + 1)                                  leading one moved to bit 31
//! seg  = bits 30..27 of t                              K = 4 bits: 16 segments per octave
//! frac = bits 26..4 of t, times 2⁻²³                   ∈ [0, 1), exact in f32
//! |z|  = fma(frac, b[e][seg], a[e][seg])               f32, one rounding
//! z    = |z| with the sign bit of the word
//! ```
//!
//! Octave 30 also takes m = 0 (u = 2⁻³²), which the leading-zero count puts in a 31st octave.
//! In octaves 26–30 a segment holds at most two words and `frac` is 0.
//!
//! # The table
//!
//! a[e][seg] + frac·b[e][seg] approximates |z| = Φ⁻¹(1 − u/2) on the segment's words: the
//! least-squares line through the exact values (computed in f64 by [`super::inverse_normal`]),
//! over the words themselves where a segment holds ≤ 4,096 of them, else over the segment as
//! a continuum. The lines' own E z² (≈ 1 − 1e-5: a least-squares fit loses a little variance)
//! is then folded in, every entry scaled by 1/√(E z²) so that the table's exact second moment
//! over all 2³² words is 1 to f32 rounding. Computed once per process: about 0.3 s in a
//! release build, most of it the f64 inverse CDF of every word of the segments fitted word by
//! word.
use std::sync::LazyLock;

use super::inverse_normal::upper_tail_inverse;

/// Segment bits K: 2^K segments per octave.
pub const SEGMENT_BITS: u32 = 4;
/// Segments per octave.
pub const SEGMENTS: usize = 1 << SEGMENT_BITS;
/// Octaves e = 0..=30 of the 31-bit magnitude word.
pub const OCTAVES: usize = 31;
/// Table entries (a, b): one per (octave, segment), index e·SEGMENTS + seg.
pub const TABLE_LEN: usize = OCTAVES * SEGMENTS;
/// Bits of `frac` (the bits of t below the segment bits, truncated to what f32 holds exactly).
pub const FRAC_BITS: u32 = 23;

/// Segments holding at most this many words are fitted over the words themselves.
const DISCRETE_FIT_MAX: u64 = 4096;
/// Simpson intervals of the continuous least-squares fit of larger segments.
const SIMPSON_INTERVALS: usize = 64;

/// The (a, b) table of the transform, f32 as the kernels use it.
#[derive(Clone, Debug)]
pub struct NormalTable {
    /// Value at the start of each segment (frac = 0).
    pub a: [f32; TABLE_LEN],
    /// Slope per unit of frac.
    pub b: [f32; TABLE_LEN],
}

static TABLE: LazyLock<NormalTable> = LazyLock::new(NormalTable::build);

/// The standard normal of one random word (module doc).
#[inline]
pub fn normal_from_word(word: u32) -> f32 {
    TABLE.normal(word)
}

/// The words of one segment, per sign: `words` consecutive magnitudes from `first_m`, in
/// groups of words/`levels` sharing one frac value, frac = group / levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentWords {
    /// First 31-bit magnitude m of the segment.
    pub first_m: u64,
    /// Words of each sign in the segment (0: no word reaches it).
    pub words: u64,
    /// Distinct frac values, 0/levels … (levels − 1)/levels, each on words/levels words.
    pub levels: u64,
}

/// Which words reach table entry (e, seg) (module doc: the transform).
pub fn segment_words(e: usize, seg: usize) -> SegmentWords {
    assert!(e < OCTAVES && seg < SEGMENTS);
    let p = 30 - e as u32; // bit of the leading one of m
    if e == 30 {
        // m = 0 and m = 1, both at (30, 0) with frac 0.
        let words = if seg == 0 { 2 } else { 0 };
        return SegmentWords {
            first_m: 0,
            words,
            levels: 1,
        };
    }
    if p < SEGMENT_BITS {
        // The p bits below the leading one are the top bits of seg; the rest of seg is 0.
        let shift = SEGMENT_BITS - p;
        let hit = seg.is_multiple_of(1 << shift);
        return SegmentWords {
            first_m: (1u64 << p) + (seg as u64 >> shift),
            words: u64::from(hit),
            levels: 1,
        };
    }
    let words = 1u64 << (p - SEGMENT_BITS);
    SegmentWords {
        first_m: (1u64 << p) + seg as u64 * words,
        words,
        levels: words.min(1 << FRAC_BITS),
    }
}

impl NormalTable {
    /// The process-wide table.
    pub fn get() -> &'static Self {
        &TABLE
    }

    /// The standard normal of one random word (module doc).
    ///
    /// The octave e and segment index are computed as `kernels/philox.cuh` does: m = 0 reads
    /// as m = 1 (the same octave 30, segment 0 and frac 0), sh = leading zeros = e + 1, and
    /// with the leading one of t = m << sh at bit 31, t >> (31 − SEGMENT_BITS) is
    /// SEGMENTS + seg, so the entry is sh·SEGMENTS + (t >> (31 − SEGMENT_BITS)) − 2·SEGMENTS.
    #[inline]
    pub fn normal(&self, word: u32) -> f32 {
        let m = (word & 0x7FFF_FFFF).max(1);
        let sh = m.leading_zeros();
        let t = m << sh;
        // The FRAC_BITS bits below the segment as the mantissa of a number in [1, 2), minus 1:
        // exact, and no integer → float conversion.
        let frac =
            f32::from_bits(0x3F80_0000 | ((t << (SEGMENT_BITS + 1)) >> (32 - FRAC_BITS))) - 1.0;
        let i =
            ((sh as usize) << SEGMENT_BITS) + (t >> (31 - SEGMENT_BITS)) as usize - 2 * SEGMENTS;
        let z = frac.mul_add(self.b[i], self.a[i]);
        f32::from_bits(z.to_bits() | (word & 0x8000_0000))
    }

    /// Fit every segment in f64, fold the second-moment residual, round to f32.
    fn build() -> Self {
        let z_of_m = |m: f64| upper_tail_inverse((m * 2f64.powi(-31)) / 2.0);
        let mut fit = vec![(0.0f64, 0.0f64); TABLE_LEN];
        for e in 0..OCTAVES {
            for seg in 0..SEGMENTS {
                let s = segment_words(e, seg);
                let i = e * SEGMENTS + seg;
                fit[i] = if s.words == 0 {
                    // Never read: continue the previous entry.
                    (fit[i - 1].0, 0.0)
                } else if s.levels == 1 {
                    let sum: f64 = (0..s.words)
                        .map(|k| z_of_m((s.first_m + k) as f64 + 0.5))
                        .sum();
                    (sum / s.words as f64, 0.0)
                } else if s.words <= DISCRETE_FIT_MAX {
                    let pts: Vec<(f64, f64)> = (0..s.words)
                        .map(|k| {
                            (
                                k as f64 / s.words as f64,
                                z_of_m((s.first_m + k) as f64 + 0.5),
                            )
                        })
                        .collect();
                    least_squares_line(&pts)
                } else {
                    // Word groups of words/levels share frac = g/levels; their mean u sits at
                    // the group's middle.
                    let group = (s.words / s.levels) as f64;
                    let g = |f: f64| z_of_m(s.first_m as f64 + f * s.words as f64 + 0.5 * group);
                    continuous_line(g)
                };
            }
        }
        let second = second_moment(&fit);
        let scale = 1.0 / second.sqrt();
        let mut table = Self {
            a: [0.0; TABLE_LEN],
            b: [0.0; TABLE_LEN],
        };
        for (i, (a, b)) in fit.iter().enumerate() {
            table.a[i] = (a * scale) as f32;
            // |z| falls along a segment; b ≥ −a keeps fma(frac, b, a) ≥ a·(1 − frac) ≥ 0 for
            // every frac < 1, so the sign bit alone gives the sign (the last segment's line,
            // ending at z = 0, would otherwise dip a hair below 0).
            table.b[i] = ((b * scale) as f32).max(-table.a[i]);
        }
        table
    }

    /// The table as CUDA source: `NORMAL_SEGMENT_BITS`, `NORMAL_FRAC_BITS`, `NORMAL_TABLE_LEN`
    /// and `__device__ const float2 NORMAL_TABLE[NORMAL_TABLE_LEN]` of (a, b) pairs in exact hexadecimal
    /// float literals, which `kernels/philox.cuh`'s `normal_from_word` reads. Prepended to every
    /// kernel unit by the host (`backend::cuda::compile::full_source`).
    pub fn cuda_source(&self) -> String {
        let mut s = String::from(
            "// Generated by rng::normal::NormalTable::cuda_source: the (a, b) table of the normal\n\
             // transform, index octave·16 + segment (exact f32 values).\n",
        );
        s.push_str(&format!(
            "#define NORMAL_SEGMENT_BITS {SEGMENT_BITS}\n#define NORMAL_FRAC_BITS {FRAC_BITS}\n\
             #define NORMAL_TABLE_LEN {TABLE_LEN}\n"
        ));
        s.push_str("__device__ const float2 NORMAL_TABLE[NORMAL_TABLE_LEN] = {\n");
        for (a, b) in self.a.iter().zip(&self.b) {
            s.push_str(&format!("    {{{}, {}}},\n", hex_f32(*a), hex_f32(*b)));
        }
        s.push_str("};\n");
        s
    }
}

/// Least-squares line a + b·f through points (f, z).
fn least_squares_line(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    let mf = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let mz = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sff: f64 = pts.iter().map(|p| (p.0 - mf) * (p.0 - mf)).sum();
    let sfz: f64 = pts.iter().map(|p| (p.0 - mf) * (p.1 - mz)).sum();
    let b = sfz / sff;
    (mz - b * mf, b)
}

/// Least-squares line a + b·f of g on [0, 1]: b = 12·∫(f − ½)g, a = ∫g − b/2 (Simpson).
fn continuous_line(g: impl Fn(f64) -> f64) -> (f64, f64) {
    let n = SIMPSON_INTERVALS;
    let (mut i0, mut i1) = (0.0, 0.0);
    for k in 0..=n {
        let f = k as f64 / n as f64;
        let w = if k == 0 || k == n {
            1.0
        } else if k % 2 == 1 {
            4.0
        } else {
            2.0
        };
        let v = g(f);
        i0 += w * v;
        i1 += w * (f - 0.5) * v;
    }
    let h = 1.0 / (3.0 * n as f64);
    let b = 12.0 * i1 * h;
    (i0 * h - b / 2.0, b)
}

/// E z² over all 2³² words of the table `fit` (f64 entries), with each segment's frac levels.
fn second_moment(fit: &[(f64, f64)]) -> f64 {
    let mut total = 0.0;
    for e in 0..OCTAVES {
        for seg in 0..SEGMENTS {
            let s = segment_words(e, seg);
            if s.words == 0 {
                continue;
            }
            let (a, b) = fit[e * SEGMENTS + seg];
            let l = s.levels as f64;
            let (ef, ef2) = (
                (l - 1.0) / (2.0 * l),
                (l - 1.0) * (2.0 * l - 1.0) / (6.0 * l * l),
            );
            total += s.words as f64 * (a * a + 2.0 * a * b * ef + b * b * ef2);
        }
    }
    total / 2f64.powi(31)
}

/// Exact hexadecimal C literal of a finite f32 (`0x1.8p+1f`, `0.0f`); subnormals as their
/// unnormalised form.
pub fn hex_f32(v: f32) -> String {
    assert!(v.is_finite(), "table value {v}");
    let bits = v.to_bits();
    let sign = if bits >> 31 == 1 { "-" } else { "" };
    let exp = ((bits >> 23) & 0xFF) as i32;
    let man = bits & 0x7F_FFFF;
    match (exp, man) {
        (0, 0) => format!("{sign}0.0f"),
        (0, _) => format!("{sign}0x0.{:06x}p-126f", man << 1),
        _ => format!("{sign}0x1.{:06x}p{:+}f", man << 1, exp - 127),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals_are_exact() {
        assert_eq!(hex_f32(1.0), "0x1.000000p+0f");
        assert_eq!(hex_f32(-3.0), "-0x1.800000p+1f");
        assert_eq!(hex_f32(0.0), "0.0f");
        assert_eq!(hex_f32(f32::from_bits(1)), "0x0.000002p-126f");
        assert_eq!(hex_f32(std::f32::consts::PI), "0x1.921fb6p+1f");
    }

    /// The module doc's definition: e = leading zeros of m − 1 (m = 0 in octave 30), the
    /// SEGMENT_BITS bits below the leading one, the FRAC_BITS bits below those.
    fn by_definition(table: &NormalTable, word: u32) -> f32 {
        let m = word & 0x7FFF_FFFF;
        let e = (m.leading_zeros() - 1).min(30);
        let t = m << (e + 1);
        let seg = ((t >> (31 - SEGMENT_BITS)) as usize) & (SEGMENTS - 1);
        let frac =
            f32::from_bits(0x3F80_0000 | ((t << (SEGMENT_BITS + 1)) >> (32 - FRAC_BITS))) - 1.0;
        let i = e as usize * SEGMENTS + seg;
        let z = frac.mul_add(table.b[i], table.a[i]);
        f32::from_bits(z.to_bits() | (word & 0x8000_0000))
    }

    #[test]
    fn the_branch_free_index_is_the_octave_and_segment() {
        let table = NormalTable::get();
        let mut words: Vec<u32> = (0..1u32 << 16).collect();
        // Every octave at each segment boundary, one word either side, and its last word.
        for e in 0..31u32 {
            let top = 1u32 << (30 - e);
            for k in 0..=SEGMENTS as u32 {
                let w = top + k * (top >> SEGMENT_BITS).max(1);
                words.extend([w.wrapping_sub(1), w, w + 1, (top << 1) - 1]);
            }
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            words.push((x >> 32) as u32 >> (x as u32 % 31));
        }
        for w in words {
            for word in [w & 0x7FFF_FFFF, w | 0x8000_0000] {
                assert_eq!(
                    table.normal(word).to_bits(),
                    by_definition(table, word).to_bits(),
                    "word {word:#010x}"
                );
            }
        }
    }

    #[test]
    fn segment_words_cover_every_magnitude_once() {
        let total: u64 = (0..OCTAVES)
            .flat_map(|e| (0..SEGMENTS).map(move |s| segment_words(e, s).words))
            .sum();
        assert_eq!(total, 1 << 31);
    }
}
